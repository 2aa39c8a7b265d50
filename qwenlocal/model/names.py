"""Hugging Face tensor names of a Qwen3-MoE checkpoint, and the recipe class of each tensor.

The one place that spells names: the checkpoint reader, the loader, the quantizer and the
memory model read them from here, so a checkpoint and the code can be read side by side."""

from __future__ import annotations

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def expert_blob_name(layer: int, expert: int) -> str:
    """One expert's gate, up and down projections packed together (a quantized checkpoint)."""
    return f"model.layers.{layer}.mlp.experts.{expert}.blob"


def is_blob_name(name: str) -> bool:
    return name.endswith(".blob")


def blob_layer_expert(name: str) -> tuple[int, int]:
    """(layer, expert) of an `expert_blob_name`."""
    parts = name.split(".")
    return int(parts[2]), int(parts[5])


def tensor_class(name: str) -> str | None:
    """The recipe class of a checkpoint tensor, or None for tensors that stay 16-bit."""
    if not name.endswith(".weight"):
        return None
    if ".self_attn." in name and name.split(".")[-2] in ATTENTION_PROJS:
        return "attention"
    if name == "lm_head.weight":
        return "lm_head"
    if ".mlp." in name and name.split(".")[-2] in EXPERT_PROJS:
        return "experts"  # routed experts and the dense MLP of mlp_only layers
    return None
