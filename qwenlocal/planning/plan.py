"""One load, decided once. The model folder is read once (`sources.ModelSource`) and the flags are
checked once into a frozen `LoadPlan`: device, dtypes, the recipe and why, the expert cache. The
loader builds what the plan says and the model keeps it (`model.plan`); the memory report, the
chat panel, the server and `vram` read it, and nothing rebuilds it.

`decide_recipe` is the one answer to "which recipe does this folder load with?".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qwenlocal.errors import UserError
from qwenlocal.experts.cache_policy import DEFAULT_CACHE_POLICY
from qwenlocal.experts.cold import DEFAULT_COLD_EXPERTS, parse_cold_experts
from qwenlocal.experts.offload import DEFAULT_PREFETCH
from qwenlocal.model.config import DEFAULT_CTX_SIZE, Qwen3MoeConfig
from qwenlocal.planning.gpus import auto_budget
from qwenlocal.planning.memory import Plan, estimate, fit_expert_slots, make_plan
from qwenlocal.planning.options import check_experts_or_budget, parse_device, parse_dtype, parse_kv_dtype
from qwenlocal.weights.sources import ModelSource

# RAM kept free for the OS and the rest of the process when --quant auto sizes a CPU load.
HOST_RESERVE = 2 * 1024**3
# A GPTQ folder whose lm_head GPTQ left 16-bit (Qwen's GPTQ-Int4: 0.62 GB read a token) has it
# computed at int8 on the CPU, in our recipes' format: 1.4x faster at one decode row, half the
# bytes held, ~1.5 s once at load; logits' KL 4e-5 on Gaussian weights (bf16's own rounding: 3e-6),
# more where one outlier dominates a row (bench/lm_head.py, BENCHMARKS.md). On a GPU it stays
# 16-bit: nothing was measured there, and quantizing on the device at load holds the bf16 matrix
# there beside its int8 copy.
GPTQ_LM_HEAD_INT8 = (
    "GPTQ left lm_head 16-bit; on the CPU it is quantized to int8 at load (1.4x faster, half the bytes)"
)


def default_dtype(config: Qwen3MoeConfig) -> torch.dtype:
    """The compute dtype when none is asked for: the checkpoint's 16-bit one; bf16 for quantized
    and fp32 folders (the CPU's int4/int8 kernels take bf16 activations; float32 ones fall back to
    dequantizing, measured 0.66 against 4.49 tok/s on the 48-layer shape)."""
    if not config.quantization_config and config.torch_dtype == "float16":
        return torch.float16
    return torch.bfloat16


def resolve_moe(moe: str, device: torch.device) -> str:
    """ "auto": grouped on CUDA (no host sync, one launch per projection); on the CPU the loop,
    which measured faster there (BENCHMARKS.md, bench/moe_cpu.py)."""
    from qwenlocal.experts.store import MOE_MODES

    if moe not in MOE_MODES:
        raise UserError(f"Unknown --moe {moe!r}; choose one of {', '.join(MOE_MODES)}.")
    if moe == "auto":
        return "grouped" if device.type == "cuda" else "loop"
    return moe


# -- the recipe -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizing:
    """What `--quant auto` weighs a 16-bit folder against: does it fit `budget` (bytes; None:
    the free GPU memory, or on the CPU the free RAM)?"""

    device: torch.device
    dtype: torch.dtype
    ctx_size: int
    budget: int | None = None


@dataclass(frozen=True)
class RecipeDecision:
    recipe: object | None  # quant.recipe.Recipe; None: 16-bit weights
    prequantized: bool = False  # the folder holds the recipe's tensors (our own quantized layout)
    quantize_once: bool = False  # --quant auto: load the cached quantized copy (quant_cache.py)
    reason: str | None = None  # why --quant auto chose what it did: stderr and the panel


def decide_recipe(
    config: Qwen3MoeConfig, quant=None, sizing: Sizing | None = None, where: object = "config.json"
) -> RecipeDecision:
    """The recipe a folder loads with. `quant`: None (the folder as it is), "auto", "bf16"/"none",
    a preset name or a Recipe. A quantized folder keeps its own recipe (GPTQ's codes repacked; a
    16-bit GPTQ lm_head at int8 when `sizing` is a CPU's: GPTQ_LM_HEAD_INT8);
    "auto" on a 16-bit or FP8 folder keeps 16-bit weights that fit `sizing` and otherwise takes the
    default recipe, quantized once into the cache (without `sizing`, as `vram` plans a GPU: the
    default). Other presets quantize a 16-bit source while loading. `where`: the config file errors
    name."""
    from quant.recipe import DEFAULT_PRESET, Recipe
    from qwenlocal.weights.sources import DEQUANTIZED_METHODS, GPTQ_METHOD, own_recipe, quant_method

    method = quant_method(config)
    own = own_recipe(config, where)
    if own is not None and method != GPTQ_METHOD:  # our own quantized layout
        if isinstance(quant, str) and quant not in (own.preset, "auto"):
            raise UserError(f"This checkpoint is already quantized ({own.preset}); drop --quant {quant}.")
        return RecipeDecision(own, prequantized=True)
    if own is not None and quant in (None, "auto"):  # GPTQ
        if own.lm_head_bits == 16 and sizing is not None and sizing.device.type == "cpu":
            return RecipeDecision(dataclasses.replace(own, lm_head_bits=8), reason=GPTQ_LM_HEAD_INT8)
        return RecipeDecision(own)
    if quant == "auto":
        if sizing is None:
            return RecipeDecision(Recipe.from_preset(DEFAULT_PRESET), quantize_once=True)
        source = (
            config
            if method not in DEQUANTIZED_METHODS
            else dataclasses.replace(config, quantization_config=None)
        )
        fits, sizes = _fits_16bit(source, sizing)
        if fits:
            return RecipeDecision(None, reason=f"16-bit weights fit ({sizes})")
        reason = f"16-bit weights do not fit ({sizes}): {DEFAULT_PRESET}"
        return RecipeDecision(Recipe.from_preset(DEFAULT_PRESET), quantize_once=True, reason=reason)
    if quant is None or quant in ("bf16", "none"):
        return RecipeDecision(None)
    recipe = quant if isinstance(quant, Recipe) else Recipe.from_preset(quant)
    return RecipeDecision(recipe if recipe.quantizes_anything else None)


def _fits_16bit(config: Qwen3MoeConfig, sizing: Sizing) -> tuple[bool, str]:
    budget = sizing.budget
    if budget is None:
        budget = auto_budget(sizing.device) if sizing.device.type == "cuda" else host_free_bytes()
    plan = make_plan(
        recipe=None, ctx_size=sizing.ctx_size, dtype=sizing.dtype, kv_dtype=None, device=sizing.device
    )
    est = estimate(config, plan)
    need = est.gpu_total + est.host_total
    where = "GPU memory" if sizing.device.type == "cuda" else "RAM"
    return need <= budget, f"{need / 1024**3:.2f} GiB, {max(budget, 0) / 1024**3:.2f} GiB of {where} free"


def host_free_bytes() -> int:
    """RAM a CPU load may use: what the OS reports as available, minus a reserve."""
    import psutil

    return psutil.virtual_memory().available - HOST_RESERVE


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPlan:
    """How a model is loaded, checked once. Made by `plan_load`."""

    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype | None  # None: the KV cache in `dtype`
    ctx_size: int | None  # as asked; None: the config's own RoPE, memory sized for DEFAULT_CTX_SIZE
    recipe: object | None  # quant.recipe.Recipe; None: 16-bit weights
    prequantized: bool  # the folder holds the recipe's tensors
    quantize_once: bool  # the cached quantized copy is loaded instead of the folder
    reason: str | None  # why --quant auto chose the recipe (RecipeDecision.reason)
    budget: int | None  # device bytes the expert cache was sized to
    expert_slots: int | None  # slots on the device in all layers; None: every expert resident
    slots_per_layer: int | None
    policy: str
    prefetch: bool
    cold_experts: str
    moe: str  # "grouped" or "loop"

    def memory(
        self, ctx_size: int | None = None, batch: int = 1, kv_dtype: torch.dtype | None = None
    ) -> Plan:
        """The memory model's plan for this load (`ctx_size` default: the plan's)."""
        return make_plan(
            recipe=self.recipe,
            ctx_size=ctx_size or self.ctx_size or DEFAULT_CTX_SIZE,
            batch=batch,
            dtype=self.dtype,
            kv_dtype=kv_dtype or self.kv_dtype,
            device=self.device,
            expert_slots=self.expert_slots,
        )

    def config(self, config: Qwen3MoeConfig) -> Qwen3MoeConfig:
        """`config` with this plan's context (YaRN past the native one)."""
        return config if self.ctx_size is None else config.with_context(self.ctx_size)

    def loaded_from(self, source: ModelSource) -> LoadPlan:
        """This plan for the quantized copy that quantize-once made: it holds the recipe."""
        return dataclasses.replace(self, recipe=source.own_recipe, prequantized=True, quantize_once=False)


def plan_load(
    source: ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    ctx_size: int | None = None,
    quant=None,
    gpu_experts: int | None = None,
    vram_budget: int | str | None = None,
    policy: str = DEFAULT_CACHE_POLICY,
    prefetch: bool = DEFAULT_PREFETCH,
    kv_dtype: str | torch.dtype | None = None,
    moe: str = "auto",
    cold_experts: str = DEFAULT_COLD_EXPERTS,
) -> LoadPlan:
    """Check the flags against the folder and decide everything the loader needs (`load_model`'s
    arguments; `dtype` None: `default_dtype`)."""
    device, kv_dtype = parse_device(device), parse_kv_dtype(kv_dtype)
    dtype = default_dtype(source.config) if dtype is None else parse_dtype(dtype)
    parse_cold_experts(cold_experts)
    check_experts_or_budget(gpu_experts, vram_budget)
    ctx = ctx_size or DEFAULT_CTX_SIZE
    config = source.config if ctx_size is None else source.config.with_context(ctx_size)
    budget = vram_budget if isinstance(vram_budget, int) else None
    decision = decide_recipe(config, quant, Sizing(device, dtype, ctx, budget), source.folder / "config.json")
    if vram_budget == "auto" and device.type == "cuda":
        budget = auto_budget(device)
    elif vram_budget == "auto":
        budget = None  # host RAM holds everything; there is no device budget to fit
    plan = LoadPlan(
        device=device,
        dtype=dtype,
        kv_dtype=kv_dtype,
        ctx_size=ctx_size,
        recipe=decision.recipe,
        prequantized=decision.prequantized,
        quantize_once=decision.quantize_once,
        reason=decision.reason,
        budget=budget,
        expert_slots=None,
        slots_per_layer=None,
        policy=policy,
        prefetch=prefetch,
        cold_experts=cold_experts,
        moe=resolve_moe(moe, device),
    )
    return _with_expert_cache(plan, config, gpu_experts)


def _with_expert_cache(plan: LoadPlan, config: Qwen3MoeConfig, gpu_experts: int | None) -> LoadPlan:
    """Slots for experts on the device, from --gpu-experts or the budget; none: all resident."""
    layers = len(config.moe_layers)
    total, minimum = config.num_experts * layers, config.num_experts_per_tok * layers
    if gpu_experts is not None:
        if gpu_experts < minimum:
            raise UserError(
                f"--gpu-experts {gpu_experts} is too few: the cache needs at least {minimum} "
                f"({config.num_experts_per_tok} per MoE layer)."
            )
        slots = min(gpu_experts, total)
    elif plan.budget is not None:
        slots = fit_expert_slots(config, plan.memory(), plan.budget).expert_slots
    else:
        return plan
    if plan.recipe is None and slots is not None and slots < total:
        raise UserError("Expert offload needs quantized experts: add --quant mixed (or nf4, int8).")
    per_layer = None if slots is None else slots // max(layers, 1)
    if per_layer is not None and per_layer >= config.num_experts:
        per_layer = None  # everything fits: a cache that never misses is no cache at all
    slots = None if per_layer is None else per_layer * layers
    return dataclasses.replace(plan, expert_slots=slots, slots_per_layer=per_layer)
