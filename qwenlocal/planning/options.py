"""The flags of the commands that load a model (generate, chat, serve), declared once.

`@load_command(...)` adds them to a Typer command, which receives two records: `LoadOptions`
(where and how to load the model) and `SamplingOptions` (how to sample), to `validate()` before
a long load. A new flag is one `Flag` in a table here and one field in its record.

This module parses values and raises UserError; it imports nothing of the CLI (cli_util imports
it), and the loader takes its device and dtype parsers from here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from qwenlocal.errors import UserError
from qwenlocal.experts.cache_policy import DEFAULT_CACHE_POLICY
from qwenlocal.experts.cold import DEFAULT_COLD_EXPERTS, parse_cold_experts
from qwenlocal.experts.offload import DEFAULT_PREFETCH
from qwenlocal.model.config import DEFAULT_CTX_SIZE

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


# The MODEL argument of generate, chat and serve.
Model = Annotated[
    str | None,
    typer.Argument(
        help="Model folder or Hugging Face repo id; default: Qwen's smallest official checkpoint for the "
        "recipe (Qwen3-30B-A3B-GPTQ-Int4, ~17 GB, for 4-bit experts; Qwen3-30B-A3B-FP8, ~31 GB, otherwise).",
        show_default=False,
    ),
]


# -- values ---------------------------------------------------------------------------------------
def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"Unknown dtype {name!r}; choose one of bf16, fp16, fp32.")
    return DTYPES[name]


def parse_kv_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """None keeps the model's dtype; fp8 (e4m3) halves the KV cache."""
    from qwenlocal.planning.memory import KV_DTYPES

    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in KV_DTYPES:
        raise UserError(f"Unknown --kv-dtype {name!r}; choose one of {', '.join(KV_DTYPES)}.")
    return KV_DTYPES[name]


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


def parse_tokens(value: str | int) -> int:
    """'32768', '32k', '128K' -> tokens (k = 1024)."""
    s = str(value).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+)(k?)", s)
    if not m:
        raise UserError(f"Cannot read {value!r} as a token count; write e.g. 8192 or 32k.")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_bytes(value: str | int) -> int:
    """'8GiB', '5GB', '500MB', '1.5G' or a plain number of bytes -> bytes (G = GiB-style 1024**3)."""
    s = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", s, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"Cannot read {value!r} as a size; write e.g. 8GiB, 5GB or 500MB.")
    number, unit, binary, _ = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    base = 1024 if (binary or not m.group(4)) and unit else 1000
    return int(float(number) * base**power)


# -- the records ----------------------------------------------------------------------------------
def check_experts_or_budget(gpu_experts: int | None, vram_budget: object) -> None:
    """--gpu-experts and --vram-budget both size the expert cache: one of them at most."""
    if gpu_experts is not None and vram_budget is not None:
        raise UserError("Give --gpu-experts or --vram-budget, not both.")


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load the model, as typed on the command line."""

    device: str = "auto"
    dtype: str = "auto"
    ctx_size: str | int = DEFAULT_CTX_SIZE
    quant: str | None = None
    gpu_experts: int | None = None
    vram_budget: str | None = None
    prefetch: bool = DEFAULT_PREFETCH
    cache_policy: str = DEFAULT_CACHE_POLICY
    kv_dtype: str | None = None
    record_routing: Path | None = None
    moe: str = "auto"
    cold_experts: str = DEFAULT_COLD_EXPERTS

    @functools.cached_property
    def flags(self) -> dict[str, Any]:
        """The values parsed, once, by plan.plan_load's names (bad values fail here)."""
        device = parse_device(self.device)
        check_experts_or_budget(self.gpu_experts, self.vram_budget)
        if self.vram_budget is not None:
            budget = self.vram_budget if self.vram_budget == "auto" else parse_bytes(self.vram_budget)
        else:  # fit the free GPU memory, as llama.cpp's --fit does
            budget = "auto" if self.gpu_experts is None and device.type == "cuda" else None
        if self.quant is not None and self.quant not in ("bf16", "none", "auto"):
            from quant.recipe import Recipe

            Recipe.from_preset(self.quant)
        if self.cache_policy not in ("lru", "lfu"):
            raise UserError(f"Unknown --cache-policy {self.cache_policy!r}; choose lru or lfu.")
        from qwenlocal.experts.store import MOE_MODES

        if self.moe not in MOE_MODES:
            raise UserError(f"Unknown --moe {self.moe!r}; choose one of {', '.join(MOE_MODES)}.")
        parse_cold_experts(self.cold_experts)
        return {
            "device": device,
            "dtype": None if self.dtype == "auto" else parse_dtype(self.dtype),
            "ctx_size": parse_tokens(self.ctx_size),
            "quant": self.quant or "auto",
            "gpu_experts": self.gpu_experts,
            "vram_budget": budget,
            "policy": self.cache_policy,
            "prefetch": self.prefetch,
            "kv_dtype": parse_kv_dtype(self.kv_dtype),
            "moe": self.moe,
            "cold_experts": self.cold_experts,
        }

    def validate(self) -> LoadOptions:
        """Bad values fail here, before a long load."""
        _ = self.flags
        return self

    def model_or_default(self, model: str | None) -> str:
        """MODEL as given, or the official checkpoint that serves --quant (sources.default_model)."""
        from qwenlocal.weights.sources import default_model

        return model if model is not None else default_model(self.quant)

    @property
    def ctx(self) -> int:
        return self.flags["ctx_size"]


@dataclass(frozen=True)
class SamplingOptions:
    """Mode and sampling as typed; None means the mode's default (Qwen's recommended values)."""

    think: bool = True
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None

    def overrides(self) -> dict[str, float | int]:
        """The values given, by SamplingParams' names."""
        names = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "seed")
        return {k: v for k in names if (v := getattr(self, k)) is not None}

    def params(self, generation: dict | None = None, thinking: bool | None = None):
        """SamplingParams for the mode (`thinking` overrides `think`), these values winning over
        the model's `generation` config."""
        from qwenlocal.generation.generate import SamplingParams

        mode = self.think if thinking is None else thinking
        return SamplingParams.for_mode(mode, generation, **self.overrides())

    def validate(self) -> SamplingOptions:
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise UserError(f"--max-tokens must be positive, got {self.max_tokens}.")
        self.params()
        return self


# -- the flags ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    name: str  # the record's field
    type: Any
    decls: tuple[str, ...]
    help: str


LOAD_FLAGS = (
    Flag("device", str, ("--device",), "auto, cpu, cuda, cuda:N."),
    Flag(
        "dtype",
        str,
        ("--dtype",),
        "bf16, fp16 or fp32; auto (default): the checkpoint's 16-bit dtype, bf16 for quantized and fp32 folders.",
    ),
    Flag("ctx_size", str, ("--ctx-size", "-c"), "Context size in tokens (8192, 32k)."),
    Flag(
        "quant",
        str | None,
        ("--quant",),
        "auto (default): a 16-bit model that fits the device loads as it is, one that does not is "
        "quantized once (mixed); mixed, int4, nf4, int8: quantize while loading; bf16: as it is. "
        "A quantized folder keeps its own.",
    ),
    Flag("gpu_experts", int | None, ("--gpu-experts",), "Expert slots on the GPU, in all layers."),
    Flag(
        "vram_budget",
        str | None,
        ("--vram-budget",),
        "Size the expert cache to fit, e.g. 8GiB; default on a GPU: auto (free memory).",
    ),
    Flag(
        "prefetch", bool, ("--prefetch/--no-prefetch",), "Guess the next layer's experts and copy them early."
    ),
    Flag("cache_policy", str, ("--cache-policy",), "Expert cache policy: lfu (frequency with decay) or lru."),
    Flag(
        "kv_dtype",
        str | None,
        ("--kv-dtype",),
        "KV cache storage: bf16, fp16, fp8 (half the memory) or fp32.",
    ),
    Flag(
        "record_routing",
        Path | None,
        ("--record-routing",),
        "Write the experts picked per layer per token (JSON lines).",
    ),
    Flag(
        "moe",
        str,
        ("--moe",),
        "Expert compute: grouped (two kernel launches a layer; decode as a CUDA graph), loop, "
        "or auto (grouped on a GPU, loop on the CPU).",
    ),
    Flag(
        "cold_experts",
        str,
        ("--cold-experts",),
        "An expert without a GPU slot: copy it in (copy), compute it on the CPU (cpu), or pick by measured times (auto).",
    ),
)
SAMPLING_FLAGS = (
    Flag("think", bool, ("--think/--no-think",), "Thinking mode."),
    Flag(
        "temperature", float | None, ("--temp",), "Temperature; 0 is greedy (default: Qwen's for the mode)."
    ),
    Flag("top_k", int | None, ("--top-k",), "Sample from the k likeliest tokens; 0 turns it off."),
    Flag("top_p", float | None, ("--top-p",), "Sample from the likeliest tokens holding this mass."),
    Flag("min_p", float | None, ("--min-p",), "Drop tokens below this share of the likeliest one."),
    Flag(
        "presence_penalty", float | None, ("--presence-penalty",), "Subtract from tokens already generated."
    ),
    Flag("seed", int | None, ("--seed",), "Random seed (chat: reply n samples with seed + n)."),
    Flag("max_tokens", int | None, ("--max-tokens", "-n"), "Most tokens per reply."),
)


def load_command(**defaults: Any) -> Callable[[Callable], Callable]:
    """Give a Typer command the load and sampling flags. The command declares its own arguments
    and flags plus `load: LoadOptions` and `sampling: SamplingOptions`; `defaults` sets a
    command's own default for a flag (e.g. ctx_size="8192")."""
    records = {"load": (LoadOptions, LOAD_FLAGS), "sampling": (SamplingOptions, SAMPLING_FLAGS)}
    fields = {f.name: (f, cls) for cls, flags in records.values() for f in flags}
    unknown = set(defaults) - set(fields)
    if unknown:
        raise TypeError(f"no such flags: {sorted(unknown)}")

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name not in records]
        added = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=defaults.get(f.name, _field_default(cls, f.name)),
                annotation=Annotated[f.type, typer.Option(*f.decls, help=f.help)],
            )
            for f, cls in fields.values()
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            built = {
                key: cls(**{f.name: kwargs.pop(f.name) for f in flags})
                for key, (cls, flags) in records.items()
            }
            return fn(**kwargs, **built)

        params = [*own, *added]
        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


def _field_default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
