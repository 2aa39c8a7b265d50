"""Which tensor gets which format: presets, per-class overrides, and the config.json record.

Classes: attention projections, experts (and the dense MLP of mlp_only layers), lm_head.
Router, norms and embeddings always stay 16-bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError
from .int4 import GROUP_SIZES
from .spec import DEFAULT_BLOCKSIZE, FOUR_BIT_FORMATS, VALID_BLOCKSIZES, QSpec

QUANT_METHOD = "qwenlocal"
FORMAT_VERSION = 1
DEFAULT_PRESET = "mixed"
# The default 4-bit format and int4 group size: see the README ("What each format costs").
DEFAULT_FORMAT4 = "int4"
DEFAULT_GROUP_SIZE = 64
# Every preset keeps the lm_head at 8 bits (as llama.cpp keeps its output matrix at 6-8): it is a
# third of what a decode token reads in the full model, and int8 row-wise costs it almost nothing.
PRESETS = {
    "nf4": {"attn_bits": 4, "expert_bits": 4, "lm_head_bits": 8, "fmt4": "nf4"},
    "int4": {"attn_bits": 4, "expert_bits": 4, "lm_head_bits": 8, "fmt4": "int4"},
    "mixed": {"attn_bits": 8, "expert_bits": 4, "lm_head_bits": 8},
    "int8": {"attn_bits": 8, "expert_bits": 8, "lm_head_bits": 8},
}
BITS_KEYS = ("attn_bits", "expert_bits", "lm_head_bits")
CLASSES = ("attention", "experts", "lm_head")


@dataclass(frozen=True)
class Recipe:
    attn_bits: int = 8  # 4, 8 or 16
    expert_bits: int = 4  # 4, 8 or 16 (16: the unquantized model)
    lm_head_bits: int = 16  # 8 or 16
    fmt4: str = DEFAULT_FORMAT4  # the 4-bit format: int4, nf4 or fp4
    double_quant: bool = True  # nf4/fp4: quantize the block scales too (4.50 -> 4.13 bits per weight)
    blocksize: int = DEFAULT_BLOCKSIZE  # nf4/fp4 block size
    preset: str = DEFAULT_PRESET
    group_size: int = DEFAULT_GROUP_SIZE  # int4 group size

    def __post_init__(self) -> None:
        for flag, value, allowed in (
            ("--attn-bits", self.attn_bits, (4, 8, 16)),
            ("--expert-bits", self.expert_bits, (4, 8, 16)),
            ("--lm-head-bits", self.lm_head_bits, (8, 16)),
        ):
            if value not in allowed:
                raise UserError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value}.")
        if self.fmt4 not in FOUR_BIT_FORMATS:
            raise UserError(f"--format4 must be one of {', '.join(FOUR_BIT_FORMATS)}, got {self.fmt4!r}.")
        if self.group_size not in GROUP_SIZES:
            raise UserError(
                f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}."
            )
        if self.blocksize not in VALID_BLOCKSIZES:
            raise UserError(
                f"--blocksize must be one of {', '.join(map(str, VALID_BLOCKSIZES))}, got {self.blocksize}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Recipe:
        if name == "bf16":
            return cls(attn_bits=16, expert_bits=16, lm_head_bits=16, preset="bf16")
        if name not in PRESETS:
            raise UserError(f"Unknown quantization preset {name!r}; choose one of {', '.join(PRESETS)}.")
        values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        defaults = {"lm_head_bits": 16, "fmt4": DEFAULT_FORMAT4, **PRESETS[name]}
        custom = any(overrides.get(k) not in (None, defaults.get(k)) for k in (*BITS_KEYS, "fmt4"))
        return cls(**values, preset=f"{name}+custom" if custom else name)

    @property
    def quantizes_anything(self) -> bool:
        return min(self.attn_bits, self.expert_bits, self.lm_head_bits) < 16

    def bits_for(self, cls_name: str) -> int:
        return {"attention": self.attn_bits, "experts": self.expert_bits, "lm_head": self.lm_head_bits}[
            cls_name
        ]

    def format_for(self, cls_name: str) -> str | None:
        bits = self.bits_for(cls_name)
        return None if bits == 16 else ("int8" if bits == 8 else self.fmt4)

    def blocksize_for(self, fmt: str) -> int | None:
        """Elements per scale: the int4 group size, the nf4/fp4 block size; None for int8 (rows)."""
        return {"int8": None, "int4": self.group_size}.get(fmt, self.blocksize)

    def double_quant_for(self, fmt: str) -> bool:
        return self.double_quant and fmt in ("nf4", "fp4")

    def spec(self, cls_name: str, shape: tuple[int, ...], dtype=None) -> QSpec | None:
        """The storage of one tensor of this class, or None when it stays 16-bit."""
        fmt = self.format_for(cls_name)
        if fmt is None:
            return None
        kw = {"dtype": dtype} if dtype is not None else {}
        blocksize = self.blocksize_for(fmt) or 0
        if fmt == "int4" and len(shape) == 2:
            # a width the group size does not divide (small test models) takes the largest that does
            fits = [g for g in GROUP_SIZES if g <= blocksize and shape[1] % g == 0]
            blocksize = max(fits, default=blocksize)
        return QSpec(tuple(shape), fmt, blocksize, self.double_quant_for(fmt), **kw)

    # -- the record in config.json -------------------------------------------------------------
    def to_config(self) -> dict:
        classes = {}
        for c in CLASSES:
            fmt = self.format_for(c)
            classes[c] = (
                None
                if fmt is None
                else {
                    "format": fmt,
                    "bits": self.bits_for(c),
                    "blocksize": self.blocksize_for(fmt),
                    "double_quant": self.double_quant_for(fmt),
                }
            )
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "preset": self.preset,
            "recipe": dataclasses.asdict(self),
            "classes": classes,
            "kept_16bit": ["embed_tokens", "mlp.gate (router)", "norms"],
        }

    @classmethod
    def from_config(cls, qc: dict, source: str = "config.json") -> Recipe:
        if qc.get("quant_method") != QUANT_METHOD:
            raise UserError(
                f"{source} carries a {qc.get('quant_method')!r} quantization; qwenlocal reads its own "
                "('qwenlocal quantize' output) or unquantized checkpoints."
            )
        if qc.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{source} has quantization format version {qc.get('format_version')}; "
                f"this qwenlocal reads version {FORMAT_VERSION}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in qc["recipe"].items() if k in fields})

    def describe(self) -> str:
        parts = [
            f"attention {self.format_for('attention') or 'bf16'}",
            f"experts {self.format_for('experts') or 'bf16'}",
        ]
        parts.append(f"lm_head {self.format_for('lm_head') or 'bf16'}")
        fmts = {self.format_for(c) for c in CLASSES}
        extra = ""
        if "int4" in fmts:
            extra += f", group size {self.group_size}"
        if fmts & {"nf4", "fp4"}:
            extra += f", blocksize {self.blocksize}" + (", double quant" if self.double_quant else "")
        return f"{self.preset}: " + ", ".join(parts) + extra
