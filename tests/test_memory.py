"""The memory model: estimates equal, to the byte, what the loader allocates; the built-in
Qwen3-30B-A3B figures agree with sizes worked out by hand; `qwenlocal vram` prints and refuses clearly."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

from quant.recipe import Recipe
from quant.scratch import release_scratch
from qwenlocal import load_model
from qwenlocal.cli import app
from qwenlocal.generation.generate import Generator
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.planning.memory import (
    GIB,
    activation_terms,
    estimate,
    fit_expert_slots,
    kv_cache_bytes,
    make_plan,
    measure,
    model_plan,
)

from .conftest import DATA, TINY

runner = CliRunner()
CONFIGS = {
    "tiny": {**TINY},
    "dense-layer-bias": {**TINY, "num_hidden_layers": 3, "mlp_only_layers": [1], "attention_bias": True},
    "tied": {**TINY, "tie_word_embeddings": True, "head_dim": 32},
}


def plan(recipe, ctx_size, device="cuda", dtype=torch.bfloat16, **kw):
    return make_plan(recipe=recipe, ctx_size=ctx_size, dtype=dtype, kv_dtype=None, device=device, **kw)


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
    est = estimate(model.config, plan(recipe, 640, "cpu", dtype))
    real = measure(model, gen.cache)
    for name in (*WEIGHTS, "kv_cache", "rope_tables"):
        assert est.bytes_of(name) == cpu_bytes(real, name), name
    assert set(real) <= {*WEIGHTS, "kv_cache", "rope_tables"}


def test_offloaded_estimate_equals_allocated(checkpoint_factory):
    folder = checkpoint_factory("mem-tiny", CONFIGS["tiny"], dtype=torch.bfloat16)
    model = load_model(folder, dtype=torch.bfloat16, quant="mixed", gpu_experts=6)
    est = estimate(model.config, plan(Recipe.from_preset("mixed"), 256, "cpu", expert_slots=6))
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
        est = estimate(c, plan(recipe, 4096))
        assert est.experts_total == 6144
        assert est.bytes_of("experts") / GIB == pytest.approx(gib, abs=0.01), preset
    nodq = Recipe(attn_bits=4, expert_bits=4, fmt4="nf4", double_quant=False, preset="nf4")
    est = estimate(c, plan(nodq, 4096))
    assert est.bytes_of("experts") / GIB == pytest.approx(15.19, abs=0.01)
    bf16 = estimate(c, plan(None, 4096))
    assert bf16.bytes_of("attention") / GIB == pytest.approx(1.69, abs=0.01)
    assert bf16.bytes_of("embed_tokens", "host") / GIB == pytest.approx(0.58, abs=0.01)
    mixed = estimate(c, plan(Recipe.from_preset("mixed"), 4096))
    assert mixed.bytes_of("attention") / GIB == pytest.approx(0.85, abs=0.01)


def test_larger_family_member():
    c = Qwen3MoeConfig.from_file(DATA / "qwen3-235b-a22b-2507" / "config.json")
    est = estimate(c, plan(Recipe.from_preset("mixed"), 32768))
    assert est.experts_total == 94 * 128
    assert kv_cache_bytes(c, 1) == 2 * 94 * 4 * 128 * 2
    assert est.bytes_of("kv_cache") == 32768 * 2 * 94 * 4 * 128 * 2 == 6_308_233_216
    # one int4 g64 expert matrix 1536 x 4096 (or 4096 x 1536), parts 64-byte aligned: codes
    # 1536 * 4096 / 2 = 3,145,728 B, bf16 (scale, zero) per 64 weights: 1536 * 4096 / 64 * 4 = 393,216
    assert est.expert_bytes == 3 * (3145728 + 393216) == 10_616_832
    assert est.bytes_of("experts") == 94 * 128 * 10_616_832
    # the same matrix in NF4 with double quant: codes 3,145,728 B, uint8 absmax 98,304, code book
    # 64, 384 fp32 nested absmax 1,536, nested code book 1,024, offset 4 -> 64
    nf4 = estimate(c, plan(Recipe.from_preset("nf4"), 32768))
    assert nf4.expert_bytes == 3 * (3145728 + 98304 + 64 + 1536 + 1024 + 64) == 9_740_160
    # int8 attention with fp32 row scales: q 8192 x 4096, k and v 512 x 4096, o 4096 x 8192
    rows = 8192 + 512 + 512 + 4096
    assert est.bytes_of("attention") == 94 * (2 * 8192 * 4096 + 2 * 512 * 4096 + 4 * rows)


def test_budget_fits_largest_cache():
    c = Qwen3MoeConfig.builtin()
    p = plan(Recipe.from_preset("mixed"), 8192)
    est = fit_expert_slots(c, p, 8 * GIB)
    assert est.gpu_total <= 8 * GIB
    assert est.expert_slots % 48 == 0 and est.expert_slots >= 8 * 48
    bigger = p.replace(expert_slots=est.expert_slots + 48)
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
    # no model: the checkpoint chat would download, with its own recipe ("gptq" with the int4 format)
    from qwenlocal.planning.vram import read_config
    from qwenlocal.weights.sources import GPTQ_INT4_ID, own_recipe

    expected = own_recipe(read_config(GPTQ_INT4_ID)[0]).preset
    assert d["ctx_size"] == 32768 and d["quant"] == expected and d["experts_total"] == 6144
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


def test_loader_budget_counts_the_kv_dtype():
    """At one budget, an fp8 KV cache frees for experts the bytes it saves, and fp32 takes them."""
    from qwenlocal.model.config import BUILTIN_DIR
    from qwenlocal.planning.plan import plan_load
    from qwenlocal.weights.sources import ModelSource

    c, recipe, ctx = Qwen3MoeConfig.builtin(), Recipe.from_preset("mixed"), 32768
    # by hand: 48 layers x (K and V) x 4 KV heads x 128 dims, one value of each per token
    kv_values = 48 * 2 * 4 * 128 * ctx
    one = estimate(c, plan(recipe, ctx)).expert_bytes
    source, cuda = ModelSource.read(BUILTIN_DIR), torch.device("cuda")
    slots = {
        kv: plan_load(
            source,
            device=cuda,
            dtype=torch.bfloat16,
            ctx_size=ctx,
            quant="mixed",
            vram_budget=16 * GIB,
            kv_dtype=kv,
        ).expert_slots
        for kv in (torch.float8_e4m3fn, torch.bfloat16, torch.float32)
    }
    # 1 byte a value between fp8 and bf16, 2 between bf16 and fp32; slots are whole rounds of 48
    for small, big, saved in ((torch.float8_e4m3fn, torch.bfloat16, 1), (torch.bfloat16, torch.float32, 2)):
        freed = (slots[small] - slots[big]) * one
        assert abs(freed - kv_values * saved) < 48 * one, (small, big)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors ops allocate while the mode is on, live and at their peak: a new
    output storage counts from its op until it is freed (views and in-place results are not new)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.tracked.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)
        }
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or key in inputs or key in self.tracked:
                continue
            self.tracked.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, n)
        return out


@pytest.mark.parametrize("preset", ["bf16", "mixed"])
@pytest.mark.parametrize("chunk, ctx", [(300, 512), (400, 1024)])
def test_activation_estimate_against_a_measured_forward(checkpoint_factory, preset, chunk, ctx):
    """A prefill chunk's forward on the CPU, its tensor allocations summed as they live and die.
    The CPU attention kernel keeps its scores inside itself, so they are left out of the estimate
    here; the rest must hold the measured peak, with at most 2x to spare. The chunks give each of
    the 8 experts about 75-100 rows, past the quantized kernels' crossover on any CPU (64 rows at
    most, quant.kernels.KERNEL_ROWS_LADDER), so the dequantize path's scratch is in use, as the
    estimate counts it."""
    overrides = {**TINY, "hidden_size": 256, "moe_intermediate_size": 128, "intermediate_size": 384}
    folder = checkpoint_factory("mem-activations", {**overrides, "head_dim": 32, "vocab_size": 4096})
    model = load_model(folder, dtype=torch.bfloat16, quant=None if preset == "bf16" else preset)
    cache = model.new_cache(ctx)
    ids = torch.randint(0, 4096, (1, chunk), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :8], cache=cache, last_only=True)  # a chunk after cached tokens, as in a prefill
        release_scratch()  # the dequantize path's kept buffers count whichever test made them first
        with LiveTensorBytes() as measured:
            model(ids, cache=cache, last_only=True)
    terms = activation_terms(model.config, model_plan(model, ctx).replace(prefill_chunk=chunk))
    estimate = sum(terms.values()) - terms["scores"]
    assert 0.5 * estimate <= measured.peak <= estimate, (measured.peak, terms)
