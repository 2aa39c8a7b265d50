"""Cold experts computed on the CPU (`--cold-experts`): on the CPU device the "GPU" side is the
CPU too, so `cpu` and `auto` must give the resident model's logits and tokens bit for bit at every
cache size; the counters add up on a scripted routing computed by hand; a promoted expert is served
from its slot; the split of `auto` is a pure function tested on its own."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from quant import cpu_dequant, kernels
from quant.int4 import cpu_packing
from qwenlocal import UserError, load_model
from qwenlocal.experts import cold
from qwenlocal.experts.cold import ColdExperts, Timing, cold_report, should_promote, split_misses
from qwenlocal.experts.offload import OffloadedExperts
from qwenlocal.experts.store import QuantExperts

from . import test_offload
from .test_offload import LAYERS, PROMPT, greedy

qckpt = test_offload.qckpt  # the offload tests' quantized folder: 8 experts, top-2, 3 MoE layers


@pytest.fixture(scope="module")
def resident(qckpt):
    return load_model(qckpt, dtype=torch.float32)


def count_picks(experts, monkeypatch) -> list[int]:
    """Count the picks independently of the cache: distinct experts per layer per forward."""
    picks = [0]
    record = experts.record

    def counting(layer, ids):
        picks[0] += len(set(ids.flatten().tolist()))
        record(layer, ids)

    monkeypatch.setattr(experts, "record", counting)
    return picks


@pytest.mark.parametrize(
    "mode, per_layer", [("copy", 3)] + [(m, n) for m in ("cpu", "auto") for n in (2, 3, 5, 7)]
)
def test_equals_resident(qckpt, resident, per_layer, mode, monkeypatch):
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=per_layer * LAYERS, cold_experts=mode)
    experts = model.experts
    picks = count_picks(experts, monkeypatch)
    assert isinstance(experts, OffloadedExperts) and (mode == "copy") != isinstance(experts, ColdExperts)
    prompt = torch.tensor([PROMPT])
    assert torch.equal(model(prompt), resident(prompt))
    assert greedy(model) == greedy(resident)
    s = experts.stats.total()
    assert s.hits + s.misses == picks[0]
    if mode == "cpu":  # every miss ran on the CPU; copies are promotions only
        assert s.cpu_computed == s.misses and s.cpu_computed > 0
        assert s.bytes_copied == s.promoted * experts.layout.nbytes
    if mode == "auto":  # measured on the first forward, then kept current
        t = experts.timing
        assert t is not None and t.copy_s > 0 and t.cpu_s > 0 and t.cpu_token_s >= 0
    if mode != "copy":
        assert s.bytes_copied == (s.misses - s.cpu_computed + s.promoted) * experts.layout.nbytes


def test_auto_splits_and_equals_resident(qckpt, resident, monkeypatch):
    """Times fixed so that `auto` sends half of each layer's misses to the CPU, half to copies;
    several workers share the work."""
    monkeypatch.setattr(cold, "EMA", 0.0)
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=2 * LAYERS, cold_experts="auto")
    experts = model.experts
    picks = count_picks(experts, monkeypatch)
    experts.timing = Timing(copy_s=1.0, cpu_s=1.0, cpu_token_s=0.0)
    experts.set_workers(1)
    assert greedy(model) == greedy(resident)
    s = experts.stats.total()
    copied = s.misses - s.cpu_computed
    assert s.cpu_computed > 0 and copied > 0
    assert s.hits + s.cpu_computed + copied == picks[0]
    experts.set_workers(3)
    long_prompt = torch.tensor([list(range(100, 400, 3))])
    assert torch.equal(model(long_prompt), resident(long_prompt))


def test_scripted_counters_and_promotion(qckpt, resident, monkeypatch):
    """One layer, 3 slots, LRU, top-2, `cpu`: hand-computed hits, CPU computations and promotions.
    A CPU-computed expert takes a free slot at once; with the slots full it needs a decayed count
    of PROMOTE_AFTER (2) computations (decay 0.9 per CPU step of the layer)."""
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS, policy="lru", cold_experts="cpu")
    experts, layer = model.experts, 0
    on_cpu: list[int] = []
    real = experts._cpu_expert

    def spy(layer_, expert, x):
        on_cpu.append(expert)
        return real(layer_, expert, x)

    monkeypatch.setattr(experts, "_cpu_expert", spy)
    x = torch.randn(1, model.config.hidden_size)
    w = torch.tensor([[0.6, 0.4]])
    script = [
        # ids, resident after, hits, computed on the CPU, promoted
        ((0, 1), {0, 1}, 0, [0, 1], 2),  # free slots: both promoted at once
        ((2, 0), {0, 1, 2}, 1, [2], 1),
        ((3, 4), {0, 1, 2}, 0, [3, 4], 0),  # full: a count of 1 is not enough
        ((0, 2), {0, 1, 2}, 2, [], 0),
        ((3, 0), {0, 1, 2}, 1, [3], 0),  # 3's count: 1 × 0.9 + 1 = 1.9
        ((3, 1), {0, 1, 3}, 1, [3], 1),  # 1.9 × 0.9 + 1 = 2.71: promoted, evicting LRU's 2
        ((3, 2), {0, 1, 3}, 1, [2], 0),  # 3 is served from its slot; 2 (count 1) is not promoted
    ]
    st = experts.stats.layers[layer]
    for ids, resident_after, hits, cpu, promoted in script:
        before = (st.hits, st.cpu_computed, st.promoted, st.misses)
        on_cpu.clear()
        ids_t = torch.tensor([ids])
        with torch.inference_mode():
            got = experts(layer, x, ids_t, w)
            want = QuantExperts.forward(resident.experts, layer, x, ids_t, w)
        assert torch.equal(got, want)
        assert sorted(on_cpu) == cpu
        assert set(experts.policies[layer].resident()) == resident_after
        assert {e for (lay, e) in experts.slot_of if lay == layer} == resident_after
        after = (st.hits, st.cpu_computed, st.promoted, st.misses)
        assert tuple(a - b for a, b in zip(after, before, strict=True)) == (
            hits,
            len(cpu),
            promoted,
            len(cpu),
        )
    assert (st.hits, st.cpu_computed, st.promoted) == (6, 8, 4)
    assert st.hits + st.cpu_computed + (st.misses - st.cpu_computed) == 14  # picks
    assert st.bytes_copied == 4 * experts.layout.nbytes  # promotions only
    report = cold_report(experts.stats, experts)
    assert report["layers"]["0"]["cpu_computed"] == 8 and report["layers"]["0"]["promoted"] == 4
    assert report["total"]["copied"] == 0 and report["mode"] == "cpu"


def test_cold_int4_experts_run_torchs_int4_kernel(qckpt, monkeypatch):
    """The host store keeps int4 in this CPU's kernel layout, as the resident model does: a cold
    expert (bf16, one token) runs torch's int4 kernel in the pool for every projection in that
    layout, and the model in bf16 equals the resident one bit for bit."""
    packing = cpu_packing()
    if packing is None:
        pytest.skip("torch's CPU int4 layout is not one quant.int4 reads: the blobs stay as stored")
    resident = load_model(qckpt, dtype=torch.bfloat16)
    model = load_model(qckpt, dtype=torch.bfloat16, gpu_experts=2 * LAYERS, cold_experts="cpu")
    experts = model.experts
    packed = [name for name, s in experts.layout.specs.items() if s.fmt == "int4" and s.packing == packing]
    assert packed and experts.layout == resident.experts.layout
    # the crossover probe runs its own int4 calls, once, and again when the C++ dequantize gets
    # ready: it stays as it is during the counts
    monkeypatch.setattr(cpu_dequant.OPERATOR, "off", True)
    kernels.kernel_max_rows("int4")
    calls: list[str] = []
    real = kernels.int4_kernel_cpu

    def counting(x, q):
        calls.append(threading.current_thread().name)
        return real(x, q)

    monkeypatch.setattr(kernels, "int4_kernel_cpu", counting)
    x = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    w = torch.tensor([[0.6, 0.4]], dtype=torch.bfloat16)
    st = experts.stats.layers[0]
    for ids in ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2)):  # 0 and 1 take the free slots, then hits
        before = st.cpu_computed
        calls.clear()
        ids_t = torch.tensor([ids])
        with torch.inference_mode():
            got = experts(0, x, ids_t, w)
            want = QuantExperts.forward(resident.experts, 0, x, ids_t, w)
        assert torch.equal(got, want)
        on_cpu = st.cpu_computed - before
        assert sum(name.startswith("cold-expert") for name in calls) == on_cpu * len(packed)
    assert st.cpu_computed == 9
    prompt = torch.tensor([PROMPT])
    assert torch.equal(model(prompt), resident(prompt))
    assert greedy(model) == greedy(resident)


def test_split_misses_by_hand():
    t = Timing(copy_s=100e-6, cpu_s=180e-6, cpu_token_s=0.0)
    # 6 one-token misses, 4 workers: k CPU jobs take max(180, 180k/4) µs, copies 100(6-k) µs;
    # k = 0..6 -> 600, 500, 400, 300, 200, 225, 270: four on the CPU, two copied
    assert split_misses([1] * 6, t, workers=4) == 4
    assert split_misses([], t, workers=4) == 0
    assert split_misses([1] * 6, Timing(1.0, 1e-9, 0.0), workers=1) == 6  # a free CPU takes all
    assert split_misses([1] * 6, Timing(1e-9, 1.0, 0.0), workers=8) == 0  # free copies take all
    # a prefill: the rare experts on the CPU, the busy ones copied (cost 1 + (n - 1) per expert)
    prefill = Timing(copy_s=3.0, cpu_s=1.0, cpu_token_s=1.0)
    assert split_misses([40, 1, 60, 2], prefill, workers=2) == 2
    assert split_misses([1, 1], Timing(1.0, 1.0, 0.0), workers=1) == 1  # 2, 1, 2
    assert split_misses([1], Timing(1.0, 1.0, 0.0), workers=1) == 1  # a tie: no copy


def test_should_promote():
    assert should_promote(1.0, free_slot=True)
    assert not should_promote(1.9, free_slot=False)
    assert should_promote(2.0, free_slot=False)


def test_bad_mode_is_one_sentence(qckpt):
    with pytest.raises(UserError, match="Unknown --cold-experts 'gpu'; choose copy, cpu or auto."):
        load_model(qckpt, gpu_experts=3 * LAYERS, cold_experts="gpu")


def test_cli_flag(tiny_ckpt):
    from typer.testing import CliRunner

    from qwenlocal.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["generate", str(tiny_ckpt), "Hi", "--cold-experts", "gpu"])
    assert bad.exit_code == 2 and "Unknown --cold-experts 'gpu'" in bad.stderr
    assert "Traceback" not in bad.output
    args = [
        "generate",
        tiny_ckpt,
        "Hi",
        "-n",
        3,
        "--temp",
        0,
        "--json",
        "--device",
        "cpu",
        "--quant",
        "mixed",
    ]
    r = runner.invoke(app, [str(a) for a in args] + ["--gpu-experts", "4", "--cold-experts", "cpu"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    total = d["cold_experts"]["total"]
    assert total["cpu_computed"] > 0 and total["copied"] == 0
    assert d["cold_experts"]["layers"] and total["cpu_seconds"] > 0


def test_server_and_chat_show_cpu_work(qckpt):
    from rich.console import Console

    from qwenlocal.app.chat_view import expert_layer_table
    from qwenlocal.generation.engine import Stats, expert_cache_stats
    from qwenlocal.generation.generate import Generator, SamplingParams

    model = load_model(qckpt, dtype=torch.float32, gpu_experts=2 * LAYERS, cold_experts="cpu")
    stats = Stats()
    gen = Generator(model, ctx_size=64, prefill_chunk=8)
    stats.record(gen.run(PROMPT, SamplingParams(temperature=0), max_tokens=3, eos_ids=()))
    d = expert_cache_stats(stats, model)["cold_experts"]
    assert d["mode"] == "cpu" and d["total"]["cpu_computed"] == model.experts.stats.total().cpu_computed > 0
    assert set(d["layers"]) == {str(layer) for layer in model.config.moe_layers}
    console = Console(width=200, record=True)
    console.print(expert_layer_table(stats.expert_cache))
    text = console.export_text()
    assert "on cpu" in text and "overlap" in text


# -- vram --gpu: the speed of the `cpu` mode --------------------------------------------------------
def test_cpu_mode_speed_estimate():
    from qwenlocal.model.config import Qwen3MoeConfig
    from qwenlocal.planning.gpus import find_gpu, fit_card
    from qwenlocal.planning.vram import plan_from_flags

    config = Qwen3MoeConfig.builtin()
    plan = plan_from_flags(config, "mixed", 4096, "bf16", 1, None)
    small, big = find_gpu("4060ti-8"), find_gpu("h200")
    slow, fast = (fit_card(config, plan, small, cpu_gbs=g) for g in (2.0, 200.0))
    assert slow.cold_experts == "copy" and fast.cold_experts == "cpu"
    assert slow.cpu_speed.tok_s_high < fast.cpu_speed.tok_s_high
    assert slow.cpu_speed.tok_s_low < slow.cpu_speed.tok_s_high
    # the GPU reads less in `cpu` mode: the missed experts are read by the CPU
    assert fast.cpu_speed.bytes_per_token < fast.speed.bytes_per_token
    assert fit_card(config, plan, big, cpu_gbs=40.0).cold_experts is None  # all resident: nothing misses
    assert fit_card(config, plan, small).cpu_speed is None  # no CPU figure, no estimate


def test_vram_cpu_bandwidth_flag():
    from typer.testing import CliRunner

    from qwenlocal.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["vram", "--gpu", "4060ti-8", "--cpu-bandwidth", "60", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["gpu"]["cold_experts"] == "cpu" and d["gpu"]["cpu_tok_s_high"] > d["gpu"]["tok_s_high"]
    assert d["speed_assumptions"]["cpu_bandwidth_gbs"] == 60
    text = runner.invoke(app, ["vram", "--cpu-bandwidth", "60"]).stdout
    assert "--cold-experts cpu on" in text and "RTX 4060 Ti 8GB" in text
    bad = runner.invoke(app, ["vram", "--gpu", "4090", "--cpu-bandwidth", "0"])
    assert bad.exit_code == 2 and "--cpu-bandwidth must be positive" in bad.stderr


@pytest.mark.parametrize("openmp", [True, False])
def test_pool_threads_stay_in_the_pool(qckpt, monkeypatch, openmp):
    """Beside a GPU the pool splits the cores between its workers: with OpenMP the count is per
    thread, so each worker sets its own; elsewhere (native or TBB pools) a set would change the
    whole process's, so the pool leaves it alone. Faked: the build's backend, and a process-wide
    set_num_threads that records its calls."""
    from quant import threads

    backend = "ATen parallel backend: OpenMP" if openmp else "ATen parallel backend: native thread pool"
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: backend)
    threads.per_thread.cache_clear()
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    before = torch.get_num_threads()
    try:
        model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS, cold_experts="cpu")
        experts = model.experts
        experts.set_workers(2)
        experts.compute_device = torch.device("cuda")  # the pool's side of a GPU run; nothing runs there
        experts._executor().submit(lambda: None).result()
        experts.set_workers(1)
    finally:
        threads.per_thread.cache_clear()
    assert calls == ([max(1, (os.cpu_count() or 1) // 2)] if openmp else [])
    assert torch.get_num_threads() == before
