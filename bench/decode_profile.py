"""Where one CPU decode step goes: aten ops per layer, time in the matmul kernels, and the rest.

Two random checkpoints, quantized with the default recipe while loading:
- "ops": Qwen3-30B-A3B's op structure with tiny matrices (48 layers, 128 experts, top-8, hidden
  128): a step is almost all dispatch, Python and allocation, so its ms per token is the overhead;
- "real": the real layer shapes, 2 layers.

    python bench/decode_profile.py [--models ops real] [--steps 16] [--variants before fused torch-int4 layer op]

Each model's step runs "before" (q/k/v as three matmuls, the norms through fp32 and back, as the
step was before issue 22's attention work), "fused" (the fused attention in Python: the layers'
C++ operator, qwenlocal.model.cpu_decode, off), "torch-int4" (as loaded, but the experts' operator
calls torch's int4 kernel per matrix, as it did before its own kernel) and "layer op" (as loaded,
both operators built), interleaved, on one load. Prints, per model and step: ms per token (best of `--steps` plain timed
steps), aten ops per layer (profiler events with no aten op above them, whether Python or a C++
operator issued them), calls from Python per layer (ops with no op above them), the matmul
kernels' time, and the ms per token outside them (the kernels' share of the profiled step, applied
to the plain one: the profiler slows small ops more than kernels, so "outside" is a lower bound).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from common import CACHE, machine, markdown_table, real_shape_checkpoint
from torch.profiler import ProfilerActivity, profile

from quant import cpu_moe
from qwenlocal import load_model
from qwenlocal.model import cpu_decode, qwen3_moe
from qwenlocal.model.qwen3_moe import rms_norm as fused_rms_norm

# The op-structure model (the issue's): real depth, expert count and top-k, tiny widths.
OPS_SHAPE = {
    "num_hidden_layers": 48,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
}
# The ops that read weights: what a memory-bound step should spend its time in.
KERNELS = (
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "aten::mm",
    "aten::addmm",
    "aten::matmul",
    "aten::linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
)
VARIANTS = ("before", "fused", "torch-int4", "layer op")


def ops_checkpoint():
    from qwenlocal.weights.random_checkpoint import write_random_checkpoint

    out = CACHE / "op-structure-48L-h128-bf16"
    if not (out / "model.safetensors.index.json").is_file():
        write_random_checkpoint(out, OPS_SHAPE, dtype=torch.bfloat16, force=True)
    return out


def step_ms(model, cache, token) -> float:
    t = time.perf_counter()
    model(token, cache=cache)
    cache.length -= 1  # the same position every step: equal work
    return 1000 * (time.perf_counter() - t)


def reference_rms_norm(x, weight, eps):
    """The norm as the step computed it before issue 22's attention work: through fp32 and back."""
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


@contextmanager
def variant(model, name: str):
    """ "before": q/k/v as three matmuls and the norms through fp32 (what the step did before the
    fused projection); "fused": the fused projection, the layers in Python; "torch-int4": as loaded,
    the experts' operator with torch's kernel per matrix (block 0); "layer op": the step as loaded."""
    if name == "layer op":
        yield
        return
    if name == "torch-int4":
        experts = model.experts
        args = experts.fused_args() if hasattr(experts, "fused_args") else None
        if args is not None:
            experts._fused = (*args[:-1], 0)
        try:
            yield
        finally:
            if args is not None:
                experts._fused = args
        return
    layers = model.model.layers
    saved = [(layer.decode_args, layer.self_attn.qkv) for layer in layers]
    for layer in layers:
        layer.__dict__["decode_args"] = None
        if name == "before":
            layer.self_attn.__dict__["qkv"] = None
    if name == "before":
        qwen3_moe.rms_norm = reference_rms_norm
    try:
        yield
    finally:
        qwen3_moe.rms_norm = fused_rms_norm
        for layer, (args, qkv) in zip(layers, saved, strict=True):
            layer.__dict__["decode_args"] = args
            layer.self_attn.__dict__["qkv"] = qkv


@torch.inference_mode()
def profile_model(folder, recipe: str, steps: int, variants: list[str]) -> dict:
    model = load_model(folder, dtype=torch.bfloat16, quant=recipe)
    if not cpu_decode.OPERATOR.build():
        raise SystemExit("the layer operator did not build here (no C++ compiler?)")
    cpu_moe.OPERATOR.build()  # the experts' operator ready before the first step (else built in the background)
    cache = model.new_cache(64)
    model(torch.arange(8).view(1, 8), cache=cache)
    token = torch.tensor([[11]])
    for name in variants:
        with variant(model, name):
            for _ in range(3):  # warm-up: probes, scratch buffers
                step_ms(model, cache, token)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(steps):  # interleaved, best of `steps`: the machine may be loaded
        for name in variants:
            with variant(model, name):
                best[name] = min(best[name], step_ms(model, cache, token))
    return {name: profile_step(model, cache, token, best[name], name) for name in variants}


def profile_step(model, cache, token, ms: float, name: str) -> dict:
    with variant(model, name), profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        model(token, cache=cache)
        profiled_us = 1e6 * (time.perf_counter() - t)
    cache.length -= 1
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::") and not _has_parent(e, "aten::")]
    from_python = [e for e in events if "::" in e.name and not _has_parent(e, "")]
    counts = Counter(e.name for e in top)
    # the profiler slows the small ops more than the kernels: the kernels' share of the profiled
    # step, applied to the unprofiled one, is an upper bound on their time
    share = min(1.0, sum(e.cpu_time_total for e in top if e.name in KERNELS) / profiled_us)
    layers = model.config.num_hidden_layers
    return {
        "ms": ms,
        "ops": len(top),
        "ops_per_layer": len(top) / layers,
        "python_per_layer": len(from_python) / layers,
        "kernel_ms": ms * share,
        "outside_ms": ms * (1 - share),
        "top": counts.most_common(12),
        "recipe": model.recipe.describe() if model.recipe else "16-bit",
    }


def _has_parent(e, prefix: str) -> bool:
    """Whether an op whose name starts with `prefix` (any op, for "") is above e."""
    p = e.cpu_parent
    while p is not None:
        if "::" in p.name and p.name.startswith(prefix):
            return True
        p = p.cpu_parent
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["ops", "real"], choices=["ops", "real"])
    ap.add_argument("--recipe", default="mixed")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    print(f"machine: {machine()}; {torch.get_num_threads()} threads")
    rows = []
    for name in args.models:
        folder = ops_checkpoint() if name == "ops" else real_shape_checkpoint(2)
        results = profile_model(folder, args.recipe, args.steps, args.variants)
        label = "op structure (48 L, hidden 128)" if name == "ops" else "real shapes, 2 L"
        for v, r in results.items():
            rows.append(
                [
                    label,
                    v,
                    f"{r['ms']:.2f}",
                    f"{results[args.variants[0]]['ms'] / r['ms']:.2f}x",
                    r["ops"],
                    f"{r['ops_per_layer']:.0f}",
                    f"{r['python_per_layer']:.0f}",
                    f"{r['kernel_ms']:.2f}",
                    f"{r['outside_ms']:.2f}",
                ]
            )
            print(f"{label} {v} ({r['recipe']}), most frequent top-level ops in one step:")
            print(", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in r["top"]))
    print()
    print(
        markdown_table(
            [
                "model",
                "step",
                "ms / token",
                f"speed vs {args.variants[0]}",
                "aten ops / token",
                "aten ops / layer",
                "calls from Python / layer",
                "matmul kernels ms",
                "outside kernels ms",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
