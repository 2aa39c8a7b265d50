"""A preallocated KV cache: one [B, kv_heads, max_len, head_dim] pair per layer, no growth.

Writes go to positions given as a device tensor, so a decode step never reads a position back to
the host and the same step can be captured once and replayed (qwenlocal.model.graphs)."""

from __future__ import annotations

import torch

from qwenlocal.model.config import Qwen3MoeConfig


class KVCache:
    def __init__(
        self,
        config: Qwen3MoeConfig,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
    ):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        # fp8 halves the cache; keys and values are stored rounded and read back in `compute_dtype`
        self.compute_dtype = compute_dtype or (dtype if dtype.itemsize > 1 else torch.bfloat16)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (the same for every layer after a forward)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, end: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv, T, D] at `positions` [T] (a device tensor); return the first `end`
        stored keys/values (None: all max_len of them, for a step of fixed shape)."""
        if end is not None and end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this step needs {end}.")
        kc, vc = self.k[layer], self.v[layer]
        for cache, new in ((kc, k), (vc, v)):
            new = new.to(cache.dtype)
            if cache.dtype.itemsize == 1:  # fp8 has no index_copy_ kernel: copy its bytes
                cache, new = cache.view(torch.uint8), new.view(torch.uint8)
            cache.index_copy_(2, positions, new)
        keys, values = (kc, vc) if end is None else (kc.narrow(2, 0, end), vc.narrow(2, 0, end))
        if keys.dtype != self.compute_dtype:
            keys, values = keys.to(self.compute_dtype), values.to(self.compute_dtype)
        return keys, values

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (kept prefix reused by the next turn)."""
        self.length = min(self.length, length)

    def reset(self) -> None:
        self.length = 0
