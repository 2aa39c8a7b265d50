"""The memory model: estimates equal, to the byte, what the loader allocates; the built-in
Qwen3-30B-A3B figures agree with DESIGN.md; `qwenlocal vram` prints and refuses clearly."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from quant.recipe import Recipe
from qwenlocal import load_model
from qwenlocal.cli import app
from qwenlocal.config import Qwen3MoeConfig
from qwenlocal.generate import Generator
from qwenlocal.memory import Plan, estimate, fit_expert_slots, kv_cache_bytes, measure

from .conftest import DATA, TINY

runner = CliRunner()
GIB = 1024**3
CONFIGS = {
    "tiny": {**TINY},
    "dense-layer-bias": {**TINY, "num_hidden_layers": 3, "mlp_only_layers": [1], "attention_bias": True},
    "tied": {**TINY, "tie_word_embeddings": True, "head_dim": 32},
}
WEIGHTS = ("embed_tokens", "attention", "norms", "routers", "dense_mlp", "lm_head", "experts")


def cpu_bytes(measured: dict, name: str) -> int:
    return measured.get(name, {}).get("cpu", 0)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("preset", ["bf16", "int8", "mixed", "nf4"])
def test_estimate_equals_allocated_bytes(checkpoint_factory, config_name, preset):
    folder = checkpoint_factory(f"mem-{config_name}", CONFIGS[config_name], dtype=torch.bfloat16)
    dtype = torch.bfloat16
    model = load_model(folder, dtype=dtype, quant=None if preset == "bf16" else preset)
    gen = Generator(model, ctx_size=640)
    recipe = None if preset == "bf16" else Recipe.from_preset(preset)
    est = estimate(model.config, Plan(recipe=recipe, ctx_size=640, dtype=dtype, device="cpu"))
    real = measure(model, gen.cache)
    for name in (*WEIGHTS, "kv_cache", "rope_tables"):
        assert est.bytes_of(name) == cpu_bytes(real, name), name
    assert set(real) <= {*WEIGHTS, "kv_cache", "rope_tables"}


def test_offloaded_estimate_equals_allocated(checkpoint_factory):
    folder = checkpoint_factory("mem-tiny", CONFIGS["tiny"], dtype=torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, quant="mixed", gpu_experts=6)
    plan = Plan(recipe=Recipe.from_preset("mixed"), ctx_size=256, device="cpu", expert_slots=6)
    est = estimate(model.config, plan)
    real = measure(model)
    assert est.bytes_of("experts") == cpu_bytes(real, "experts") == 6 * est.expert_bytes
    assert est.bytes_of("expert_store", "host") == cpu_bytes(real, "expert_store") == 16 * est.expert_bytes


def test_builtin_qwen3_30b_figures():
    c = Qwen3MoeConfig.builtin()
    assert kv_cache_bytes(c, 1) == 98_304  # 96 KiB per token in bf16
    assert kv_cache_bytes(c, 32768) == 3 * GIB
    experts = {
        "bf16": 54.00,
        "int8": 27.08,
        "nf4": 13.95,  # with double quant
    }
    for preset, gib in experts.items():
        recipe = None if preset == "bf16" else Recipe.from_preset(preset)
        est = estimate(c, Plan(recipe=recipe, ctx_size=4096))
        assert est.experts_total == 6144
        assert est.bytes_of("experts") / GIB == pytest.approx(gib, abs=0.01), preset
    nodq = Recipe(attn_bits=4, expert_bits=4, fmt4="nf4", double_quant=False, preset="nf4")
    est = estimate(c, Plan(recipe=nodq, ctx_size=4096))
    assert est.bytes_of("experts") / GIB == pytest.approx(15.19, abs=0.01)
    bf16 = estimate(c, Plan(recipe=None, ctx_size=4096))
    assert bf16.bytes_of("attention") / GIB == pytest.approx(1.69, abs=0.01)
    assert bf16.bytes_of("embed_tokens", "host") / GIB == pytest.approx(0.58, abs=0.01)
    mixed = estimate(c, Plan(recipe=Recipe.from_preset("mixed"), ctx_size=4096))
    assert mixed.bytes_of("attention") / GIB == pytest.approx(0.85, abs=0.01)


def test_larger_family_member():
    c = Qwen3MoeConfig.from_file(DATA / "qwen3-235b-a22b-2507" / "config.json")
    est = estimate(c, Plan(recipe=Recipe.from_preset("mixed"), ctx_size=32768))
    assert est.experts_total == 94 * 128
    assert kv_cache_bytes(c, 1) == 2 * 94 * 4 * 128 * 2
    assert 100 * GIB < est.gpu_total < 140 * GIB


def test_budget_fits_largest_cache():
    c = Qwen3MoeConfig.builtin()
    plan = Plan(recipe=Recipe.from_preset("mixed"), ctx_size=8192)
    est = fit_expert_slots(c, plan, 8 * GIB)
    assert est.gpu_total <= 8 * GIB
    assert est.expert_slots % 48 == 0 and est.expert_slots >= 8 * 48
    bigger = Plan(**{**plan.__dict__, "expert_slots": est.expert_slots + 48})
    assert estimate(c, bigger).gpu_total > 8 * GIB


def vram(*args):
    return runner.invoke(app, ["vram", *map(str, args)])


def test_vram_json():
    r = vram("--ctx-size", "32k", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in (
        "components",
        "gpu_total_bytes",
        "host_total_bytes",
        "expert_slots",
        "experts_total",
        "ctx_size",
        "quant",
    ):
        assert key in d
    assert d["ctx_size"] == 32768 and d["quant"] == "mixed" and d["experts_total"] == 6144
    assert d["components"]["kv_cache"] == {"bytes": 3 * GIB, "where": "gpu"}


def test_vram_table_and_budget():
    r = vram("--vram-budget", "8GiB", "--ctx-size", "16k")
    assert r.exit_code == 0, r.output
    assert "experts resident" in r.stdout and "of 6,144" in r.stdout
    assert "largest expert cache" in r.stdout and "128k (YaRN)" in r.stdout


def test_vram_on_a_folder(checkpoint_factory):
    folder = checkpoint_factory("mem-tiny", CONFIGS["tiny"], dtype=torch.bfloat16)
    r = vram(folder, "--quant", "nf4", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["experts_total"] == 16


def test_vram_yarn_note():
    r = vram("--ctx-size", "64k")
    assert r.exit_code == 0 and "YaRN" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ctx-size", "0"], "must be positive"),
        (["--ctx-size", "200k"], "past what this model supports"),
        (["--quant", "q2"], "Unknown quantization preset"),
        (["--vram-budget", "1GiB"], "cannot hold this model"),
        (["--kv-dtype", "int4"], "Unknown --kv-dtype"),
        (["--vram-budget", "lots"], "Cannot read 'lots' as a size"),
        (["/nonexistent/folder"], "does not exist"),
    ],
)
def test_vram_bad_inputs(args, message):
    r = vram(*args)
    assert r.exit_code == 2 and message in r.stderr, r.output
