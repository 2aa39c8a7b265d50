"""GPTQ checkpoints (Qwen3-30B-A3B-GPTQ-Int4's layout, 4 and 8 bits, sym and asym, v1 and v2 zeros,
groups 32..128 and -1, act-order): equal to transformers on the weights they stand for."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from qwenlocal import load_model
from qwenlocal.cli import app
from qwenlocal.generation.generate import Generator, SamplingParams

from .prequant_packers import gptq_dequantized_copy, int8_rowwise, read_tensors, write_folder, write_gptq
from .test_fp8_source import FP8_SHAPES

transformers = pytest.importorskip("transformers")
runner = CliRunner()
PROMPT = torch.tensor([[17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12]])
# name -> write_gptq arguments
VARIANTS = {
    "int4-g128-sym-v1": {},  # Qwen's release
    "int4-g32-asym-v2": {"group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"},
    "int4-g64-asym-v1": {"group_size": 64, "sym": False},
    "int4-per-column-v2": {"group_size": -1, "checkpoint_format": "gptq_v2"},
    "int8-g64-asym-v1": {"bits": 8, "group_size": 64, "sym": False},
    "int8-g128-sym-v2": {"bits": 8, "checkpoint_format": "gptq_v2"},
    "int4-act-order": {"desc_act": True, "group_size": 64},
    "attention-16bit": {"keep_16bit": lambda n: ".self_attn." in n, "modules_to_not_convert": ["self_attn"]},
}


@pytest.fixture(scope="module")
def src(checkpoint_factory):
    return checkpoint_factory("gptq-src", FP8_SHAPES, dtype=torch.float32)


@pytest.fixture(scope="module")
def gptq(src, tmp_path_factory):
    """variant -> (GPTQ folder, its dequantized weights in an fp32 folder)."""
    made = {}

    def make(variant: str):
        if variant not in made:
            base = tmp_path_factory.mktemp(variant)
            folder, plain, as_int4 = write_gptq(src, base / "gptq", **VARIANTS[variant])
            made[variant] = folder, gptq_dequantized_copy(folder, base / "plain", plain), as_int4
        return made[variant]

    return make


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dequantized_logits_equal_transformers(gptq, variant):
    folder, plain, _ = gptq(variant)
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(PROMPT).logits
    got = load_model(folder, dtype=torch.float32, quant="bf16")(PROMPT)
    assert (got - expected).abs().max().item() < 1e-3


def test_greedy_tokens_equal_transformers(gptq):
    folder, plain, _ = gptq("int4-g128-sym-v1")
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(PROMPT, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = Generator(load_model(folder, dtype=torch.float32, quant="bf16"), ctx_size=64)
    tokens = gen.run(PROMPT[0].tolist(), SamplingParams(temperature=0), max_tokens=16, eos_ids=()).token_ids
    assert tokens == out[0, PROMPT.shape[1] :].tolist()


def _broken(gptq, tmp_path, change):
    folder, _, _ = gptq("int4-g128-sym-v1")
    tensors = read_tensors(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    drop = ()
    name = "model.layers.0.mlp.experts.2.up_proj"
    if change == "bits-3":
        qc["bits"] = 3
    elif change == "no-qzeros":
        drop = (name + ".qzeros",)
    elif change == "bad-scales":
        tensors[name + ".scales"] = tensors[name + ".scales"][:, :64]
    elif change == "bad-shape":
        tensors[name + ".qweight"] = torch.cat([tensors[name + ".qweight"]] * 2)
    elif change == "format":
        qc["checkpoint_format"] = "marlin"
    return write_folder(folder, tmp_path / "bad", tensors, {"quantization_config": qc}, drop=drop)


@pytest.mark.parametrize(
    "change, message",
    [
        ("bits-3", "asks for 3-bit GPTQ; qwenlocal reads 4- and 8-bit GPTQ."),
        ("no-qzeros", "has no model.layers.0.mlp.experts.2.up_proj.qzeros beside it."),
        ("bad-scales", "up_proj.scales in"),
        ("bad-shape", "has shape [128, 512]; the config needs [128, 256]."),
        ("format", "qwenlocal reads gptq and gptq_v2."),
    ],
)
def test_bad_gptq_input_is_one_sentence(gptq, tmp_path, change, message):
    bad = _broken(gptq, tmp_path, change)
    r = runner.invoke(app, ["generate", str(bad), "hi", "-n", "2", "--quant", "bf16", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())


# -- loaded as it is: 4-bit GPTQ repacked into int4 ----------------------------------------------
INT4_VARIANTS = ["int4-g128-sym-v1", "int4-g32-asym-v2", "int4-per-column-v2", "attention-16bit"]


@pytest.fixture(scope="module")
def int4_reference(gptq, tmp_path_factory):
    """variant -> transformers on the weights the int4 format holds for the GPTQ folder, and its
    16-bit lm_head as int8 holds it (what a CPU load computes)."""
    made = {}

    def make(variant: str):
        if variant not in made:
            folder, _, as_int4 = gptq(variant)
            lm_head = int8_rowwise(read_tensors(folder)["lm_head.weight"])
            plain = gptq_dequantized_copy(
                folder, tmp_path_factory.mktemp(variant) / "as-int4", {**as_int4, "lm_head.weight": lm_head}
            )
            made[variant] = transformers.Qwen3MoeForCausalLM.from_pretrained(
                plain, dtype=torch.float32
            ).eval()
        return made[variant]

    return make


@pytest.mark.parametrize("variant", INT4_VARIANTS)
def test_loads_as_int4_equal_to_transformers(gptq, int4_reference, variant):
    folder, _, _ = gptq(variant)
    model = load_model(folder, dtype=torch.float32)
    assert model.recipe.preset == "gptq" and model.recipe.format_for("experts") == "int4"
    assert model.recipe.format_for("attention") == (None if variant == "attention-16bit" else "int4")
    with torch.no_grad():
        expected = int4_reference(variant)(PROMPT).logits
    assert (model(PROMPT) - expected).abs().max().item() < 1e-3


def test_int4_greedy_tokens_and_offload(gptq, int4_reference):
    folder, _, _ = gptq("int4-g128-sym-v1")
    with torch.no_grad():
        out = int4_reference("int4-g128-sym-v1").generate(
            PROMPT, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    resident = load_model(folder, dtype=torch.float32)
    offloaded = load_model(folder, dtype=torch.float32, gpu_experts=3 * len(resident.config.moe_layers))
    assert type(offloaded.experts).__name__ == "OffloadedExperts"
    for model in (resident, offloaded):
        gen = Generator(model, ctx_size=64)
        tokens = gen.run(
            PROMPT[0].tolist(), SamplingParams(temperature=0), max_tokens=16, eos_ids=()
        ).token_ids
        assert tokens == out[0, PROMPT.shape[1] :].tolist()
    assert torch.equal(offloaded(PROMPT), resident(PROMPT))


def test_repack_moves_gptq_codes_without_a_float_step(gptq, monkeypatch):
    """The int4 codes are GPTQ's codes, and nothing is quantized while loading but the lm_head
    GPTQ left 16-bit (to int8, on the CPU)."""
    import qwenlocal.weights.quantize
    from qwenlocal.weights.gptq import unpack_rows

    folder, _, _ = gptq("int4-g32-asym-v2")
    quantize, lm_head = qwenlocal.weights.quantize.quantize, read_tensors(folder)["lm_head.weight"]

    def lm_head_only(w, fmt, *args, **kwargs):
        if fmt != "int8" or w.shape != lm_head.shape:
            pytest.fail("quantized while loading")
        return quantize(w, fmt, *args, **kwargs)

    monkeypatch.setattr(qwenlocal.weights.quantize, "quantize", lm_head_only)
    model = load_model(folder, dtype=torch.float32)
    q = model.model.layers[0].self_attn.k_proj.qtensor
    stored = read_tensors(folder)
    codes = unpack_rows(stored["model.layers.0.self_attn.k_proj.qweight"], 4).T
    from quant.int4 import codes as int4_codes
    from quant.int4 import cpu_packing

    assert torch.equal(int4_codes(q.weight, q.shape, q.packing), codes)
    # the experts went straight from GPTQ's words into this CPU's kernel layout
    expert = model.experts.qtensors(0, 3)["down_proj"]
    assert expert.packing == (cpu_packing() or "plain")
    codes = unpack_rows(stored["model.layers.0.mlp.experts.3.down_proj.qweight"], 4).T
    assert torch.equal(int4_codes(expert.weight, expert.shape, expert.packing), codes)


@pytest.mark.parametrize("packing", ["cpu-halves64", "cpu-halves32", "cpu-pairs32"])
def test_gptq_words_go_straight_into_each_cpu_kernel_layout(packing):
    """GPTQ's words into a CPU kernel layout in one pass: the same bytes as the plain-torch packer
    of that layout (checked against torch's own packer in test_kernels) makes from the codes that
    an independent GPTQ packer put in; for every layout, whichever this CPU uses."""
    from quant.int4 import codes as int4_codes
    from quant.int4 import pack_codes_for_cpu
    from qwenlocal.weights.gptq import words_to_cpu_layout

    from .prequant_packers import pack_words

    n, k = 128, 256
    c = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(3))  # [in, out]
    got = words_to_cpu_layout(pack_words(c, 4), (n, k), packing)
    want = c.T.to(torch.uint8).contiguous()
    assert torch.equal(got, pack_codes_for_cpu(want, packing))
    assert torch.equal(int4_codes(got, (n, k), packing), want)


def test_memory_model_and_vram_equal_what_loads(gptq):
    from qwenlocal.planning.memory import estimate, measure

    folder, _, _ = gptq("int4-g128-sym-v1")
    model = load_model(folder, dtype=torch.bfloat16)
    est = estimate(model.config, model.plan.memory(640))
    real = measure(model)
    for name in ("attention", "experts", "embed_tokens", "lm_head", "routers", "norms"):
        assert est.bytes_of(name) == real.get(name, {}).get("cpu", 0), name
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert est.bytes_of("lm_head") == vocab * hidden + 4 * vocab  # int8 codes, an fp32 scale a row
    r = runner.invoke(app, ["vram", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["quant"] == "gptq" and d["components"]["experts"]["bytes"] == est.bytes_of("experts")
    assert d["components"]["lm_head"]["bytes"] == vocab * hidden * 2  # vram plans a GPU: bf16


def test_a_cpu_load_computes_the_16bit_lm_head_at_int8(gptq):
    """GPTQ left lm_head 16-bit (as Qwen's release does): on the CPU it is quantized at load into
    the bytes our quantizer makes of the same weight; the rest of GPTQ's recipe is unchanged."""
    from quant import quantize
    from quant.linear import QuantLinear
    from qwenlocal.planning.plan import GPTQ_LM_HEAD_INT8
    from qwenlocal.weights.sources import ModelSource

    folder, _, _ = gptq("int4-g128-sym-v1")
    own = ModelSource.read(folder).own_recipe
    assert own.lm_head_bits == 16
    model = load_model(folder, dtype=torch.bfloat16)
    assert model.recipe == dataclasses.replace(own, lm_head_bits=8)
    assert model.plan.reason == GPTQ_LM_HEAD_INT8
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.spec.fmt == "int8"
    want = quantize(read_tensors(folder)["lm_head.weight"], "int8")
    assert torch.equal(model.lm_head.weight, want.weight)
    assert torch.equal(model.lm_head.absmax, want.absmax)


def test_int8_lm_head_logits_stay_close_and_an_explicit_recipe_is_kept(gptq):
    from qwenlocal.generation.quality import compare_logits
    from qwenlocal.model.qwen3_moe import Linear
    from qwenlocal.weights.sources import ModelSource

    folder, _, _ = gptq("int4-g128-sym-v1")
    own = ModelSource.read(folder).own_recipe
    int8 = load_model(folder, dtype=torch.float32)
    asked = load_model(folder, dtype=torch.float32, quant=own)  # GPTQ's recipe as it is, by request
    assert isinstance(asked.lm_head, Linear) and asked.plan.reason is None
    with torch.no_grad():
        got, ref = int8(PROMPT)[0], asked(PROMPT)[0]
    # bench/lm_head.py, the real shape with Gaussian weights: max |diff| 0.046 at logit std 1.00
    assert 0 < (got - ref).abs().max() <= 0.05 * ref.std()
    c = compare_logits(ref, got)
    assert c["top1_agreement"] == 1.0 and c["kl_mean"] < 1e-4


def test_a_gpu_plan_keeps_gptq_lm_head_16bit(gptq):
    """Nothing was measured on a GPU: there the lm_head stays as GPTQ left it."""
    from qwenlocal.planning.plan import Sizing, decide_recipe
    from qwenlocal.weights.sources import ModelSource

    folder, _, _ = gptq("int4-g128-sym-v1")
    config = ModelSource.read(folder).config
    gpu = decide_recipe(config, "auto", Sizing(torch.device("cuda"), torch.bfloat16, 4096, 8 * 1024**3))
    assert gpu.recipe.lm_head_bits == 16 and gpu.reason is None
    cpu = decide_recipe(config, None, Sizing(torch.device("cpu"), torch.bfloat16, 4096))
    assert cpu.recipe.lm_head_bits == 8


def test_act_order_is_refused_for_int4_and_loads_dequantized(gptq):
    folder, plain, _ = gptq("int4-act-order")
    r = runner.invoke(app, ["generate", str(folder), "hi", "-n", "2", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "act-order (desc_act) groups, which the int4 format cannot hold in order" in " ".join(
        r.output.split()
    )
    assert load_model(folder, dtype=torch.float32, quant="int8").recipe.format_for("experts") == "int8"


def test_quantize_a_gptq_folder_and_its_report(gptq, tmp_path):
    folder, _, _ = gptq("int4-g128-sym-v1")
    out = tmp_path / "int4"
    r = runner.invoke(
        app, ["quantize", str(folder), str(out), "--preset", "int4", "--group-size", "64", "--no-report"]
    )
    assert r.exit_code == 0, r.output
    # the same weights: GPTQ's groups of 128 are two int4 groups of 64 each
    got = load_model(out, dtype=torch.float32)(PROMPT)
    assert torch.equal(got, load_model(folder, dtype=torch.float32, quant="int4")(PROMPT))
    # GPTQ loaded as it is equals its int4 copy made with the recipe it loaded with: the same bytes
    from qwenlocal.weights.quantize import quantize_checkpoint

    model = load_model(folder, dtype=torch.float32)
    quantize_checkpoint(folder, tmp_path / "own", model.recipe)
    got = load_model(tmp_path / "own", dtype=torch.float32)(PROMPT)
    assert torch.equal(got, model(PROMPT))


def test_quality_report_compares_with_the_dequantized_gptq_weights(tiny_ckpt, tmp_path):
    folder, _, _ = write_gptq(tiny_ckpt, tmp_path / "gptq", group_size=32, sym=False)
    out = tmp_path / "int4"
    r = runner.invoke(
        app,
        ["quantize", str(folder), str(out), "--preset", "int4", "--group-size", "32", "--probe-tokens", "32"],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "quant_report.json").read_text())
    assert report["reference"].startswith("the gptq source's own weights dequantized in fp32")
    assert "original bf16 model" in report["reference"]
    # only the bf16 rounding of GPTQ's fp16 scales separates the two
    assert report["logits"]["kl_mean"] < 1e-3 and report["logits"]["top1_agreement"] >= 0.95
