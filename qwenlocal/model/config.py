"""Model config: a frozen dataclass with Hugging Face's key names, read from config.json.

Reads both spellings found in the wild: transformers 4.x (`num_experts`, `rope_theta`,
`rope_scaling`) and 5.x (`num_local_experts`, `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qwenlocal.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)
BUILTIN_DIR = Path(__file__).parent.parent / "data" / "qwen3-30b-a3b"
DEFAULT_MODEL_ID = "Qwen/Qwen3-30B-A3B"
# Qwen3's native context; configs say 40,960 but the model card gives 32,768 as native.
NATIVE_CONTEXT = 32768
# The context a command and load_model() give the model when none is asked for.
DEFAULT_CTX_SIZE = 4096


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclass(frozen=True)
class Qwen3MoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    eos_token_id: tuple[int, ...] = (151645,)
    bos_token_id: int | None = None
    model_type: str = "qwen3_moe"
    # The quantization recipe a quantized checkpoint carries (None: 16-bit weights).
    quantization_config: dict | None = field(default=None, compare=False, hash=False)

    # -- derived -----------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def native_context(self) -> int:
        if self.rope_scaling is not None and self.rope_scaling.original_max_position_embeddings:
            return self.rope_scaling.original_max_position_embeddings
        return min(self.max_position_embeddings, NATIVE_CONTEXT)

    @property
    def max_context(self) -> int:
        """The longest context the model supports: YaRN factor 4 over the native context."""
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "yarn":
            return int(self.rope_scaling.factor * self.native_context)
        return YARN_MAX_FACTOR * self.native_context

    def with_context(self, ctx_size: int) -> Qwen3MoeConfig:
        """This config, with YaRN switched on when `ctx_size` is past the native context."""
        if ctx_size <= 0:
            raise UserError(f"The context size must be positive, got {ctx_size}.")
        if ctx_size > self.max_context:
            raise UserError(
                f"A context of {ctx_size:,} tokens is past what this model supports "
                f"({self.max_context:,} with YaRN)."
            )
        if ctx_size <= self.native_context or self.rope_scaling is not None:
            return self
        factor = float(YARN_MAX_FACTOR if ctx_size > 2 * self.native_context else 2)
        return dataclasses.replace(
            self,
            rope_scaling=RopeScaling(
                rope_type="yarn", factor=factor, original_max_position_embeddings=self.native_context
            ),
        )

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> Qwen3MoeConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{source} describes a model of type {model_type!r}; qwenlocal supports "
                f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} (the Qwen3 MoE family)."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and v is not None}
        if "num_experts" not in d and "num_local_experts" in d:
            kw["num_experts"] = d["num_local_experts"]
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        if "rope_theta" not in d and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = rope
        kw["rope_scaling"] = _read_rope_scaling(scaling, source)
        if "head_dim" not in d or d["head_dim"] is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        kw["mlp_only_layers"] = tuple(d.get("mlp_only_layers") or ())
        eos = d.get("eos_token_id")
        if eos is not None:
            kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (eos,)
        kw["rope_theta"] = float(kw.get("rope_theta", cls.rope_theta))
        try:
            return cls(**kw)
        except TypeError as e:
            raise UserError(f"{source} is not a valid Qwen3 MoE config: {e}.") from None

    @classmethod
    def from_file(cls, path: str | Path, into: dict | None = None) -> Qwen3MoeConfig:
        """`into`: a dict that receives the file's JSON too (read once, used twice)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist: a model folder needs a config.json.")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}).") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is not a JSON object.")
        if into is not None:
            into.update(d)
        return cls.from_dict(d, source=str(path))

    @classmethod
    def builtin(cls) -> Qwen3MoeConfig:
        """Qwen3-30B-A3B's own config, shipped inside the package."""
        return cls.from_file(BUILTIN_DIR / "config.json")

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2) + 2 * d
        per_layer = attn + 2 * h
        total = 0
        for i in range(self.num_hidden_layers):
            total += per_layer
            if self.is_moe_layer(i):
                total += self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
            else:
                total += 3 * h * self.intermediate_size
        embed = self.vocab_size * h
        return total + embed * (1 if self.tie_word_embeddings else 2) + h


YARN_MAX_FACTOR = 4


def _read_rope_scaling(s: dict | None, source: str) -> RopeScaling | None:
    if not s:
        return None
    rope_type = s.get("rope_type", s.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise UserError(f"{source} asks for RoPE scaling {rope_type!r}; qwenlocal supports 'yarn'.")
    if "original_max_position_embeddings" not in s or "factor" not in s:
        raise UserError(f"{source}: YaRN scaling needs 'factor' and 'original_max_position_embeddings'.")
    return RopeScaling(
        rope_type="yarn",
        factor=float(s["factor"]),
        original_max_position_embeddings=int(s["original_max_position_embeddings"]),
        attention_factor=s.get("attention_factor"),
        beta_fast=float(s.get("beta_fast") or 32),
        beta_slow=float(s.get("beta_slow") or 1),
        truncate=bool(s.get("truncate", True)),
    )


def yarn_attention_factor(factor: float) -> float:
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
