"""Build the model on the meta device, then assign tensors read one by one from the memory map:
loading never holds the checkpoint in RAM twice."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, ProgressFn, dense_tensor_shapes, expert_tensor_shapes, resolve_model
from .errors import UserError
from .experts import EXPERT_PROJS, DenseExperts, expert_tensor_name
from .model import Qwen3MoeForCausalLM

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"Unknown dtype {name!r}; choose one of bf16, fp16, fp32.")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"Unsupported device {name!r}; use cpu, cuda, cuda:N or auto.")
    return device


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter `name` (dotted, relative to module) with `tensor`."""
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def load_dense(
    model: Qwen3MoeForCausalLM,
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None = None,
    done: int = 0,
    total: int = 0,
) -> int:
    """Every non-expert tensor to `device` in `dtype`. Returns bytes read so far."""
    for name in dense_tensor_shapes(model.config):
        if name.endswith(".weight") and "experts" in name:
            continue
        tensor = ckpt.get(name).to(device=device, dtype=dtype)
        assign(model, name, tensor)
        done += ckpt.nbytes(name)
        if progress:
            progress(done, total)
    model.tie_weights()
    return done


def load_dense_experts(
    experts: DenseExperts,
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None = None,
    done: int = 0,
    total: int = 0,
) -> int:
    experts.allocate(device, dtype)
    config = experts.config
    for layer in config.moe_layers:
        for e in range(config.num_experts):
            for proj in EXPERT_PROJS:
                name = expert_tensor_name(layer, e, proj)
                experts.set_expert(layer, e, proj, ckpt.get(name))
                done += ckpt.nbytes(name)
            if progress:
                progress(done, total)
    return done


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    ctx_size: int | None = None,
) -> Qwen3MoeForCausalLM:
    """Load a Qwen3-MoE checkpoint (folder or hub id). `model(input_ids [B, T])` -> logits [B, T, V]."""
    device, dtype = parse_device(device), parse_dtype(dtype)
    ckpt = Checkpoint(resolve_model(path))
    config = ckpt.config if ctx_size is None else ckpt.config.with_context(ctx_size)
    dense, experts = dense_tensor_shapes(config), expert_tensor_shapes(config)
    ckpt.check({**dense, **experts})
    total = sum(ckpt.nbytes(n) for n in (*dense, *experts))
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    done = load_dense(model, ckpt, device, dtype, progress, 0, total)
    load_dense_experts(model.experts, ckpt, device, dtype, progress, done, total)
    ckpt.close()
    model.eval()
    return model
