"""Quality per bit: weight error and the quality report's KL / top-1 for each 4- and 8-bit format.

A random model (2 layers, hidden 512, 16 experts of 256, real vocabulary) with Gaussian or
Student-t(3) weights (heavy tails, like real weights' outliers) is quantized while loading with
one format for attention and experts (lm_head kept 16-bit, to isolate the format); its logits on
the quality report's probe text are compared with the 16-bit model's (fp32 compute). The weight
error is over every expert matrix. int4 "min/max" is the plain range fit; the others use the
default least-squares refit (quant/int4.py).

    python bench/quality.py
    python bench/quality.py --attention    (attention in int8 / int4 g64 / int4 g128, experts int8,
                                            lm_head 16-bit: what 4-bit attention costs, for the recipe)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from common import machine, markdown_table

import qwenlocal.weights.random_checkpoint as rc
from quant import dequantize, int4, quantize
from quant.recipe import Recipe
from qwenlocal import load_model
from qwenlocal.generation.quality import compare_logits, probe_ids
from qwenlocal.weights.checkpoint import Checkpoint

CONFIG = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 4,
}
# name, recipe overrides (attention and experts in the format), int4 refit iterations
FORMATS = [
    ("nf4 + double quant (b64)", {"fmt4": "nf4"}, None),
    ("int4 g32", {"fmt4": "int4", "group_size": 32}, None),
    ("int4 g64", {"fmt4": "int4", "group_size": 64}, None),
    ("int4 g64, min/max", {"fmt4": "int4", "group_size": 64}, 0),
    ("int4 g128", {"fmt4": "int4", "group_size": 128}, None),
    ("int4 g128, min/max", {"fmt4": "int4", "group_size": 128}, 0),
    ("int8 row-wise", {"attn_bits": 8, "expert_bits": 8}, None),
]
# --attention: attention in each format, experts int8 (the loader quantizes both or neither) and
# lm_head 16-bit: the differences between rows are attention's
ATTENTION = [
    ("attention int8 row-wise", {"attn_bits": 8}, None),
    ("attention int4 g64", {"attn_bits": 4, "fmt4": "int4", "group_size": 64}, None),
    ("attention int4 g128", {"attn_bits": 4, "fmt4": "int4", "group_size": 128}, None),
]


def student_t_tensor(name, shape, gen, dtype, device="cpu"):
    """rc.random_tensor's scales, with Student-t(3) draws (unit variance) for the weight matrices."""
    t = rc.gaussian_tensor(name, shape, gen, torch.float32, device)
    if name.endswith("proj.weight") or name == "lm_head.weight":
        chi2 = torch.distributions.Chi2(torch.tensor(3.0)).sample(shape)
        t = t / torch.sqrt(chi2 / 3) / 3**0.5
    return t.to(dtype)


def write(folder: Path, dist: str) -> Path:
    rc.gaussian_tensor = rc.random_tensor
    if dist == "t3":
        rc.random_tensor = student_t_tensor
    try:
        return rc.write_random_checkpoint(folder, CONFIG, dtype=torch.bfloat16)
    finally:
        rc.random_tensor = rc.gaussian_tensor


def weight_error(ckpt: Checkpoint, spec_of, cls: str = "experts") -> tuple[float, float]:
    num = den = bits = n = 0.0
    for name in ckpt.weight_map:
        if (
            (".self_attn." not in name or "norm" in name)
            if cls == "attention"
            else ".mlp.experts." not in name
        ):
            continue
        w = ckpt.get(name)
        spec = spec_of(tuple(w.shape))
        q = quantize(w, spec.fmt, spec.blocksize, spec.double_quant)
        d = dequantize(q, torch.float32)
        num += float((d - w.float()).square().sum())
        den += float(w.float().square().sum())
        bits += q.nbytes * 8
        n += w.numel()
    return (num / den) ** 0.5, bits / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", type=int, default=128)
    ap.add_argument("--attention", action="store_true", help="quantize attention alone")
    args = ap.parse_args()
    formats = ATTENTION if args.attention else FORMATS
    base = {"attn_bits": 4, "expert_bits": 8 if args.attention else 4, "lm_head_bits": 16}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dist in ("gauss", "t3"):
            folder = write(Path(tmp) / dist, dist)
            ids = probe_ids(folder, args.probe)
            with torch.inference_mode():
                ref = load_model(folder, dtype=torch.float32, quant="bf16")(ids)[0]
            ckpt = Checkpoint(folder)
            for name, overrides, refit in formats:
                recipe = dataclasses.replace(Recipe(), **{**base, **overrides}, preset=name)
                saved = int4.REFIT_ITERS
                int4.REFIT_ITERS = saved if refit is None else refit
                try:
                    cls = "attention" if args.attention else "experts"
                    err, bpw = weight_error(ckpt, lambda shape, r=recipe, c=cls: r.spec(c, shape), cls)
                    with torch.inference_mode():
                        got = load_model(folder, dtype=torch.float32, quant=recipe)(ids)[0]
                finally:
                    int4.REFIT_ITERS = saved
                c = compare_logits(ref, got)
                rows.append(
                    [
                        dist,
                        name,
                        f"{bpw:.2f}",
                        f"{err:.4f}",
                        f"{c['kl_mean']:.2e}",
                        f"{100 * c['top1_agreement']:.1f} %",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
            ckpt.close()
    print(f"machine: {machine()}")
    rest = "experts int8, lm_head 16-bit" if args.attention else "lm_head 16-bit"
    print(f"model: random, {CONFIG}, real vocabulary; probe {args.probe} tokens; {rest}")
    print(
        markdown_table(
            [
                "weights",
                "format (attention)" if args.attention else "format (attention + experts)",
                "bits/weight",
                "rel. weight error",
                "KL mean",
                "top-1",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
