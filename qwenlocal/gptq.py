"""GPTQ checkpoints (Qwen/Qwen3-30B-A3B-GPTQ-Int4 and the like) read as a source.

The layout, per quantized linear `X` of shape [out, in] (AutoGPTQ / GPTQModel / transformers):

    X.qweight  int32 [in * bits / 32, out]   8 (4-bit) or 4 (8-bit) codes per word along the input
                                             dimension, lowest bits first: code(k, n) =
                                             qweight[k // p, n] >> (bits * (k % p)) & (2^bits - 1)
    X.qzeros   int32 [groups, out * bits / 32]  zero points packed the same way along the output
    X.scales   fp16  [groups, out]
    X.g_idx    int32 [in]                    the group of each input row (k // group_size in order;
                                             any order with desc_act)
    w[n, k] = (code(k, n) - zero(g_idx[k], n)) * scale(g_idx[k], n)

`checkpoint_format` "gptq" (v1, the default) stores each zero point minus one; GPTQModel writes it
by subtracting 0x11111111 (4-bit) / 0x01010101 (8-bit) from each int32 word and reads it back by
adding the same, so a borrow between fields is undone too. "gptq_v2" stores the zeros as they are.
`group_size` -1 means one group over the whole input dimension. Tensors without a qweight
(embeddings, norms, the router, lm_head, `modules_to_not_convert`, `dynamic` exclusions) are
16-bit and read as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from quant.formats import QTensor

from .checkpoint import Checkpoint, DequantizingCheckpoint
from .errors import UserError

GPTQ_BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
PARTS = ("qweight", "qzeros", "scales", "g_idx")
V1_ZERO_OFFSET = {4: 0x11111111, 8: 0x01010101}


@dataclass(frozen=True)
class GptqParams:
    bits: int
    group_size: int  # -1: one group over the whole input dimension

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def group(self, n_in: int) -> int:
        return n_in if self.group_size == -1 else self.group_size


class GptqCheckpoint(DequantizingCheckpoint):
    """A GPTQ folder whose `X.weight` reads as the dequantized weight; `packed(name)` gives the
    stored codes for a repack without a float step."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None = None):
        super().__init__(ckpt, dtype)
        qc = self.source_quantization
        self.format = qc.get("checkpoint_format") or qc.get("format") or "gptq"
        if self.format not in GPTQ_FORMATS:
            raise UserError(
                f"{self.folder / 'config.json'} has GPTQ checkpoint_format {self.format!r}; "
                "qwenlocal reads gptq and gptq_v2."
            )
        self.desc_act = bool(qc.get("desc_act", False))
        self.default = self._checked(qc, "")
        # GPTQModel's `dynamic`: {"+:regex" or "regex": overrides, "-:regex": left 16-bit}
        self.dynamic = [
            (key.removeprefix("+:"), self._checked({**qc, **rule}, f" (dynamic rule {key!r})"))
            for key, rule in (qc.get("dynamic") or {}).items()
            if not key.startswith("-:")
        ]
        # X.weight stands for X.qweight (and its parts, wherever they are stored)
        self.quantized = {
            n.removesuffix(".qweight"): shard
            for n, shard in self.weight_map.items()
            if n.endswith(".qweight")
        }
        for prefix, shard in self.quantized.items():
            self.weight_map[prefix + ".weight"] = shard

    def _checked(self, qc: dict, what: str) -> GptqParams:
        where = f"{self.folder / 'config.json'}{what}"
        bits, group = qc.get("bits"), int(qc.get("group_size", 128))
        if bits not in GPTQ_BITS:
            raise UserError(f"{where} asks for {bits}-bit GPTQ; qwenlocal reads 4- and 8-bit GPTQ.")
        if group != -1 and group <= 0:
            raise UserError(f"{where} has GPTQ group_size {group}; it must be positive or -1.")
        return GptqParams(bits, group)

    def params(self, name: str) -> GptqParams:
        prefix = name.removesuffix(".weight")
        return next((p for pattern, p in self.dynamic if re.match(pattern, prefix)), self.default)

    def is_packed(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.quantized

    def shape(self, name: str) -> tuple[int, ...]:
        if not self.is_packed(name):
            return super().shape(name)
        rows, out = super().shape(name.removesuffix("weight") + "qweight")
        return (out, rows * self.params(name).pack)

    def nbytes(self, name: str) -> int:
        if not self.is_packed(name):
            return super().nbytes(name)
        prefix = name.removesuffix(".weight")
        return sum(
            super(GptqCheckpoint, self).nbytes(f"{prefix}.{p}") for p in PARTS if f"{prefix}.{p}" in self
        )

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [in, out], zeros int32 [groups, out], scales [groups, out], g_idx int64 [in])
        of `name` (X.weight), checked against its shape; zeros are the true zero points."""
        prefix, p = name.removesuffix(".weight"), self.params(name)
        out, n_in = self.shape(name)
        for part in ("qzeros", "scales"):
            if f"{prefix}.{part}" not in self:
                raise UserError(
                    f"GPTQ tensor {prefix}.qweight in {self.folder} has no {prefix}.{part} beside it."
                )
        groups = -(-n_in // p.group(n_in))
        qzeros, scales = self.raw(prefix + ".qzeros"), self.raw(prefix + ".scales")
        for part, t, shape in (
            ("qzeros", qzeros, (groups, out // p.pack)),
            ("scales", scales, (groups, out)),
        ):
            if tuple(t.shape) != shape:
                raise UserError(
                    f"GPTQ tensor {prefix}.{part} in {self.folder} has shape {list(t.shape)}; "
                    f"{p.bits}-bit groups of {p.group_size} over [{out}, {n_in}] need {list(shape)}."
                )
        ordered = torch.arange(n_in) // p.group(n_in)
        g_idx = self.raw(prefix + ".g_idx").long() if f"{prefix}.g_idx" in self else ordered
        if tuple(g_idx.shape) != (n_in,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise UserError(
                f"GPTQ tensor {prefix}.g_idx in {self.folder} does not give each of {n_in} rows a group."
            )
        zeros = qzeros.long()
        if self.format == "gptq":
            zeros = (zeros + V1_ZERO_OFFSET[p.bits]) & 0xFFFFFFFF
        codes = unpack_rows(self.raw(prefix + ".qweight"), p.bits)
        return codes, unpack_rows(zeros.T, p.bits).T.to(torch.int32), scales, g_idx

    def in_order(self, name: str, g_idx: torch.Tensor) -> bool:
        """Whether the groups are runs of consecutive input rows (always so without desc_act)."""
        return torch.equal(g_idx, torch.arange(g_idx.numel()) // self.params(name).group(g_idx.numel()))

    def repacked(self, name: str, spec) -> QTensor | None:
        """`name` in the int4 format of `spec`, moved from its GPTQ codes without a float step, or
        None when it is not 4-bit GPTQ with groups that split into the spec's (the caller then
        quantizes the dequantized weight). GPTQ's fp16 scale is stored in bf16, and its integer zero
        point qz becomes int4's float zero, the value of code 8: scale * (8 - qz)."""
        if spec.fmt != "int4" or not self.is_packed(name) or self.params(name).bits != 4:
            return None
        codes, zeros, scales, g_idx = self.packed(name)
        n_in, out = codes.shape
        if not self.in_order(name, g_idx):
            raise UserError(
                f"{name.removesuffix('.weight')} in {self.folder} has act-order (desc_act) groups, which the "
                "int4 format cannot hold in order; load it with --quant int8 or --quant nf4 instead."
            )
        group = self.params(name).group(n_in)
        if group % spec.blocksize:
            return None
        per = group // spec.blocksize  # a GPTQ group of 128 (or all rows) is several int4 groups
        s = scales.float().repeat_interleave(per, 0)
        z = zeros.float().repeat_interleave(per, 0)
        scale_zero = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16)
        c = codes.T
        weight = (c[:, 0::2] << 4) | c[:, 1::2]
        return QTensor(
            "int4", (out, n_in), spec.dtype, spec.blocksize, weight.contiguous(), scale_zero=scale_zero
        )

    def dequantized(self, name: str) -> torch.Tensor:
        if not self.is_packed(name):
            return self.raw(name)
        codes, zeros, scales, g_idx = self.packed(name)
        # in fp32, exact: (code - zero) is a small integer and an fp16 scale is an fp32 number
        w = (codes.float() - zeros[g_idx].float()) * scales[g_idx].float()
        return w.T.contiguous()


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows / p, cols] holding p = 32 / bits codes per word (lowest first) -> uint8 [rows, cols]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    codes = (packed.long().unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[-1]).to(torch.uint8)
