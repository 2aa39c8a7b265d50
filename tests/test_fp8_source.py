"""FP8 checkpoints (Qwen3-30B-A3B-FP8's layout, written by transformers' FP8 quantizer): read by
dequantizing block-wise, equal to transformers on the dequantized weights, quantized once like a
16-bit source."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qwenlocal import load_model
from qwenlocal.cli import app
from qwenlocal.generation.generate import Generator, SamplingParams
from qwenlocal.weights.checkpoint import Checkpoint
from qwenlocal.weights.sources import Fp8Checkpoint, dequantize_fp8, open_source

from .conftest import TINY
from .prequant_packers import fp8_dequantized_copy, read_tensors, write_folder, write_fp8

transformers = pytest.importorskip("transformers")
runner = CliRunner()
PROMPT = torch.tensor([[17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12]])
# Widths that [128, 128] blocks tile (the real model's 2048, 768, 4096 and 512 do too).
FP8_SHAPES = {
    **TINY,
    "vocab_size": 1024,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "moe_intermediate_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "mlp_only_layers": [1],
}


@pytest.fixture(scope="module")
def fp8(checkpoint_factory, tmp_path_factory):
    """(FP8 folder, the same weights dequantized by transformers in fp32)."""
    src = checkpoint_factory("fp8-src", FP8_SHAPES, dtype=torch.float32)
    base = tmp_path_factory.mktemp("fp8")
    folder = write_fp8(src, base / "fp8")
    return folder, fp8_dequantized_copy(folder, base / "dequantized")


def test_layout_is_qwens(fp8):
    folder, _ = fp8
    tensors = read_tensors(folder)
    w = tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    s = tensors["model.layers.0.mlp.experts.3.down_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (256 // 128, 128 // 128)
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays 16-bit
    assert "lm_head.weight_scale_inv" not in tensors


def test_logits_and_greedy_tokens_equal_transformers(fp8):
    folder, dequantized = fp8
    ours = load_model(folder, dtype=torch.float32)
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(PROMPT).logits
        out = ref.generate(PROMPT, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert (ours(PROMPT) - expected).abs().max().item() < 1e-3
    gen = Generator(ours, ctx_size=64)
    tokens = gen.run(PROMPT[0].tolist(), SamplingParams(temperature=0), max_tokens=16, eos_ids=()).token_ids
    assert tokens == out[0, PROMPT.shape[1] :].tolist()


def test_partial_blocks_and_one_scale_per_tensor():
    w = torch.randn(200, 300)
    scale = torch.rand(2, 3) + 0.5
    got = dequantize_fp8(w.to(torch.float8_e4m3fn), scale, (128, 128))
    expected = (
        w.to(torch.float8_e4m3fn).float()
        * scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    )
    assert torch.equal(got, expected)
    assert torch.equal(
        dequantize_fp8(w.to(torch.float8_e4m3fn), torch.tensor([[2.0]]), (200, 300)),
        w.to(torch.float8_e4m3fn).float() * 2,
    )


def test_quantize_accepts_fp8_and_equals_quantizing_the_dequantized_model(fp8, tmp_path):
    folder, _ = fp8
    bf16 = fp8_dequantized_copy(folder, tmp_path / "bf16", torch.bfloat16)
    for src, out in ((folder, tmp_path / "from-fp8"), (bf16, tmp_path / "from-bf16")):
        r = runner.invoke(app, ["quantize", str(src), str(out), "--preset", "mixed", "--no-report"])
        assert r.exit_code == 0, r.output
    a, b = Checkpoint(tmp_path / "from-fp8"), Checkpoint(tmp_path / "from-bf16")
    assert sorted(a.weight_map) == sorted(b.weight_map)
    for name in a.weight_map:
        assert torch.equal(a.get(name), b.get(name)), name
    assert a.config.quantization_config["quant_method"] == "qwenlocal"
    # quantize-while-loading the FP8 folder gives the same model
    got = load_model(folder, dtype=torch.float32, quant="mixed")(PROMPT)
    assert torch.equal(got, load_model(tmp_path / "from-fp8", dtype=torch.float32)(PROMPT))


def test_cli_quantizes_an_fp8_folder_once_into_the_cache(fp8, tmp_path, monkeypatch):
    from qwenlocal.weights.quant_cache import quantized_once

    monkeypatch.setenv("QWENLOCAL_CACHE_DIR", str(tmp_path / "cache"))
    folder, _ = fp8
    target = quantized_once(folder).folder
    assert target.parent == tmp_path / "cache"
    qc = json.loads((target / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qwenlocal"
    assert quantized_once(folder).folder == target


def test_reader_streams_one_tensor_at_a_time(fp8):
    folder, _ = fp8
    ckpt = open_source(folder)
    assert isinstance(ckpt, Fp8Checkpoint) and ckpt.config.quantization_config is None
    assert ckpt.get("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop-scale", "has no model.layers.0.self_attn.k_proj.weight_scale_inv beside it"),
        ("bad-scale", "need [1, 2]"),
        ("bad-fmt", "qwenlocal reads e4m3"),
    ],
)
def test_bad_fp8_input_is_one_sentence(fp8, tmp_path, change, message):
    folder, _ = fp8
    tensors = read_tensors(folder)
    name = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if change == "bad-scale":
        tensors[name] = torch.ones(2, 2)
    if change == "bad-fmt":
        qc["fmt"] = "e5m2"
    bad = write_folder(
        folder,
        tmp_path / "bad",
        tensors,
        {"quantization_config": qc},
        drop=(name,) if change == "drop-scale" else (),
    )
    r = runner.invoke(app, ["generate", str(bad), "hi", "-n", "2", "--quant", "bf16", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
