"""One memory model: bytes per component from a config and a plan, computed from the exact tensor
shapes and the exact storage of each format. `qwenlocal vram` prints it; the loader sizes the expert
cache with it; `measure` reports the same components from the tensors really allocated."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from qwenlocal.errors import UserError
from qwenlocal.generation.generate import PREFILL_CHUNK
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.graphs import graph_bytes
from qwenlocal.model.names import tensor_class
from qwenlocal.model.qwen3_moe import (
    ATTENTION_SCORE_KEYS,
    FUSED_QKV_DEVICES,
    FUSED_QKV_FORMATS,
    qk_norm_shape,
)
from qwenlocal.weights.checkpoint import dense_tensor_shapes
from qwenlocal.weights.quantize import expert_layout

GIB = 1024**3
# The CUDA context, cuBLAS workspace and allocator slack that no tensor accounts for.
CUDA_CONTEXT_BYTES = 512 * 1024**2
KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}
COMPONENTS = (
    "embed_tokens",
    "attention",
    "norms",
    "routers",
    "dense_mlp",
    "lm_head",
    "experts",
    "kv_cache",
    "rope_tables",
    "activations",
    "decode_graphs",
    "cuda_context",
)


def embed_device(config: Qwen3MoeConfig, device: torch.device) -> torch.device:
    """The token embedding stays in host RAM beside a GPU (only the looked-up rows are copied),
    unless lm_head shares it."""
    return device if device.type == "cpu" or config.tie_word_embeddings else torch.device("cpu")


def component_of(name: str) -> str:
    """The memory component of a model tensor, by its Hugging Face style name."""
    if name.startswith("model.embed_tokens"):
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head"
    if "experts" in name:
        return "experts"
    if "q_norm" in name or "k_norm" in name or "layernorm" in name or name.startswith("model.norm"):
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if name.endswith("mlp.gate.weight"):
        return "routers"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"no memory component for tensor {name}")


@dataclass(frozen=True)
class Plan:
    """What will be loaded, and how: everything the memory depends on besides the config.

    Made by `make_plan` only, and changed by `replace`: no field has a default that a caller
    could forget to set, since a forgotten one (the KV dtype, say) sizes the cache for the wrong
    bytes without any error.
    """

    recipe: object | None  # quant.recipe.Recipe, or None for 16-bit weights
    ctx_size: int
    batch: int
    dtype: torch.dtype  # 16-bit weights and activations
    kv_dtype: torch.dtype
    device: str  # "cuda" or "cpu"
    expert_slots: int | None  # experts on the device; None = all of them
    prefill_chunk: int

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)


def make_plan(
    *,
    recipe,
    ctx_size: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None,
    device: str | torch.device,
    batch: int = 1,
    expert_slots: int | None = None,
) -> Plan:
    """The one way to build a Plan. `kv_dtype` None keeps the KV cache in `dtype`, as the model
    does; `recipe` None means 16-bit weights."""
    return Plan(
        recipe=recipe,
        ctx_size=ctx_size,
        batch=batch,
        dtype=dtype,
        kv_dtype=dtype if kv_dtype is None else kv_dtype,
        device=torch.device(device).type,
        expert_slots=expert_slots,
        prefill_chunk=PREFILL_CHUNK,
    )


@dataclass
class Component:
    name: str
    nbytes: int
    where: str  # "gpu" (the compute device) or "host"


@dataclass
class Estimate:
    config: Qwen3MoeConfig
    plan: Plan
    components: list[Component] = field(default_factory=list)
    experts_total: int = 0
    expert_slots: int = 0
    expert_bytes: int = 0  # one expert (gate + up + down with statistics)

    def bytes_of(self, name: str, where: str | None = None) -> int:
        return sum(
            c.nbytes for c in self.components if c.name == name and (where is None or c.where == where)
        )

    @property
    def gpu_total(self) -> int:
        return sum(c.nbytes for c in self.components if c.where == "gpu")

    @property
    def host_total(self) -> int:
        return sum(c.nbytes for c in self.components if c.where == "host")

    @property
    def all_resident(self) -> bool:
        return self.expert_slots >= self.experts_total

    def as_dict(self) -> dict:
        return {
            "components": {
                c.name + ("" if c.where == "gpu" else "@host"): {"bytes": c.nbytes, "where": c.where}
                for c in self.components
            },
            "gpu_total_bytes": self.gpu_total,
            "host_total_bytes": self.host_total,
            "expert_slots": self.expert_slots,
            "experts_total": self.experts_total,
            "expert_bytes": self.expert_bytes,
            "ctx_size": self.plan.ctx_size,
        }


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def weight_bytes(config: Qwen3MoeConfig, plan: Plan) -> dict[str, int]:
    """Bytes of every non-expert weight component, exactly as the loader stores them."""
    out = dict.fromkeys(("embed_tokens", "attention", "norms", "routers", "dense_mlp", "lm_head"), 0)
    for name, shape in dense_tensor_shapes(config).items():
        cls = tensor_class(name)
        spec = plan.recipe.spec(cls, shape, plan.dtype) if plan.recipe is not None and cls else None
        out[component_of(name)] += spec.nbytes if spec is not None else _nbytes(shape, plan.dtype)
        fmt = spec.fmt if spec is not None else None
        if name.endswith("q_proj.weight") and plan.device in FUSED_QKV_DEVICES and fmt in FUSED_QKV_FORMATS:
            out["norms"] += _nbytes(qk_norm_shape(config), plan.dtype)  # Attention.fuse_qkv
    return out


def expert_nbytes(config: Qwen3MoeConfig, plan: Plan) -> int:
    """One expert's bytes: its packed blob when quantized, gate + up + down in 16-bit otherwise."""
    if plan.recipe is not None and plan.recipe.expert_bits < 16:
        return expert_layout(config, plan.recipe, plan.dtype).nbytes
    return 3 * config.hidden_size * config.moe_intermediate_size * plan.dtype.itemsize


def kv_cache_bytes(config: Qwen3MoeConfig, ctx_size: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    return per_token * ctx_size * batch


def rope_bytes(config: Qwen3MoeConfig, ctx_size: int) -> int:
    # cos and sin, fp32, [max(ctx, native), head_dim] (the model builds at least the native length)
    return 2 * max(ctx_size, config.native_context) * config.head_dim * 4


def activation_bytes(config: Qwen3MoeConfig, plan: Plan) -> int:
    """Peak working memory of one prefill chunk (the sum of `activation_terms`)."""
    return sum(activation_terms(config, plan).values())


def activation_terms(config: Qwen3MoeConfig, plan: Plan) -> dict[str, int]:
    """The working memory of one prefill chunk, term by term: hidden states, q/k/v, the widest MLP
    intermediate, attention scores of the chunk against at most ATTENTION_SCORE_KEYS keys (what a
    kernel that materializes them holds: model.masked_attention slices the queries of a chunk
    against a longer context so that no call holds more), last-position logits, and one dequantized attention weight when
    quantized weights are multiplied by dequantizing."""
    t, h, it = plan.prefill_chunk * plan.batch, config.hidden_size, plan.dtype.itemsize
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    hidden = 4 * t * h * it  # residual, normed input, attention output, MLP output
    qkv = t * (heads + 2 * kv) * d * it * 2  # projections and their roped copies
    mlp_width = max(config.moe_intermediate_size * config.num_experts_per_tok, config.intermediate_size)
    mlp = 3 * t * mlp_width * it
    scores = plan.batch * heads * plan.prefill_chunk * min(plan.ctx_size, ATTENTION_SCORE_KEYS) * 4
    logits = plan.batch * config.vocab_size * 4 * 2
    dequant = 0 if plan.recipe is None else dequant_bytes(config, plan)
    return {"hidden": hidden, "qkv": qkv, "mlp": mlp, "scores": scores, "logits": logits, "dequant": dequant}


def dequant_bytes(config: Qwen3MoeConfig, plan: Plan) -> int:
    """What multiplying by dequantizing (quant/kernels.py, a prefill chunk's path above the kernels'
    crossover) holds beside the activations. A quantized lm_head's last-position row goes through
    a kernel and is never dequantized whole. On a GPU: the widest projection in the activation
    dtype. On the CPU, per-thread scratch kept between calls, for the widest weight of each format:
    int8's codes in the GEMM dtype (2 bytes where the CPU has native bf16, else 4); int4's weight in
    fp32 (4), its codes (1), its two nibble planes (1/2 each) and a bf16 copy for the GEMM (2);
    other formats' weight in fp32 (4)."""
    h = config.hidden_size
    attention = config.num_attention_heads * config.head_dim * h
    if plan.device != "cpu":
        return max(attention, h * h) * plan.dtype.itemsize
    from quant.kernels import gemm_dtype_cpu

    per_element = {"int8": gemm_dtype_cpu(plan.dtype).itemsize, "int4": 4 + 1 + 1 + 2}
    widest: dict[str, int] = {}
    for cls, elements in (("attention", attention), ("experts", config.moe_intermediate_size * h)):
        fmt = plan.recipe.format_for(cls)
        if fmt is not None:
            widest[fmt] = max(widest.get(fmt, 0), elements)
    return sum(n * per_element.get(fmt, 4) for fmt, n in widest.items())


def estimate(config: Qwen3MoeConfig, plan: Plan) -> Estimate:
    """Bytes per component on the compute device ("gpu") and in host RAM ("host")."""
    if plan.ctx_size <= 0:
        raise UserError(f"The context size must be positive, got {plan.ctx_size}.")
    if plan.batch <= 0:
        raise UserError(f"The batch must be positive, got {plan.batch}.")
    config = config.with_context(plan.ctx_size)
    n_experts = config.num_experts * len(config.moe_layers)
    slots = n_experts if plan.expert_slots is None else min(plan.expert_slots, n_experts)
    one = expert_nbytes(config, plan)
    est = Estimate(config, plan, experts_total=n_experts, expert_slots=slots, expert_bytes=one)
    weights = weight_bytes(config, plan)
    embed_on_host = plan.device != "cpu" and embed_device(config, torch.device(plan.device)).type == "cpu"
    for name in ("embed_tokens", "attention", "norms", "routers", "dense_mlp", "lm_head"):
        if name == "embed_tokens" and embed_on_host:
            est.components.append(Component(name, weights[name], "host"))
        elif weights[name]:
            est.components.append(Component(name, weights[name], "gpu"))
    est.components.append(Component("experts", slots * one, "gpu"))
    if slots < n_experts:
        est.components.append(Component("expert_store", n_experts * one, "host"))
    est.components.append(
        Component("kv_cache", kv_cache_bytes(config, plan.ctx_size, plan.batch, plan.kv_dtype), "gpu")
    )
    est.components.append(Component("rope_tables", rope_bytes(config, plan.ctx_size), "gpu"))
    est.components.append(Component("activations", activation_bytes(config, plan), "gpu"))
    if plan.device == "cuda" and slots == n_experts:  # resident experts: decode replays graphs
        est.components.append(Component("decode_graphs", graph_bytes(config, plan.ctx_size), "gpu"))
    if plan.device == "cuda":
        est.components.append(Component("cuda_context", CUDA_CONTEXT_BYTES, "gpu"))
    return est


def fit_expert_slots(config: Qwen3MoeConfig, plan: Plan, budget: int) -> Estimate:
    """The largest expert cache that fits `budget` bytes on the device, after dense weights, KV
    cache, working buffers and the CUDA context; at least top-k slots in every MoE layer."""
    base = estimate(config, plan.replace(expert_slots=0))
    free = budget - base.gpu_total
    per_layer_min = config.num_experts_per_tok
    layers = len(config.moe_layers)
    minimum = per_layer_min * layers
    slots = free // base.expert_bytes if base.expert_bytes else 0
    if slots < minimum:
        need = base.gpu_total + minimum * base.expert_bytes
        raise UserError(
            f"A budget of {budget / GIB:.2f} GiB cannot hold this model: it needs at least "
            f"{need / GIB:.2f} GiB ({base.gpu_total / GIB:.2f} GiB before experts, plus "
            f"{per_layer_min} experts in each of {layers} layers). Lower --ctx-size or raise the budget."
        )
    slots = min(slots - slots % layers, base.experts_total)  # split evenly across layers
    return estimate(config, plan.replace(expert_slots=slots))


def measure(model, cache=None) -> dict[str, dict[str, int]]:
    """Bytes of the tensors the model really holds, by component and device type."""
    out: dict[str, dict[str, int]] = {}

    def add(component: str, t: torch.Tensor) -> None:
        where = "gpu" if t.device.type == "cuda" else "cpu"
        d = out.setdefault(component, {})
        d[where] = d.get(where, 0) + t.numel() * t.element_size()

    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        name = name.removeprefix("experts.")
        add("experts" if name.startswith(("gate_up", "down")) else component_of(name), t)
    for component, t in model.experts.held():  # offloaded: the device slots and the host store
        add(component, t)
    if cache is not None:
        for t in cache.k + cache.v:
            add("kv_cache", t)
    if model.rope is not None:
        add("rope_tables", model.rope.cos)
        add("rope_tables", model.rope.sin)
    return out


def model_plan(
    model, ctx_size: int | None = None, batch: int = 1, kv_dtype: torch.dtype | None = None
) -> Plan:
    """The memory plan of a loaded model, from the plan it was loaded with (`model.plan`), so its
    estimate can be set beside `measure`; `ctx_size` default: the plan's."""
    if model.plan is None:
        raise ValueError("the model was not made by load_model: it has no plan to estimate")
    return model.plan.memory(ctx_size, batch, kv_dtype)


@dataclass
class LiveRow:
    component: str
    where: str
    estimate: int | None
    real: int | None


def live_report(model, cache=None) -> list[LiveRow]:
    """Estimate and reality side by side, component by component (real: bytes of the tensors
    the model holds, on any device)."""
    if cache is not None:
        plan = model_plan(model, cache.max_len, len(cache.k[0]), cache.k[0].dtype)
    else:
        plan = model_plan(model)
    est = estimate(model.config, plan)
    real = measure(model, cache)
    rows = []
    for c in est.components:
        got = real.get(c.name)
        if c.name == "kv_cache" and cache is None:
            got = None
        rows.append(LiveRow(c.name, c.where, c.nbytes, None if got is None else sum(got.values())))
    return rows
