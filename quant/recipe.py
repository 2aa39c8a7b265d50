"""Which tensor gets which format: presets, per-class overrides, and the config.json record.

Classes: attention projections, experts (and the dense MLP of mlp_only layers), lm_head.
Router, norms and embeddings always stay 16-bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UserError
from .formats import DEFAULT_BLOCKSIZE, FOUR_BIT_FORMATS, VALID_BLOCKSIZES, QSpec

QUANT_METHOD = "qwenlocal"
FORMAT_VERSION = 1
DEFAULT_PRESET = "mixed"
PRESETS = {
    "nf4": {"attn_bits": 4, "expert_bits": 4},
    "mixed": {"attn_bits": 8, "expert_bits": 4},
    "int8": {"attn_bits": 8, "expert_bits": 8},
}
CLASSES = ("attention", "experts", "lm_head")


@dataclass(frozen=True)
class Recipe:
    attn_bits: int = 8  # 4, 8 or 16
    expert_bits: int = 4  # 4, 8 or 16 (16: the unquantized model)
    lm_head_bits: int = 16  # 8 or 16
    fmt4: str = "nf4"  # the 4-bit format: nf4 or fp4
    double_quant: bool = True  # quantize the 4-bit block scales too (4.50 -> 4.13 bits per weight)
    blocksize: int = DEFAULT_BLOCKSIZE
    preset: str = DEFAULT_PRESET

    def __post_init__(self) -> None:
        for flag, value, allowed in (
            ("--attn-bits", self.attn_bits, (4, 8, 16)),
            ("--expert-bits", self.expert_bits, (4, 8, 16)),
            ("--lm-head-bits", self.lm_head_bits, (8, 16)),
        ):
            if value not in allowed:
                raise UserError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value}.")
        if self.fmt4 not in FOUR_BIT_FORMATS:
            raise UserError(f"The 4-bit format must be nf4 or fp4, got {self.fmt4!r}.")
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
        custom = any(
            overrides.get(k) not in (None, PRESETS[name].get(k)) for k in ("attn_bits", "expert_bits")
        )
        custom = custom or overrides.get("lm_head_bits") not in (None, 16)
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

    def spec(self, cls_name: str, shape: tuple[int, ...], dtype=None) -> QSpec | None:
        """The storage of one tensor of this class, or None when it stays 16-bit."""
        fmt = self.format_for(cls_name)
        if fmt is None:
            return None
        kw = {"dtype": dtype} if dtype is not None else {}
        dq = self.double_quant and fmt != "int8"
        return QSpec(tuple(shape), fmt, self.blocksize, dq, **kw)

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
                    "blocksize": None if fmt == "int8" else self.blocksize,
                    "double_quant": self.double_quant and fmt != "int8",
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
        extra = f", blocksize {self.blocksize}" + (", double quant" if self.double_quant else "")
        return f"{self.preset}: " + ", ".join(parts) + (extra if self.quantizes_anything else "")
