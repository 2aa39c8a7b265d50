"""Build the model on the meta device, then assign tensors read one by one from the memory map:
loading never holds the checkpoint in RAM twice. Quantized checkpoints, and 16-bit ones quantized
while loading, go through the same assembly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant.formats import QTensor
from quant.int4 import cpu_packing
from quant.linear import QuantLinear
from quant.pack import PackLayout
from qwenlocal.errors import UserError
from qwenlocal.experts.cache_policy import DEFAULT_CACHE_POLICY
from qwenlocal.experts.cold import DEFAULT_COLD_EXPERTS, ColdExperts
from qwenlocal.experts.offload import DEFAULT_PREFETCH, OffloadedExperts, expert_router
from qwenlocal.experts.store import QuantExperts
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.names import (
    EXPERT_PROJS,
    blob_layer_expert,
    expert_tensor_name,
    is_blob_name,
    tensor_class,
)
from qwenlocal.model.qwen3_moe import FUSED_QKV_DEVICES, Qwen3MoeForCausalLM
from qwenlocal.planning.memory import embed_device
from qwenlocal.planning.plan import LoadPlan, plan_load
from qwenlocal.weights.checkpoint import (
    SAFETENSORS_DTYPES,
    Checkpoint,
    DequantizingCheckpoint,
    ProgressFn,
    dense_tensor_shapes,
    expert_tensor_shapes,
)
from qwenlocal.weights.quantize import expert_layout, quantized_shapes, quantized_stream
from qwenlocal.weights.sources import ModelSource, open_source


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter `name` (dotted, relative to module) with `tensor`."""
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def _place(name: str, config, device: torch.device) -> torch.device:
    return embed_device(config, device) if name == "model.embed_tokens.weight" else device


@dataclass(frozen=True)
class ExpertCache:
    """Experts kept in host RAM with a cache of them on the device: slots per MoE layer, eviction
    policy, prefetch, and what a miss does (cold.py)."""

    slots_per_layer: int
    policy: str
    prefetch: bool
    cold_experts: str

    def experts(self, config: Qwen3MoeConfig, layout: PackLayout, device: torch.device) -> OffloadedExperts:
        args = (config, layout, self.slots_per_layer, device, self.policy, self.prefetch)
        if self.cold_experts == "copy":
            return OffloadedExperts(*args)
        return ColdExperts(*args, mode=self.cold_experts)


def load_model(
    path: str | Path | ModelSource,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: ProgressFn | None = None,
    ctx_size: int | None = None,
    quant=None,
    gpu_experts: int | None = None,
    vram_budget: int | str | None = None,
    policy: str = DEFAULT_CACHE_POLICY,
    prefetch: bool = DEFAULT_PREFETCH,
    kv_dtype: str | torch.dtype | None = None,
    moe: str = "auto",
    cold_experts: str = DEFAULT_COLD_EXPERTS,
    *,
    plan: LoadPlan | None = None,
    note: Callable[[str], None] | None = None,
) -> Qwen3MoeForCausalLM:
    """Load a Qwen3-MoE checkpoint (folder or hub id). `model(input_ids [B, T])` -> logits [B, T, V].

    `dtype`: the compute dtype; default the checkpoint's 16-bit one, bf16 for quantized and fp32
    folders (plan.default_dtype); float32 stays available for comparisons. `quant`: a preset name
    or Recipe to quantize a 16-bit checkpoint while loading, or "auto", as the commands do: 16-bit
    weights that fit the device load as they are, others are quantized once with the default recipe
    into the cache (quant_cache.py; `note` hears one line about it) and that copy is loaded. A
    quantized checkpoint is read with its own recipe. `gpu_experts` / `vram_budget` (bytes or
    "auto") keep all experts in host RAM and only a cache of them on the device; `cold_experts`
    says what happens to an expert without a slot: copied in ("copy"), computed on the CPU ("cpu"),
    or either by measured times ("auto"; cold.py). `moe`: how a decode token's experts are computed,
    "grouped" (two kernel launches, ids on the device), "loop" (one expert at a time) or "auto"
    (plan.resolve_moe). `plan`: a LoadPlan made already (plan.plan_load), instead of these flags.
    The model keeps its plan (`model.plan`).
    """
    source = path if isinstance(path, ModelSource) else ModelSource.resolve(path)
    if plan is None:
        plan = plan_load(
            source,
            device=device,
            dtype=dtype,
            ctx_size=ctx_size,
            quant=quant,
            gpu_experts=gpu_experts,
            vram_budget=vram_budget,
            policy=policy,
            prefetch=prefetch,
            kv_dtype=kv_dtype,
            moe=moe,
            cold_experts=cold_experts,
        )
    if plan.quantize_once:
        from qwenlocal.weights.quant_cache import quantized_once

        source = quantized_once(source, note=note)
        plan = plan.loaded_from(source)
    ckpt = open_source(source)
    try:
        model = _build(ckpt, plan, progress)
        if plan.device.type in FUSED_QKV_DEVICES:
            for layer in model.model.layers:
                layer.self_attn.fuse_qkv()
                layer.fuse_decode()
    finally:
        ckpt.close()  # the memory maps, whether the load finished or failed
    model.plan = plan
    model.experts.moe = plan.moe
    model.eval()
    return model


def _build(ckpt: Checkpoint, plan: LoadPlan, progress: ProgressFn | None) -> Qwen3MoeForCausalLM:
    config = plan.config(ckpt.config)
    if plan.recipe is None:
        if isinstance(ckpt, DequantizingCheckpoint):
            ckpt.dtype = plan.dtype  # an FP8/GPTQ source loaded as it is: dequantize straight to it
        return _load_16bit(ckpt, config, plan.device, plan.dtype, progress)
    cache = None
    if plan.slots_per_layer is not None:
        cache = ExpertCache(plan.slots_per_layer, plan.policy, plan.prefetch, plan.cold_experts)
    return _load_quantized(
        ckpt, config, plan.recipe, plan.prequantized, plan.device, plan.dtype, progress, cache
    )


def _checkpoint_items(ckpt: Checkpoint, names) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, ckpt.get(name)


def load_dense(
    model: Qwen3MoeForCausalLM,
    ckpt: Checkpoint,
    device,
    dtype,
    progress: ProgressFn | None = None,
    total: int = 0,
) -> int:
    """Every non-expert tensor of a 16-bit checkpoint into the (meta) model; returns bytes read."""
    done = 0
    for name in dense_tensor_shapes(model.config):
        assign(model, name, ckpt.get(name).to(device=_place(name, model.config, device), dtype=dtype))
        done += ckpt.nbytes(name)
        if progress:
            progress(done, total)
    model.tie_weights()
    return done


def _load_16bit(ckpt, config, device, dtype, progress) -> Qwen3MoeForCausalLM:
    dense, experts = dense_tensor_shapes(config), expert_tensor_shapes(config)
    ckpt.check({**dense, **experts})
    total = sum(ckpt.nbytes(n) for n in (*dense, *experts))
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    done = load_dense(model, ckpt, device, dtype, progress, total)
    model.experts.allocate(device, dtype)
    for layer in config.moe_layers:
        for e in range(config.num_experts):
            for proj in EXPERT_PROJS:
                name = expert_tensor_name(layer, e, proj)
                model.experts.set_expert(layer, e, proj, ckpt.get(name))
                done += ckpt.nbytes(name)
            if progress:
                progress(done, total)
    return model


def _load_quantized(
    ckpt,
    config,
    recipe,
    prequantized,
    device,
    dtype,
    progress,
    cache: ExpertCache | None,
) -> Qwen3MoeForCausalLM:
    on_host = device.type == "cpu" or cache is not None  # the CPU computes or keeps the experts
    if prequantized:
        layout = PackLayout.from_dict(config.quantization_config["expert_layout"])
        shapes = quantized_shapes(config, recipe, layout.specs["gate_proj"].dtype)
        for name, (dt, shape) in shapes.items():
            if name not in ckpt:
                raise UserError(f"Tensor {name} is missing from the quantized checkpoint in {ckpt.folder}.")
            info = ckpt.info(name)
            if tuple(info["shape"]) != shape or SAFETENSORS_DTYPES.get(info["dtype"]) != dt:
                raise UserError(
                    f"Tensor {name} in {ckpt.folder} is {info['dtype']} {info['shape']}; "
                    f"the recipe needs {str(dt).removeprefix('torch.')} {list(shape)}."
                )
        total = sum(ckpt.nbytes(n) for n in shapes)
        items = _checkpoint_items(ckpt, shapes)
    else:
        ckpt.check({**dense_tensor_shapes(config), **expert_tensor_shapes(config)})
        # experts the CPU keeps are streamed straight into its int4 kernel layout (a GPTQ
        # source's codes go there in one pass) and packed into their rows of the store;
        # _use_kernel_layouts then finds them done
        packing = cpu_packing() if on_host else None
        layout = expert_layout(config, recipe, ckpt.get("model.norm.weight").dtype, packing)
        total = 0
        quant_device = device if device.type == "cuda" else None

    with torch.device("meta"):  # no memory until allocate(): the store and slots are sized once
        experts = QuantExperts(config, layout) if cache is None else cache.experts(config, layout, device)
        model = Qwen3MoeForCausalLM(config, experts)
    experts.allocate(device)
    blob_out = None  # where the stream packs each expert blob itself (then nothing is copied)
    if not prequantized:
        blob_out = (lambda layer, e: experts.blobs[layer][e]) if on_host else None
        items = quantized_stream(
            ckpt, recipe, quant_device, error_sample=0, packing=packing, blob_out=blob_out
        )  # no error statistics
    dense = dense_tensor_shapes(config)
    specs = {}
    for name, shape in dense.items():
        cls = tensor_class(name)
        spec = recipe.spec(cls, shape, dtype) if cls else None
        if spec is not None:
            specs[name.removesuffix(".weight")] = spec
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done = 0
    for name, tensor in items:
        done += tensor.numel() * tensor.element_size()
        if is_blob_name(name):
            if blob_out is None:
                model.experts.set_blob(*blob_layer_expert(name), tensor)
        elif name in dense and name.removesuffix(".weight") not in specs:
            assign(model, name, tensor.to(device=_place(name, config, device), dtype=dtype))
        else:
            prefix, part = name.rsplit(".", 1)
            got = pending.setdefault(prefix, {})
            got[name] = tensor.to(device)
            spec = specs[prefix]
            if len(got) == len(spec.parts()):
                q = QTensor.from_tensors(got, prefix, spec.meta())
                bias = model.get_submodule(prefix).bias  # loaded already if it came first
                bias = bias if bias is not None and bias.device.type != "meta" else None
                _swap(model, prefix, QuantLinear(q, bias))  # else it is assigned when it arrives
                del pending[prefix]
        if progress:
            progress(done, max(total, done))
    model.tie_weights()
    if on_host:
        _use_kernel_layouts(model, dense=device.type == "cpu")
    if cache is not None:
        experts.attach_router(expert_router(model))
    return model


def _use_kernel_layouts(model: nn.Module, dense: bool) -> None:
    """Repack quantized weights computed on the CPU into its kernels' layout (int4), once: the
    experts (resident on a CPU device, or the host store of offloaded ones, whatever the device:
    offload.py) and, with `dense`, the other quantized layers."""
    if isinstance(model.experts, QuantExperts):
        model.experts.use_kernel_layout()
    for module in model.modules() if dense else ():
        if isinstance(module, QuantLinear):
            module.use_kernel_layout()


def _swap(model: nn.Module, prefix: str, module: nn.Module) -> None:
    parent, _, leaf = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
