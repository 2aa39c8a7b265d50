"""GPTQ checkpoints (Qwen3-30B-A3B-GPTQ-Int4's layout, 4 and 8 bits, sym and asym, v1 and v2 zeros,
groups 32..128 and -1, act-order): equal to transformers on the weights they stand for."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qwenlocal import load_model
from qwenlocal.cli import app
from qwenlocal.generate import Generator, SamplingParams

from .prequant_packers import gptq_dequantized_copy, read_tensors, write_folder, write_gptq
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
    "router-and-down-16bit": {
        "keep_16bit": lambda n: n.endswith("down_proj.weight"),
        "modules_to_not_convert": ["down_proj"],
    },
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
            folder, plain = write_gptq(src, base / "gptq", **VARIANTS[variant])
            made[variant] = folder, gptq_dequantized_copy(folder, base / "plain", plain)
        return made[variant]

    return make


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dequantized_logits_equal_transformers(gptq, variant):
    folder, plain = gptq(variant)
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(PROMPT).logits
    got = load_model(folder, dtype=torch.float32, quant="bf16")(PROMPT)
    assert (got - expected).abs().max().item() < 1e-3


def test_greedy_tokens_equal_transformers(gptq):
    folder, plain = gptq("int4-g128-sym-v1")
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(PROMPT, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = Generator(load_model(folder, dtype=torch.float32, quant="bf16"), ctx_size=64)
    tokens = gen.run(PROMPT[0].tolist(), SamplingParams(temperature=0), max_tokens=16, eos_ids=()).token_ids
    assert tokens == out[0, PROMPT.shape[1] :].tolist()


def _broken(gptq, tmp_path, change):
    folder, _ = gptq("int4-g128-sym-v1")
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
