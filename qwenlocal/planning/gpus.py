"""Which GPUs a plan fits, and how fast to expect it there.

The card table (`data/gpus.json`) holds the makers' figures: memory, peak bandwidth, PCIe link.
`fit_card` sizes the expert cache for a card with the one memory model (`fit_expert_slots`) and
`decode_speed` turns the plan into a tok/s range: every token reads the resident part at the
card's bandwidth, and the experts the cache misses, at the hit rate the LRU simulator gives for
that residency (`data/hit_rates.json`), cross PCIe. Both ends of the range are bounds from
published figures, not measurements; the assumptions are the named constants below.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from qwenlocal.errors import UserError
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.graphs import kv_bucket
from qwenlocal.planning.cache_sim import HIT_RATE_TABLE
from qwenlocal.planning.memory import GIB, Estimate, Plan, fit_expert_slots

DATA = Path(__file__).parent.parent / "data"
GPU_TABLE = DATA / "gpus.json"

# Kept free on a table card: a desktop's display and the driver's own reservation (an H100 80 GB
# reports 0.35 GiB less than 80 GiB; a desktop takes 0.3-1 GiB). The CUDA context is in the
# memory model already. `--gpu auto` uses the free memory it reads instead.
DESKTOP_RESERVE_BYTES = 512 * 1024**2
ECC_SHARE = 1 / 16  # GDDR with ECC on keeps 6.25 % for ECC bits (CUDA C++ Best Practices Guide)
# Pinned host-to-device copy rate of an x16 link, GB/s: what cudaMemcpy reaches, not the link's
# nominal 16/32/64 GB/s (kekzl/imp's Qwen3-30B-A3B expert cache, GitHub PRs #1359/#1365/#1374,
# measured 25.6 GB/s pinned on PCIe 4.0 x16). Scaled by lanes / 16.
PINNED_COPY_GBS_X16 = {3: 12.0, 4: 25.0, 5: 50.0}
# Low end of the range: decode kernels at batch 1 reach about half of peak bandwidth (small
# matrices, dequantization, launch gaps), and each missed expert costs a fixed copy, launch and
# synchronisation overhead on top of its bytes. kekzl/imp (the PRs above) ran 25 tok/s at 88.7 %
# hits against 311 all-resident: (1/25 - 1/311) s over ~43 misses is ~0.85 ms a miss, of which
# ~0.15 ms moving the bytes.
# A decoder layer also costs kernel launches and synchronisation whatever it reads: llama.cpp's
# published 219 tok/s (GGUF Q4_K_M, every expert on an RTX 5090) is 4.6 ms a token, where its
# ~2 GB read takes 1.1 ms.
BANDWIDTH_EFFICIENCY_LOW = 0.55
MISS_OVERHEAD_S = 0.7e-3
LAYER_OVERHEAD_S = 50e-6
# The conversation length the speed is given for: a decode step reads the keys it has reached
# (rounded up to a KV span), not the whole context.
SPEED_AT_TOKENS = 2048
BANDWIDTH_EFFICIENCY_HIGH = 1.0  # high end: peak bandwidth and the pinned copy rate, nothing else
# `--cold-experts cpu` (cold.py): a missed expert is read by the CPU at its memory bandwidth
# instead of crossing PCIe. Low end: half the measured bandwidth (three GEMVs a expert, threads
# split between workers), the CPU not overlapping the GPU, and a hidden-state round trip with a
# synchronisation in every layer that misses. High end: CPU and GPU fully overlapped.
CPU_EFFICIENCY_LOW = 0.5
COLD_LAYER_OVERHEAD_S = 40e-6
CPU_PROBE_BYTES = 128 * 1024**2


@dataclass(frozen=True)
class Gpu:
    """One card: the makers' figures. `bandwidth_gbs` is None for an installed card that the table
    does not know (its speed cannot be estimated)."""

    name: str
    memory_gib: float
    bandwidth_gbs: float | None
    pcie_gen: int | None = None
    pcie_lanes: int | None = None
    ecc: bool = False
    aliases: tuple[str, ...] = ()
    device_names: tuple[str, ...] = ()
    source: str = ""

    @property
    def usable_bytes(self) -> int:
        """Memory a program can allocate: the marketed size, less the ECC share when ECC is on."""
        return int(self.memory_gib * GIB * (1 - ECC_SHARE if self.ecc else 1))

    @property
    def budget(self) -> int:
        """What the plan may use: usable memory less the desktop and driver reserve."""
        return self.usable_bytes - DESKTOP_RESERVE_BYTES

    @property
    def pcie_gbs(self) -> float | None:
        """Pinned host-to-device copy rate, GB/s."""
        if self.pcie_gen not in PINNED_COPY_GBS_X16 or not self.pcie_lanes:
            return None
        return PINNED_COPY_GBS_X16[self.pcie_gen] * self.pcie_lanes / 16

    @property
    def link(self) -> str:
        return f"PCIe {self.pcie_gen}.0 x{self.pcie_lanes}" if self.pcie_gen else "PCIe (unknown)"


@cache
def gpu_table() -> tuple[Gpu, ...]:
    with open(GPU_TABLE, encoding="utf-8") as f:
        rows = json.load(f)["gpus"]
    return tuple(
        Gpu(
            **{
                **row,
                "aliases": tuple(row.get("aliases", ())),
                "device_names": tuple(row.get("device_names", ())),
            }
        )
        for row in rows
    )


def _key(name: str) -> str:
    """'NVIDIA GeForce RTX 4060 Ti', 'rtx4060ti', '4060 Ti' -> '4060ti'; '8GB' and '8' alike."""
    k = re.sub(r"[^a-z0-9]", "", name.lower())
    for prefix in ("nvidia", "geforce", "tesla", "rtx"):
        k = k.removeprefix(prefix)
    return k.removesuffix("gb")


def _keys(gpu: Gpu) -> set[str]:
    return {_key(n) for n in (gpu.name, *gpu.aliases, *gpu.device_names)}


def _known() -> str:
    return ", ".join(g.name for g in gpu_table())


def find_gpu(name: str) -> Gpu:
    """A card by name or alias, in any case and spacing: '4090', 'RTX 4090', 'a100-80'."""
    matches = [g for g in gpu_table() if _key(name) in _keys(g)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(
            f"--gpu {name!r} could be {' or '.join(g.name for g in matches)}; "
            f"name one: {', '.join(g.aliases[0] if g.aliases else g.name for g in matches)}."
        )
    raise UserError(
        f"Unknown GPU {name!r}; known: {_known()} (any case or spacing: 4090, rtx4090, RTX 4090), or auto."
    )


def match_device(device_name: str, total_bytes: int) -> Gpu | None:
    """The table card a CUDA device name stands for; variants (4060 Ti 8/16 GB) told apart by the
    memory the device reports, within 10 %. None when the table does not know it."""
    key = _key(device_name)
    matches = [g for g in gpu_table() if key in _keys(g)]
    matches = [g for g in matches if abs(total_bytes - g.usable_bytes) <= 0.1 * g.usable_bytes]
    return min(matches, key=lambda g: abs(total_bytes - g.usable_bytes), default=None)


def auto_budget(device) -> int:
    """`--vram-budget auto`: the free memory the GPU reports, less what the desktop keeps."""
    import torch

    if device.type != "cuda":
        raise UserError("--vram-budget auto needs a CUDA GPU; give a size (e.g. 8GiB) or --gpu-experts.")
    free, _ = torch.cuda.mem_get_info(device)
    return free - DESKTOP_RESERVE_BYTES


def installed_gpu(device_index: int = 0) -> tuple[Gpu, int]:
    """The installed card and the budget `--vram-budget auto` would use (auto_budget). Bandwidth
    comes from the table when the name is known."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--gpu auto needs a CUDA GPU and none is visible; name a card, e.g. --gpu 4090.")
    try:
        device = torch.device("cuda", device_index)
        name = torch.cuda.get_device_name(device)
        _, total = torch.cuda.mem_get_info(device)
        budget = auto_budget(device)
    except RuntimeError as e:
        raise UserError(f"Could not query the CUDA device: {e}") from None
    known = match_device(name, total)
    gpu = Gpu(
        name=name,
        memory_gib=total / GIB,
        bandwidth_gbs=known.bandwidth_gbs if known else None,
        pcie_gen=known.pcie_gen if known else None,
        pcie_lanes=known.pcie_lanes if known else None,
        source=f"this machine (table: {known.name})" if known else "this machine",
    )
    return gpu, budget


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- hit rates


@cache
def _hit_points() -> tuple[tuple[float, float], ...]:
    with open(HIT_RATE_TABLE, encoding="utf-8") as f:
        return tuple((float(x), float(y)) for x, y in json.load(f)["points"])


def expected_hit_rate(resident: float) -> float:
    """Expected LRU hit rate at a residency fraction, interpolated in the table (clamped)."""
    points = _hit_points()
    if resident >= 1.0:
        return 1.0
    if resident <= points[0][0]:
        return points[0][1]
    i = bisect_left([x for x, _ in points], resident)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (resident - x0) / (x1 - x0)


# ---------------------------------------------------------------- speed


@dataclass
class Speed:
    tok_s_low: float
    tok_s_high: float
    hit_rate: float
    bytes_per_token: int  # read from GPU memory per decode step
    misses_per_token: float  # expert copies over PCIe per decode step


def kv_read_bytes(est: Estimate) -> int:
    """KV cache one decode step reads in a conversation of SPEED_AT_TOKENS tokens (or the whole
    context, if shorter): the span of keys the replayed step reads (graphs.kv_bucket), not the
    whole cache."""
    ctx = est.plan.ctx_size
    span = kv_bucket(min(ctx, SPEED_AT_TOKENS), ctx)
    return est.bytes_of("kv_cache") * span // ctx


def bytes_per_step(est: Estimate) -> int:
    """GPU memory one decode step reads: the dense weights (the embedding is a row lookup unless
    it is also the lm_head), the active experts, and the KV span the conversation has reached."""
    config, plan = est.config, est.plan
    dense = sum(
        c.nbytes
        for c in est.components
        if c.where == "gpu"
        and (
            c.name in ("attention", "norms", "routers", "dense_mlp", "lm_head")
            or (c.name == "embed_tokens" and config.tie_word_embeddings)
        )
    )
    experts = len(config.moe_layers) * active_experts(config, plan.batch) * est.expert_bytes
    return int(dense + experts + kv_read_bytes(est))


def active_experts(config: Qwen3MoeConfig, batch: int) -> float:
    """Distinct experts a layer uses per step: top-k for one sequence; for a batch, as if each
    sequence picked independently."""
    e, k = config.num_experts, config.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def decode_speed(est: Estimate, bandwidth_gbs: float, pcie_gbs: float) -> Speed:
    """tok/s = batch / (t_bandwidth + t_pcie): the high end at peak bandwidth and the pinned copy
    rate; the low end at BANDWIDTH_EFFICIENCY_LOW, plus MISS_OVERHEAD_S a miss and LAYER_OVERHEAD_S
    a layer."""
    resident = est.expert_slots / est.experts_total if est.experts_total else 1.0
    hits = expected_hit_rate(resident)
    misses = len(est.config.moe_layers) * active_experts(est.config, est.plan.batch) * (1 - hits)
    read = bytes_per_step(est)
    copy = misses * est.expert_bytes / (pcie_gbs * 1e9)
    high = read / (bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY_HIGH) + copy
    low = read / (bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY_LOW) + copy + misses * MISS_OVERHEAD_S
    low += est.config.num_hidden_layers * LAYER_OVERHEAD_S
    batch = est.plan.batch
    return Speed(batch / low, batch / high, hits, read, misses)


def cpu_decode_speed(est: Estimate, bandwidth_gbs: float, cpu_gbs: float) -> Speed:
    """decode_speed for `--cold-experts cpu`: the missed experts are read by the CPU at `cpu_gbs`
    beside the GPU's own reads (high end: overlapped; low end: one after the other, at
    CPU_EFFICIENCY_LOW, plus COLD_LAYER_OVERHEAD_S in each layer with a miss)."""
    copy = decode_speed(est, bandwidth_gbs, 1.0)  # the same hits and reads; its copy time unused
    misses, layers = copy.misses_per_token, len(est.config.moe_layers)
    cpu_bytes = misses * est.expert_bytes
    gpu_read = copy.bytes_per_token - cpu_bytes
    k = active_experts(est.config, est.plan.batch)
    missing_layers = layers * (1 - copy.hit_rate**k) if misses else 0.0
    gpu_high = gpu_read / (bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY_HIGH)
    high = max(gpu_high, cpu_bytes / (cpu_gbs * 1e9))
    low = gpu_read / (bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY_LOW) + cpu_bytes / (
        cpu_gbs * 1e9 * CPU_EFFICIENCY_LOW
    )
    low += missing_layers * COLD_LAYER_OVERHEAD_S + est.config.num_hidden_layers * LAYER_OVERHEAD_S
    batch = est.plan.batch
    return Speed(batch / low, batch / high, copy.hit_rate, int(gpu_read), misses)


def measure_cpu_bandwidth(nbytes: int = CPU_PROBE_BYTES) -> float:
    """This host's memory read rate with torch's threads, GB/s: a short probe (~0.1 s)."""
    import time

    import torch

    x = torch.ones(nbytes // 4)
    x.sum()  # first touch and thread start-up
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * nbytes / (time.perf_counter() - t) / 1e9


def assumptions() -> dict:
    return {
        "bandwidth_efficiency_low": BANDWIDTH_EFFICIENCY_LOW,
        "bandwidth_efficiency_high": BANDWIDTH_EFFICIENCY_HIGH,
        "miss_overhead_s": MISS_OVERHEAD_S,
        "layer_overhead_s": LAYER_OVERHEAD_S,
        "pinned_copy_gbs_x16": PINNED_COPY_GBS_X16,
        "desktop_reserve_bytes": DESKTOP_RESERVE_BYTES,
        "ecc_share": ECC_SHARE,
        "cpu_efficiency_low": CPU_EFFICIENCY_LOW,
        "cold_layer_overhead_s": COLD_LAYER_OVERHEAD_S,
        "hit_rates": "per-layer LRU on a synthetic Qwen3-30B-A3B routing trace",
        "kv_cache": f"the KV span holding {SPEED_AT_TOKENS} tokens of conversation read each token",
    }


def assumptions_text(gpu: Gpu | None = None) -> str:
    """One plain sentence for the CLI, naming the card's own figures when there is one."""
    bw = f"the card's {gpu.bandwidth_gbs:,g} GB/s" if gpu and gpu.bandwidth_gbs else "peak bandwidth"
    link = (
        f"{gpu.pcie_gbs:g} GB/s pinned ({gpu.link})"
        if gpu and gpu.pcie_gbs
        else (
            "the pinned rate of the card's link ("
            + ", ".join(f"PCIe {g}.0 x16 {r:g} GB/s" for g, r in PINNED_COPY_GBS_X16.items())
            + "; x8 half)"
        )
    )
    return (
        f"estimate: assumes each token reads the dense weights, its active experts and the KV "
        f"span of a conversation {SPEED_AT_TOKENS:,} tokens in at {bw} (high end) or at {BANDWIDTH_EFFICIENCY_LOW * 100:.0f} % of it plus "
        f"{LAYER_OVERHEAD_S * 1e3:g} ms per layer (low end); experts missing at the per-layer LRU hit "
        f"rate of a synthetic Qwen3-30B-A3B trace are copied at {link}, plus "
        f"{MISS_OVERHEAD_S * 1e3:g} ms each at the low end; {DESKTOP_RESERVE_BYTES / GIB:g} GiB is "
        "kept for the display and driver"
        + ("" if gpu and not gpu.ecc else ", and ECC cards lose 6.25 % of their memory")
        + ". Bounds from spec sheets, not measurements."
    )


# ---------------------------------------------------------------- plans per card


@dataclass
class CardPlan:
    """A plan sized for one card: the estimate (None when even the minimum cache does not fit)
    and the speed range (None when the card's bandwidth is unknown)."""

    gpu: Gpu
    budget: int
    est: Estimate | None
    speed: Speed | None
    error: str | None = None
    cpu_speed: Speed | None = None  # --cold-experts cpu, when the CPU's bandwidth is known

    @property
    def cold_experts(self) -> str | None:
        """The faster --cold-experts mode on this card (by the middle of each range); None when
        nothing misses or a speed is unknown."""
        if self.speed is None or self.cpu_speed is None or self.est.all_resident:
            return None
        mid = [s.tok_s_low + s.tok_s_high for s in (self.speed, self.cpu_speed)]
        return "cpu" if mid[1] > mid[0] else "copy"

    @property
    def fits(self) -> bool:
        return self.est is not None

    @property
    def resident_fraction(self) -> float:
        return self.est.expert_slots / self.est.experts_total if self.est else 0.0

    def as_dict(self) -> dict:
        return {
            "name": self.gpu.name,
            "memory_gib": round(self.gpu.memory_gib, 2),
            "budget_bytes": self.budget,
            "fits": self.fits,
            "all_resident": bool(self.est and self.est.all_resident),
            "expert_slots": self.est.expert_slots if self.est else 0,
            "resident_fraction": round(self.resident_fraction, 4),
            "hit_rate": round(self.speed.hit_rate, 4) if self.speed else None,
            "tok_s_low": round(self.speed.tok_s_low, 1) if self.speed else None,
            "tok_s_high": round(self.speed.tok_s_high, 1) if self.speed else None,
            "bandwidth_gbs": self.gpu.bandwidth_gbs,
            "pcie_gbs": self.gpu.pcie_gbs,
            "cpu_tok_s_low": round(self.cpu_speed.tok_s_low, 1) if self.cpu_speed else None,
            "cpu_tok_s_high": round(self.cpu_speed.tok_s_high, 1) if self.cpu_speed else None,
            "cold_experts": self.cold_experts,
        }


def fit_card(
    config: Qwen3MoeConfig, plan: Plan, gpu: Gpu, budget: int | None = None, cpu_gbs: float | None = None
) -> CardPlan:
    """The largest expert cache that fits the card (all experts when they all fit), and its speed;
    with the CPU's bandwidth `cpu_gbs`, also its speed with cold experts computed on the CPU."""
    budget = gpu.budget if budget is None else budget
    try:
        est = fit_expert_slots(config, plan.replace(expert_slots=None), budget)
    except UserError as e:
        return CardPlan(gpu, budget, None, None, str(e))
    speed = None
    if gpu.bandwidth_gbs and gpu.pcie_gbs:
        speed = decode_speed(est, gpu.bandwidth_gbs, gpu.pcie_gbs)
    cpu = cpu_decode_speed(est, gpu.bandwidth_gbs, cpu_gbs) if gpu.bandwidth_gbs and cpu_gbs else None
    return CardPlan(gpu, budget, est, speed, cpu_speed=cpu)


def recommendations(config: Qwen3MoeConfig, plan: Plan, cpu_gbs: float | None = None) -> list[CardPlan]:
    """Every table card: all resident first (smallest card first), then partly resident (most
    resident first, then fastest), then those that cannot hold the minimum cache."""

    def order(cp: CardPlan):
        if not cp.fits:
            return (2, -cp.gpu.memory_gib, cp.gpu.name)
        if cp.est.all_resident:
            return (0, cp.gpu.memory_gib, -(cp.speed.tok_s_high if cp.speed else 0))
        return (1, -cp.resident_fraction, -(cp.speed.tok_s_high if cp.speed else 0))

    return sorted((fit_card(config, plan, g, cpu_gbs=cpu_gbs) for g in gpu_table()), key=order)


def speed_range(speed: Speed | None) -> str:
    """'~14-47 tok/s', with a decimal below 10."""
    if speed is None:
        return "speed unknown"

    def fmt(x: float) -> str:
        return f"{x:.1f}" if x < 10 else f"{x:,.0f}"

    return f"~{fmt(speed.tok_s_low)}-{fmt(speed.tok_s_high)} tok/s"
