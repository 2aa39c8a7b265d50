"""Rotary position embeddings: plain RoPE (rotate_half) and YaRN, cos/sin in fp32."""

from __future__ import annotations

import math

import torch

from qwenlocal.model.config import Qwen3MoeConfig, yarn_attention_factor


def inv_freq_and_scale(config: Qwen3MoeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the factor applied to cos and sin."""
    dim, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    s = config.rope_scaling
    if s is None:
        return inv_freq, 1.0
    # YaRN: interpolate low frequencies, keep high ones, ramp between (arXiv 2309.00071).
    # The factor comes from rope_scaling, never from max_position_embeddings (transformers #38224).
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / s.factor) * (1 - extrapolation) + inv_freq * extrapolation
    scale = s.attention_factor if s.attention_factor is not None else yarn_attention_factor(s.factor)
    return inv_freq, float(scale)


class Rope:
    """cos/sin tables for positions [0, max_len), fp32, built once per device. `sin` carries
    rotate_half's sign (its first half negated), so RoPE is x * cos + x.roll(D/2) * sin."""

    def __init__(self, config: Qwen3MoeConfig, max_len: int, device: torch.device | str = "cpu"):
        inv_freq, scale = inv_freq_and_scale(config)
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [max_len, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device)
        sin = emb.sin() * scale
        sin[:, : sin.shape[-1] // 2] *= -1
        self.sin = sin.to(device)
        self.max_len = max_len

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] for a device tensor of positions [T] (no host read: replayable)."""
        return self.cos.index_select(0, positions).to(dtype), self.sin.index_select(0, positions).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin (signed, see Rope): [T, D]. Equal, bit for bit, to transformers'
    x * cos + rotate_half(x) * sin: roll gives (x2, x1), the sign sits in the table."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
