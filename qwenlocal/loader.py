"""Build the model on the meta device, then assign tensors read one by one from the memory map:
loading never holds the checkpoint in RAM twice. Quantized checkpoints, and 16-bit ones quantized
while loading, go through the same assembly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant.formats import QTensor
from quant.int4 import cpu_packing
from quant.linear import QuantLinear
from quant.pack import PackLayout
from quant.recipe import DEFAULT_PRESET, Recipe

from .cache_policy import DEFAULT_CACHE_POLICY
from .checkpoint import (
    SAFETENSORS_DTYPES,
    Checkpoint,
    DequantizingCheckpoint,
    ProgressFn,
    dense_tensor_shapes,
    expert_tensor_shapes,
    resolve_model,
)
from .cold import DEFAULT_COLD_EXPERTS, ColdExperts, parse_cold_experts
from .config import Qwen3MoeConfig
from .errors import UserError
from .experts import QuantExperts
from .memory import estimate, fit_expert_slots, make_plan
from .model import Qwen3MoeForCausalLM
from .names import EXPERT_PROJS, blob_layer_expert, expert_tensor_name, is_blob_name, tensor_class
from .offload import DEFAULT_PREFETCH, OffloadedExperts, expert_router
from .options import parse_device, parse_dtype, parse_kv_dtype
from .quantize import expert_layout, quantized_shapes, quantized_stream
from .sources import open_source


def resolve_moe(moe: str, device: torch.device) -> str:
    """ "auto": grouped on CUDA (no host sync, one launch per projection); on the CPU the loop,
    which measured faster there (BENCHMARKS.md, bench/moe_cpu.py)."""
    from .experts import MOE_MODES

    if moe not in MOE_MODES:
        raise UserError(f"Unknown --moe {moe!r}; choose one of {', '.join(MOE_MODES)}.")
    if moe == "auto":
        return "grouped" if device.type == "cuda" else "loop"
    return moe


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter `name` (dotted, relative to module) with `tensor`."""
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def embed_device(config, device: torch.device) -> torch.device:
    """The token embedding stays in host RAM beside a GPU (only looked-up rows are copied),
    unless lm_head shares it."""
    return device if device.type == "cpu" or config.tie_word_embeddings else torch.device("cpu")


def _place(name: str, config, device: torch.device) -> torch.device:
    return embed_device(config, device) if name == "model.embed_tokens.weight" else device


def resolve_recipe(quant, config, auto: QuantChoice | None = None):
    """The recipe to load with: the checkpoint's own, one asked for (`--quant`), or None (16-bit).
    "auto" takes `auto`'s choice (`choose_quant`)."""
    if config.quantization_config:
        own = Recipe.from_config(config.quantization_config)
        if isinstance(quant, str) and quant not in (own.preset, "auto"):
            raise UserError(f"This checkpoint is already quantized ({own.preset}); drop --quant {quant}.")
        return own, True
    if quant == "auto" and auto is not None:
        return auto.recipe, False
    if quant is None or quant in ("bf16", "none", "auto"):
        return None, False
    recipe = quant if isinstance(quant, Recipe) else Recipe.from_preset(quant)
    return (recipe if recipe.quantizes_anything else None), False


# RAM kept free for the OS and the rest of the process when --quant auto sizes a CPU load.
HOST_RESERVE = 2 * 1024**3


@dataclass(frozen=True)
class QuantChoice:
    """What `--quant auto` decided for a checkpoint: its recipe (None: 16-bit weights as they are)
    and one line saying why, for the panel and stderr."""

    recipe: object | None
    reason: str


def host_free_bytes() -> int:
    """RAM a CPU load may use: what the OS reports as available, minus a reserve."""
    import psutil

    return psutil.virtual_memory().available - HOST_RESERVE


def choose_quant(
    config, device: torch.device, dtype: torch.dtype, ctx_size: int, budget: int | None = None
) -> QuantChoice:
    """`--quant auto`: a 16-bit checkpoint that fits the device (`budget`, default: the free GPU
    memory, or on the CPU the free RAM) loads as it is; one that does not is quantized with the
    default recipe. A quantized checkpoint keeps its own recipe."""
    if config.quantization_config:
        own = Recipe.from_config(config.quantization_config)
        return QuantChoice(own, f"quantized checkpoint ({own.preset})")
    if budget is None:
        budget = auto_budget(device) if device.type == "cuda" else host_free_bytes()
    est = estimate(
        config, make_plan(recipe=None, ctx_size=ctx_size, dtype=dtype, kv_dtype=None, device=device)
    )
    need = est.gpu_total + est.host_total
    where = "GPU memory" if device.type == "cuda" else "RAM"
    sizes = f"{need / 1024**3:.2f} GiB, {max(budget, 0) / 1024**3:.2f} GiB of {where} free"
    if need <= budget:
        return QuantChoice(None, f"16-bit weights fit ({sizes})")
    return QuantChoice(
        Recipe.from_preset(DEFAULT_PRESET), f"16-bit weights do not fit ({sizes}): {DEFAULT_PRESET}"
    )


def _checkpoint_items(ckpt: Checkpoint, names) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, ckpt.get(name)


def expert_slots(
    config,
    recipe,
    device: torch.device,
    dtype: torch.dtype,
    ctx_size: int,
    gpu_experts: int | None,
    vram_budget: int | str | None,
    kv_dtype: torch.dtype | None,
) -> int | None:
    """Slots for experts on the device, from --gpu-experts or --vram-budget; None: all resident.
    `kv_dtype` None: the KV cache is kept in `dtype`."""
    if gpu_experts is None and vram_budget is None:
        return None
    if vram_budget == "auto" and device.type != "cuda":
        return None  # host RAM holds everything; there is no device budget to fit
    if gpu_experts is not None and vram_budget is not None:
        raise UserError("Give --gpu-experts or --vram-budget, not both.")
    total = config.num_experts * len(config.moe_layers)
    minimum = config.num_experts_per_tok * len(config.moe_layers)
    if gpu_experts is not None:
        if gpu_experts < minimum:
            raise UserError(
                f"--gpu-experts {gpu_experts} is too few: the cache needs at least {minimum} "
                f"({config.num_experts_per_tok} per MoE layer)."
            )
        return min(gpu_experts, total)
    budget = auto_budget(device) if vram_budget == "auto" else int(vram_budget)
    plan = make_plan(recipe=recipe, ctx_size=ctx_size, dtype=dtype, kv_dtype=kv_dtype, device=device)
    return fit_expert_slots(config, plan, budget).expert_slots


VRAM_RESERVE = 512 * 1024**2  # left free for other programs when the budget is "auto"


def auto_budget(device: torch.device) -> int:
    """The free memory the GPU reports, minus a reserve."""
    if device.type != "cuda":
        raise UserError("--vram-budget auto needs a CUDA GPU; give a size (e.g. 8GiB) or --gpu-experts.")
    free, _ = torch.cuda.mem_get_info(device)
    return free - VRAM_RESERVE


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
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
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
) -> Qwen3MoeForCausalLM:
    """Load a Qwen3-MoE checkpoint (folder or hub id). `model(input_ids [B, T])` -> logits [B, T, V].

    `quant`: a preset name or Recipe to quantize a 16-bit checkpoint while loading, or "auto"
    (quantize with the default recipe only if the 16-bit weights do not fit: `choose_quant`); a
    quantized checkpoint is read with its own recipe. `gpu_experts` / `vram_budget` (bytes or
    "auto") keep all experts in host RAM and only a cache of them on the device; `cold_experts`
    says what happens to an expert without a slot: copied in ("copy"), computed on the CPU ("cpu"),
    or either by measured times ("auto"; cold.py). `moe`: how a decode token's experts are computed,
    "grouped" (two kernel launches, ids on the device), "loop" (one expert at a time) or "auto"
    (see resolve_moe).
    """
    device, dtype, kv_dtype = parse_device(device), parse_dtype(dtype), parse_kv_dtype(kv_dtype)
    parse_cold_experts(cold_experts)
    moe = resolve_moe(moe, device)
    ckpt = open_source(resolve_model(path))
    config = ckpt.config if ctx_size is None else ckpt.config.with_context(ctx_size)
    # a GPTQ source loads with its own bits, its codes repacked
    own = getattr(ckpt, "own_recipe", None) if quant in (None, "auto") else None
    auto = choose_quant(config, device, dtype, ctx_size or 4096) if quant == "auto" and own is None else None
    recipe, prequantized = (own, False) if own is not None else resolve_recipe(quant, config, auto)
    if recipe is None and isinstance(ckpt, DequantizingCheckpoint):
        ckpt.dtype = dtype  # an FP8/GPTQ source loaded as it is: dequantize straight to the compute dtype
    ctx = ctx_size or 4096
    slots = expert_slots(config, recipe, device, dtype, ctx, gpu_experts, vram_budget, kv_dtype)
    if recipe is None:
        if slots is not None and slots < config.num_experts * len(config.moe_layers):
            raise UserError("Expert offload needs quantized experts: add --quant mixed (or nf4, int8).")
        model = _load_16bit(ckpt, config, device, dtype, progress)
    else:
        per_layer = None if slots is None else slots // max(len(config.moe_layers), 1)
        if per_layer is not None and per_layer >= config.num_experts:
            per_layer = None  # everything fits: a cache that never misses is no cache at all
        cache = None if per_layer is None else ExpertCache(per_layer, policy, prefetch, cold_experts)
        model = _load_quantized(ckpt, config, recipe, prequantized, device, dtype, progress, cache)
    ckpt.close()
    model.recipe = recipe  # the memory model's plan reads it
    model.kv_dtype = kv_dtype
    model.experts.moe = moe
    model.eval()
    return model


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
