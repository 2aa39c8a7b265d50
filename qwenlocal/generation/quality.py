"""The quality check after quantizing: per-class weight error, and logits of the quantized model
against the original on a fixed probe text (KL divergence, top-1 agreement)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenlocal.experts.store import Experts, swiglu
from qwenlocal.generation.tokenizer import Tokenizer
from qwenlocal.model.names import EXPERT_PROJS, expert_tensor_name
from qwenlocal.model.qwen3_moe import Qwen3MoeForCausalLM
from qwenlocal.weights.checkpoint import Checkpoint
from qwenlocal.weights.loader import load_dense, load_model
from qwenlocal.weights.sources import open_source, quant_method

PROBE_TOKENS = 256
REPORT_NAME = "quant_report.json"
PROBE_TEXT = (
    "The history of mathematics spans thousands of years, from counting marks on bones to the "
    "abstract structures of modern algebra. Babylonian scribes solved quadratic equations on clay "
    "tablets; Greek geometers proved that there are infinitely many primes. In the seventeenth "
    "century Newton and Leibniz developed calculus independently, and the notation of Leibniz is "
    "the one we still write today.\n\n"
    "def fibonacci(n: int) -> list[int]:\n"
    "    a, b = 0, 1\n"
    "    out = []\n"
    "    for _ in range(n):\n"
    "        out.append(a)\n"
    "        a, b = b, a + b\n"
    "    return out\n\n"
    "量子计算利用叠加和纠缠来处理信息。与经典比特不同，量子比特可以同时处于多个状态。"
    "Die Photosynthese wandelt Lichtenergie in chemische Energie um und setzt dabei Sauerstoff frei. "
    "Q: What is the capital of Australia? A: Canberra, not Sydney, is the capital of Australia."
)


class MmapExperts(Experts):
    """The original 16-bit experts, read from the checkpoint's memory map when used: the reference
    model costs no second copy of the experts in RAM."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        super().__init__(ckpt.config)
        self.ckpt, self.device, self.dtype = ckpt, device, dtype

    def expert_forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        w = {
            p: self.ckpt.get(expert_tensor_name(layer, expert, p)).to(self.device, self.dtype)
            for p in EXPERT_PROJS
        }
        return swiglu(x, torch.cat([w["gate_proj"], w["up_proj"]]), w["down_proj"])


def reference_model(folder: Path, device: torch.device, dtype: torch.dtype) -> Qwen3MoeForCausalLM:
    ckpt = open_source(folder, dtype)  # an FP8 or GPTQ source: its weights dequantized
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(ckpt.config, MmapExperts(ckpt, device, dtype))
    load_dense(model, ckpt, device, dtype)
    return model.eval()


def reference_name(folder: Path) -> str:
    """What the report compares against: the source as it is, or a pre-quantized source dequantized."""
    method = quant_method(Checkpoint(folder).config)
    if method is None:
        return "the 16-bit source"
    return (
        f"the {method} source's own weights dequantized in fp32; nothing here compares against the "
        "original bf16 model, which a pre-quantized checkpoint does not carry"
    )


def probe_ids(folder: Path, n: int) -> torch.Tensor:
    ids = Tokenizer.from_dir(folder).encode(PROBE_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor([ids[:n]])


@torch.inference_mode()
def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """ref, got: [T, V] logits -> mean KL(ref || got), top-1 agreement, max |diff|."""
    logp, logq = F.log_softmax(ref.float(), -1), F.log_softmax(got.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {
        "positions": ref.shape[0],
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
    }


def quality_report(
    src: Path, out: Path, stats: dict, probe_tokens: int = PROBE_TOKENS, device: torch.device | None = None
) -> dict:
    """Compare OUT against SRC on the probe text and write OUT/quant_report.json."""
    device = device or torch.device("cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ids = probe_ids(src, probe_tokens).to(device)
    ref_logits = reference_model(src, device, dtype)(ids)[0]
    # on a GPU the quantized model may not fit beside the reference: let its experts offload
    budget = "auto" if device.type == "cuda" else None
    quant_logits = load_model(out, device=device, dtype=dtype, vram_budget=budget)(ids)[0]
    report = {
        "reference": reference_name(src),
        "probe_tokens": int(ids.shape[1]),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "logits": compare_logits(ref_logits, quant_logits),
        "weights": {
            cls: {"rel_error": c["rel_weight_error"], "bits_per_weight": c["bits_per_weight"]}
            for cls, c in stats["classes"].items()
        },
    }
    tmp = out / f".{REPORT_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.rename(out / REPORT_NAME)
    return report
