"""`qwenlocal quantize` and quantized loading: recipe in config.json, bit-exact tensors,
outputs equal to the dequantized model, atomic writes, clear errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from quant.formats import dequantize, quantize
from quant.pack import PackLayout, unpack
from quant.recipe import Recipe
from qwenlocal import load_model
from qwenlocal.cli import app
from qwenlocal.generation.quality import probe_ids
from qwenlocal.model.names import EXPERT_PROJS, expert_blob_name, expert_tensor_name, tensor_class
from qwenlocal.weights.checkpoint import Checkpoint

from .conftest import TINY

runner = CliRunner()
PROMPT = torch.tensor([[17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12, 4000, 151643]])


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def src(checkpoint_factory):
    """A 16-bit (bf16) random checkpoint with the real tokenizer, a dense layer and attention bias."""
    overrides = {**TINY, "num_hidden_layers": 3, "mlp_only_layers": [1], "attention_bias": True}
    return checkpoint_factory("quant-src", overrides, dtype=torch.bfloat16, shard_size=8_000_000)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    """The src quantized with each preset through the CLI, written once per module."""
    made = {}
    for preset in ("mixed", "nf4", "int8"):
        out = tmp_path_factory.mktemp("q") / f"out-{preset}"
        extra = ["--lm-head-bits", "16"] if preset == "int8" else []
        r = invoke(
            "quantize", src, out, "--preset", preset, "--shard-size", "3MB", "--probe-tokens", 64, *extra
        )
        assert r.exit_code == 0, r.output
        made[preset] = out
    return made


def dequantized_reference(src, recipe: Recipe):
    """The 16-bit model with every quantized weight replaced by dequantize(quantize(w)), in fp32."""
    model = load_model(src, dtype=torch.float32)
    ckpt = Checkpoint(src)
    for name, module in list(model.named_modules()):
        cls = tensor_class(name + ".weight")
        spec = recipe.spec(cls, tuple(module.weight.shape)) if cls and hasattr(module, "weight") else None
        if spec is not None:
            w = ckpt.get(name + ".weight")
            q = quantize(w, spec.fmt, spec.blocksize, spec.double_quant)
            module.weight.data = dequantize(q, torch.float32)
    for layer in model.config.moe_layers:
        for e in range(model.config.num_experts):
            for proj in EXPERT_PROJS:
                w = ckpt.get(expert_tensor_name(layer, e, proj))
                spec = recipe.spec("experts", tuple(w.shape))
                q = quantize(w, spec.fmt, spec.blocksize, spec.double_quant)
                model.experts.set_expert(layer, e, proj, dequantize(q, torch.float32))
    return model


@pytest.mark.parametrize("preset", ["mixed", "nf4", "int8"])
def test_folder_layout_and_recipe(quantized, preset):
    out = quantized[preset]
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "qwenlocal" and qc["format_version"] == 1
    recipe = Recipe.from_config(qc)
    assert recipe.preset == ("int8+custom" if preset == "int8" else preset)
    assert qc["classes"]["experts"]["format"] == {"int8": "int8", "nf4": "nf4", "mixed": "int4"}[preset]
    assert qc["classes"]["attention"]["format"] == ("nf4" if preset == "nf4" else "int8")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "quant_report.json"):
        assert (out / name).is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:  # a shard is at most --shard-size, unless one tensor alone is larger
        tensors = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(tensors) == 1 or (out / shard).stat().st_size <= 3_000_000 + 100_000
    assert not list(out.parent.glob(".*partial*"))


def test_quantized_model_equals_dequantized_reference(src, quantized):
    for preset in ("mixed", "nf4"):
        recipe = Recipe.from_config(
            json.loads((quantized[preset] / "config.json").read_text())["quantization_config"]
        )
        got = load_model(quantized[preset], dtype=torch.float32)(PROMPT)
        expected = dequantized_reference(src, recipe)(PROMPT)
        assert (got - expected).abs().max().item() < 1e-3


def test_quantize_while_loading_equals_quantized_folder(src, quantized):
    a = load_model(src, dtype=torch.float32, quant="mixed")(PROMPT)
    b = load_model(quantized["mixed"], dtype=torch.float32)(PROMPT)
    assert torch.equal(a, b)


def test_close_to_original(src, quantized):
    original = load_model(src, dtype=torch.float32)(PROMPT)[0]
    # a random model's logits are nearly flat, so top-1 is fragile: compare the logits themselves
    probe = probe_ids(src, 64)
    reference = load_model(src, dtype=torch.float32)(probe)[0]
    for preset, max_rel in (("int8", 0.05), ("mixed", 0.4)):  # unrelated logits: ~1.4
        model = load_model(quantized[preset], dtype=torch.float32)
        got = model(PROMPT)[0]
        rel = ((got - original).norm() / original.norm()).item()
        assert rel < max_rel, (preset, rel)
        # the report's figures, recomputed here with torch's own KL divergence
        report = json.loads((quantized[preset] / "quant_report.json").read_text())["logits"]
        q = model(probe)[0]
        kl = F.kl_div(q.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none")
        assert report["positions"] == 64
        assert report["kl_mean"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-3)
        assert report["top1_agreement"] == (q.argmax(-1) == reference.argmax(-1)).float().mean().item()
    # int8 is much closer than 4-bit
    r8 = json.loads((quantized["int8"] / "quant_report.json").read_text())
    r4 = json.loads((quantized["nf4"] / "quant_report.json").read_text())
    assert r8["logits"]["kl_mean"] < r4["logits"]["kl_mean"]
    assert r8["weights"]["experts"]["rel_error"] < r4["weights"]["experts"]["rel_error"]


def test_stored_tensors_equal_bitsandbytes(src, quantized):
    bnb = pytest.importorskip("bitsandbytes")
    out = Checkpoint(quantized["nf4"])
    layout = PackLayout.from_dict(out.config.quantization_config["expert_layout"])
    q = unpack(out.get(expert_blob_name(0, 3)), layout)
    w = Checkpoint(src).get(expert_tensor_name(0, 3, "down_proj"))
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q["down_proj"].weight, packed)
    assert torch.equal(q["down_proj"].absmax, state.absmax)
    assert torch.equal(q["down_proj"].nested_absmax, state.state2.absmax)
    # int8 attention: bitsandbytes' row-wise absmax quantization
    out = Checkpoint(quantized["mixed"])
    w = Checkpoint(src).get("model.layers.0.self_attn.q_proj.weight")
    codes, row_stats, _ = bnb.functional.int8_vectorwise_quant(w)
    assert torch.equal(out.get("model.layers.0.self_attn.q_proj.weight"), codes)
    assert torch.equal(out.get("model.layers.0.self_attn.q_proj.absmax"), row_stats)


def test_bits_per_weight_in_stats(quantized):
    """Worked by hand for the tiny shapes: 2 MoE layers of 8 experts (32 x 64, 32 x 64, 64 x 32)
    and the dense MLP of layer 1 (96 x 64, 96 x 64, 64 x 96), both in the "experts" class."""
    stats = json.loads((quantized["mixed"] / "quant_stats.json").read_text())
    # int4, groups of 64 where 64 divides the width, else 32 (quant.recipe), each part starting on a
    # 64-byte boundary of the packed blob. gate/up 32 x 64: codes 1,024 B + bf16 (scale, zero) for
    # 32 groups 128 B; down 64 x 32 (groups of 32): codes 1,024 B + 64 groups 256 B: 3,584 B an
    # expert of 6,144 weights.
    routed_bytes, routed_weights = 2 * 8 * 3584, 2 * 8 * 6144
    # The dense MLP, stored unpacked: gate/up 96 x 64: 3,072 + 96 groups 384 B; down 64 x 96
    # (groups of 32): 3,072 + 192 groups 768 B
    dense_bytes, dense_weights = 2 * 3456 + 3840, 3 * 6144
    expected = 8 * (routed_bytes + dense_bytes) / (routed_weights + dense_weights)
    assert stats["classes"]["experts"]["bits_per_weight"] == pytest.approx(expected, rel=1e-12)
    # int8 attention: one byte a weight plus an fp32 scale per row of 64 weights
    assert stats["classes"]["attention"]["bits_per_weight"] == 8 + 32 / 64


def test_compare_logits_worked_by_hand():
    from qwenlocal.generation.quality import compare_logits

    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    got = torch.tensor([[torch.log(torch.tensor(3.0)), 0.0], [0.0, 2.0]])
    # row 1: KL((1/2, 1/2) || (3/4, 1/4)) = ln(4/3) / 2; row 2: p and q swapped, KL = 2 tanh(1) * 2 / 2
    kl = [0.5 * math.log(4 / 3), 2 * math.tanh(1)]
    d = compare_logits(ref, got)
    assert d["kl_mean"] == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert d["kl_max"] == pytest.approx(kl[1], rel=1e-6)
    assert d["top1_agreement"] == 0.5 and d["positions"] == 2


def test_existing_out_refused_without_force(src, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "old-notes.txt").write_text("an earlier run")
    r = invoke("quantize", src, out, "--no-report")
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    assert [p.name for p in out.iterdir()] == ["old-notes.txt"]
    r = invoke("quantize", src, out, "--no-report", "--force")
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and not (out / "old-notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temporary folder left


def test_out_equal_to_src_is_refused(src):
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    r = invoke("quantize", src, src, "--no-report")
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = invoke("quantize", src, src, "--no-report", "--force")
    assert r.exit_code == 2 and "OUT must be a different folder from SRC" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_a_recipe_that_quantizes_nothing_is_refused(src, tmp_path):
    from qwenlocal.errors import UserError
    from qwenlocal.weights.quantize import quantize_checkpoint

    r = invoke("quantize", src, tmp_path / "out", "--no-report", "--preset", "bf16")
    assert r.exit_code == 2 and "--expert-bits must be 4 or 8" in r.stderr
    with pytest.raises(UserError, match="keeps every tensor 16-bit"):
        quantize_checkpoint(src, tmp_path / "out", Recipe.from_preset("bf16"))
    assert list(tmp_path.iterdir()) == []


FLAG_RUNS = {
    # flags -> (experts: bnb quant_type, blocksize, double quant; attention: bits)
    "fp4": (["--format4", "fp4"], ("fp4", 64, True), 8),
    "no-double-quant": (["--format4", "nf4", "--no-double-quant"], ("nf4", 64, False), 8),
    "blocksize-128": (["--format4", "nf4", "--blocksize", "128"], ("nf4", 128, True), 8),
    "attn-4": (["--format4", "nf4", "--attn-bits", "4"], ("nf4", 64, True), 4),
    "attn-16": (["--format4", "nf4", "--attn-bits", "16"], ("nf4", 64, True), 16),
}


@pytest.mark.parametrize("run", list(FLAG_RUNS))
def test_recipe_flags_reach_the_stored_bytes(src, tmp_path, run):
    """Each flag's tensors equal what bitsandbytes makes with the same settings."""
    bnb = pytest.importorskip("bitsandbytes")
    args, (quant_type, blocksize, dq), attn_bits = FLAG_RUNS[run]
    out = tmp_path / "out"
    r = invoke("quantize", src, out, "--no-report", *args)
    assert r.exit_code == 0, r.output
    ckpt, source = Checkpoint(out), Checkpoint(src)
    layout = PackLayout.from_dict(ckpt.config.quantization_config["expert_layout"])
    stored = unpack(ckpt.get(expert_blob_name(2, 6)), layout)["gate_proj"]
    w = source.get(expert_tensor_name(2, 6, "gate_proj"))
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type
    )
    assert torch.equal(stored.weight, packed) and torch.equal(stored.absmax, state.absmax)
    name = "model.layers.0.self_attn.q_proj"
    w = source.get(name + ".weight")
    if attn_bits == 16:
        assert torch.equal(ckpt.get(name + ".weight"), w) and name + ".absmax" not in ckpt
    elif attn_bits == 8:
        assert torch.equal(ckpt.get(name + ".weight"), bnb.functional.int8_vectorwise_quant(w)[0])
    else:
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(ckpt.get(name + ".weight"), packed)
    assert load_model(out, dtype=torch.float32)(PROMPT).isfinite().all()


def test_write_error_midway_leaves_nothing(src, tmp_path, monkeypatch):
    from qwenlocal.weights import checkpoint

    calls = {"n": 0}
    original = checkpoint.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardWriter, "add", failing_add)
    r = invoke("quantize", src, tmp_path / "out", "--no-report", "--shard-size", "1MB")
    assert r.exit_code == 2 and "disk is full" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_crash_midway_leaves_nothing(src, tmp_path, monkeypatch):
    import qwenlocal.weights.quantize

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwenlocal.weights.quantize, "pack", boom)
    with pytest.raises(KeyboardInterrupt):
        qwenlocal.weights.quantize.quantize_checkpoint(src, tmp_path / "out", Recipe.from_preset("mixed"))
    assert list(tmp_path.iterdir()) == []


def test_truncated_input_shard(src, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = invoke("quantize", bad, tmp_path / "out", "--no-report")
    assert r.exit_code == 2 and "is truncated" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "q3"], "Unknown quantization preset 'q3'"),
        (["--attn-bits", "5"], "--attn-bits must be one of 4, 8, 16"),
        (["--expert-bits", "16"], "--expert-bits must be 4 or 8"),
        (["--blocksize", "100"], "--blocksize must be one of"),
        (["--format4", "q4_k"], "--format4 must be one of nf4, fp4, int4"),
        (["--format4", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
        (["--shard-size", "big"], "Cannot read 'big' as a size"),
    ],
)
def test_bad_flags(src, tmp_path, args, message):
    r = invoke("quantize", src, tmp_path / "out", "--no-report", *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert not (tmp_path / "out").exists()


def test_already_quantized_source(quantized, tmp_path):
    r = invoke("quantize", quantized["mixed"], tmp_path / "again", "--no-report")
    assert r.exit_code == 2 and "already quantized" in r.stderr


def test_generate_on_quantized_folder(quantized):
    r = invoke("generate", quantized["nf4"], "Hello", "-n", 4, "--json", "--temp", 0)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["generated_tokens"] == 4


def test_random_quantized_checkpoint_without_a_16bit_source(tmp_path):
    """The GPU benchmark's way to build the full-size model: quantized straight from random tensors."""
    from qwenlocal.weights.random_checkpoint import (
        RandomSource,
        config_dict,
        write_random_quantized_checkpoint,
    )

    overrides = {**TINY, "num_hidden_layers": 2}
    out = write_random_quantized_checkpoint(tmp_path / "rq", overrides, preset="nf4")
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*partial*"))
    model = load_model(out, dtype=torch.float32)
    assert model(PROMPT).shape == (1, PROMPT.shape[1], 151936)
    source = RandomSource(config_dict(overrides))
    layout = PackLayout.from_dict(Checkpoint(out).config.quantization_config["expert_layout"])
    stored = unpack(Checkpoint(out).get(expert_blob_name(1, 5)), layout)["up_proj"]
    want = quantize(source.get(expert_tensor_name(1, 5, "up_proj")), "nf4", 64, True)
    assert torch.equal(stored.weight, want.weight) and torch.equal(stored.absmax, want.absmax)


def test_scratch_buffers_work_in_and_out_of_inference_mode():
    """A reusable buffer made during a forward (inference mode) is not reused outside it."""
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    for fmt in ("nf4", "int8"):
        q = quantize(w, fmt, 64, fmt == "nf4")
        with torch.inference_mode():
            inside = dequantize(q, torch.float32)
        outside = dequantize(quantize(w, fmt, 64, fmt == "nf4"), torch.float32)
        assert torch.equal(inside, outside)


def test_full_disk_in_the_background_writer(src, tmp_path, monkeypatch):
    """A shard written by the writer thread fails: one sentence, exit 2, nothing left behind."""
    import safetensors.torch

    calls = {"n": 0}
    real = safetensors.torch.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    r = invoke("quantize", src, tmp_path / "out", "--no-report", "--shard-size", "1MB")
    assert r.exit_code == 2 and "disk is full" in r.stderr
    assert calls["n"] >= 2 and list(tmp_path.iterdir()) == []
