"""Flags shared by the commands that load a model (generate, chat, serve): memory and offload.

Kept apart from cli.py so that chat.py and server.py can use them in their signatures without
importing the CLI module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .cache_policy import DEFAULT_CACHE_POLICY
from .offload import DEFAULT_PREFETCH

Quant = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help="auto (default): a 16-bit model that fits the device loads as it is, one that does not is "
        "quantized once (mixed); mixed, int4, nf4, int8: quantize while loading; bf16: as it is. "
        "A quantized folder keeps its own.",
    ),
]
GpuExperts = Annotated[
    int | None, typer.Option("--gpu-experts", help="Expert slots on the GPU, in all layers.")
]
VramBudget = Annotated[
    str | None,
    typer.Option(
        "--vram-budget", help="Size the expert cache to fit, e.g. 8GiB; default on a GPU: auto (free memory)."
    ),
]
Prefetch = Annotated[
    bool, typer.Option("--prefetch/--no-prefetch", help="Guess the next layer's experts and copy them early.")
]
CachePolicy = Annotated[
    str, typer.Option("--cache-policy", help="Expert cache policy: lfu (frequency with decay) or lru.")
]
KvDtype = Annotated[
    str | None,
    typer.Option("--kv-dtype", help="KV cache storage: bf16, fp16, fp8 (half the memory) or fp32."),
]
RecordRouting = Annotated[
    Path | None,
    typer.Option("--record-routing", help="Write the experts picked per layer per token (JSON lines)."),
]


@dataclass(frozen=True)
class MemoryOptions:
    quant: str | None = None
    gpu_experts: int | None = None
    vram_budget: str | None = None
    prefetch: bool = DEFAULT_PREFETCH
    cache_policy: str = DEFAULT_CACHE_POLICY
    record_routing: Path | None = None
    kv_dtype: str | None = None

    def validate(self) -> MemoryOptions:
        """Bad values fail before a long load."""
        from .errors import UserError

        if self.quant is not None and self.quant not in ("bf16", "none", "auto"):
            from quant.recipe import Recipe

            Recipe.from_preset(self.quant)
        if self.cache_policy not in ("lru", "lfu"):
            raise UserError(f"Unknown --cache-policy {self.cache_policy!r}; choose lru or lfu.")
        if self.gpu_experts is not None and self.vram_budget is not None:
            raise UserError("Give --gpu-experts or --vram-budget, not both.")
        self.budget_bytes()
        from .loader import parse_kv_dtype

        parse_kv_dtype(self.kv_dtype)
        return self

    def budget_bytes(self) -> int | str | None:
        if self.vram_budget is None or self.vram_budget == "auto":
            return self.vram_budget
        from .cli_util import parse_bytes  # noqa: PLC0415 - cli_util imports this module

        return parse_bytes(self.vram_budget)
