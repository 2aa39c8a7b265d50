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

import functools
import re
import sys
from dataclasses import dataclass

import torch

from quant.formats import QTensor
from quant.int4 import cpu_packing_parts
from qwenlocal.errors import UserError
from qwenlocal.weights.checkpoint import Checkpoint, DequantizingCheckpoint

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
        self.default, self.dynamic = checked_params(qc, self.folder / "config.json")
        # X.weight stands for X.qweight (and its parts, wherever they are stored)
        self.quantized = {
            n.removesuffix(".qweight"): shard
            for n, shard in self.weight_map.items()
            if n.endswith(".qweight")
        }
        for prefix, shard in self.quantized.items():
            self.weight_map[prefix + ".weight"] = shard

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

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight int32 [in / p, out], zeros int32 [groups, out], scales [groups, out], g_idx) of
        `name` (X.weight), checked against its shape; zeros are the true zero points; g_idx is None
        when the groups are runs of consecutive rows (always so without desc_act), else int64 [in]."""
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
        g_idx = self.raw(prefix + ".g_idx").long() if f"{prefix}.g_idx" in self else None
        if g_idx is not None and torch.equal(g_idx, _ordered(n_in, p.group(n_in))):
            g_idx = None
        bad = g_idx is not None and (
            tuple(g_idx.shape) != (n_in,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups
        )
        if bad:
            raise UserError(
                f"GPTQ tensor {prefix}.g_idx in {self.folder} does not give each of {n_in} rows a group."
            )
        if self.format == "gptq":  # the same 32 bits after the add (int64 -> int32 keeps the low bits)
            qzeros = (qzeros.long() + V1_ZERO_OFFSET[p.bits]).to(torch.int32)
        return self.raw(prefix + ".qweight"), unpack_cols(qzeros, p.bits), scales, g_idx

    def repacked(self, name: str, spec) -> QTensor | None:
        """`name` in the int4 format of `spec`, moved from its GPTQ codes without a float step, or
        None when it is not 4-bit GPTQ with groups that split into the spec's (the caller then
        quantizes the dequantized weight). GPTQ's fp16 scale is stored in bf16, and its integer zero
        point qz becomes int4's float zero, the value of code 8: scale * (8 - qz)."""
        if spec.fmt != "int4" or not self.is_packed(name) or self.params(name).bits != 4:
            return None
        qweight, zeros, scales, g_idx = self.packed(name)
        out, n_in = self.shape(name)
        if g_idx is not None:
            raise UserError(
                f"{name.removesuffix('.weight')} in {self.folder} has act-order (desc_act) groups, which the "
                "int4 format cannot hold in order; load it with --quant int8 or --quant nf4 instead."
            )
        group = self.params(name).group(n_in)
        if group % spec.blocksize or sys.byteorder != "little":
            return None
        s, groups = scales.float(), scales.shape[0]
        split = group // spec.blocksize  # a GPTQ group of 128 (or all rows) is several int4 groups
        scale_zero = torch.empty(groups * split, out, 2, dtype=torch.bfloat16)
        both = scale_zero.view(groups, split, out, 2)
        both[..., 0].copy_(s.unsqueeze(1).expand(groups, split, out))
        both[..., 1].copy_(((8 - zeros) * s).unsqueeze(1).expand(groups, split, out))
        if spec.packing == "plain":
            # A word holds input rows 8r..8r+7, two to a byte, the even row in the low nibble; int4
            # wants the even row in the high nibble: the same bytes, transposed, nibbles swapped.
            b = qweight.T.contiguous().view(torch.uint8)  # [out, in / 2]
            weight = (b << 4).bitwise_or_(b >> 4)
        else:
            weight = words_to_cpu_layout(qweight, (out, n_in), spec.packing)
        return QTensor(
            "int4",
            (out, n_in),
            spec.dtype,
            spec.blocksize,
            weight,
            scale_zero=scale_zero,
            packing=spec.packing,
        )

    def dequantized(self, name: str) -> torch.Tensor:
        if not self.is_packed(name):
            return self.raw(name)
        qweight, zeros, scales, g_idx = self.packed(name)
        codes = unpack_rows(qweight, self.params(name).bits)
        if g_idx is None:
            g_idx = _ordered(codes.shape[0], self.params(name).group(codes.shape[0]))
        # in fp32, exact: (code - zero) is a small integer and an fp16 scale is an fp32 number
        w = (codes.float() - zeros[g_idx].float()) * scales[g_idx].float()
        return w.T.contiguous()


def words_to_cpu_layout(qweight: torch.Tensor, shape: tuple[int, int], packing: str) -> torch.Tensor:
    """GPTQ's 4-bit words, int32 [K / 8, N], straight into a CPU int4 kernel layout, uint8 [N, K / 2]
    (quant/int4.py), in one pass. Both are K-major: word byte b of row r holds input rows
    k = 8r + 2b (low nibble) and 8r + 2b + 1 (high) of one output n; a kernel-layout byte holds
    one input row k of two outputs of a block (the first in the low nibble)."""
    n, k = shape
    block, style = cpu_packing_parts(packing)
    q = qweight.view(torch.uint8).view(k // 8, n // block, block, 4)  # [r, block, row in block, b]
    if style == "halves":  # outputs j and j + B/2 of a block share a byte
        first, second = q[:, :, : block // 2], q[:, :, block // 2 :]
    else:  # outputs 2j and 2j + 1
        first, second = q[:, :, 0::2], q[:, :, 1::2]
    first, second = first.permute(1, 0, 3, 2), second.permute(1, 0, 3, 2)  # [block, r, b, j]
    out = torch.empty(n // block, k // 8, 4, 2, block // 2, dtype=torch.uint8)  # k = 8r + 2b + h
    torch.bitwise_or(first & 15, second << 4, out=out[:, :, :, 0])
    torch.bitwise_or(first >> 4, second & 0xF0, out=out[:, :, :, 1])
    return out.view(n, k // 2)


@functools.cache
def _ordered(n_in: int, group: int) -> torch.Tensor:
    """The g_idx of groups in order: row k is in group k // group."""
    return torch.arange(n_in) // group


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, cols / p] holding p = 32 / bits codes per word (lowest first) -> int32 [rows, cols],
    read from the words' bytes on a little-endian machine (code j of a word is in byte j * bits / 8)."""
    if sys.byteorder != "little":
        return unpack_rows(packed.T, bits).T.to(torch.int32)
    b = packed.contiguous().view(torch.uint8)  # [rows, cols * bits / 8]
    if bits == 8:
        return b.to(torch.int32)
    return torch.stack([b & 15, b >> 4], dim=-1).view(b.shape[0], -1).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows / p, cols] holding p = 32 / bits codes per word (lowest first) -> uint8 [rows, cols]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    codes = (packed.long().unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[-1]).to(torch.uint8)


def checked_params(
    qc: dict, where: object = "config.json"
) -> tuple[GptqParams, list[tuple[str, GptqParams]]]:
    """The default bits and group size of a GPTQ quantization_config, and GPTQModel's `dynamic`
    overrides ({"+:regex" or "regex": overrides; "-:regex", left 16-bit, is not listed)."""

    def params(rule: dict, what: str) -> GptqParams:
        bits, group = rule.get("bits"), int(rule.get("group_size", 128))
        if bits not in GPTQ_BITS:
            raise UserError(f"{where}{what} asks for {bits}-bit GPTQ; qwenlocal reads 4- and 8-bit GPTQ.")
        if group != -1 and group <= 0:
            raise UserError(f"{where}{what} has GPTQ group_size {group}; it must be positive or -1.")
        return GptqParams(bits, group)

    dynamic = [
        (key.removeprefix("+:"), params({**qc, **rule}, f" (dynamic rule {key!r})"))
        for key, rule in (qc.get("dynamic") or {}).items()
        if not key.startswith("-:")
    ]
    return params(qc, ""), dynamic


def gptq_recipe(config, qc: dict, where: object = "config.json"):
    """The recipe a GPTQ folder loads with when no --quant is given, from its config alone (so
    `vram` and the loader agree). 4-bit classes become int4, their codes repacked, in groups of
    GPTQ's size (or the largest of 128, 64, 32 that splits it and every input width); 8-bit ones
    become int8 row-wise, requantized from the dequantized weights (int8 keeps one scale per row,
    GPTQ one per group: this is the one float step). What GPTQ left 16-bit stays 16-bit."""
    from quant.int4 import GROUP_SIZES
    from quant.recipe import Recipe

    checked_params(qc, where)  # bits that GPTQ cannot have fail here, in GPTQ's words

    h, d = config.hidden_size, config.head_dim
    widths = (h, config.moe_intermediate_size, config.num_attention_heads * d)
    group = int(qc.get("group_size", 128))
    group = next(
        g
        for g in sorted(GROUP_SIZES, reverse=True)
        if all(w % g == 0 for w in widths) and (group == -1 or group % g == 0)
    )
    layer = config.moe_layers[0] if config.moe_layers else 0
    examples = {
        "attn_bits": f"model.layers.{layer}.self_attn.q_proj",
        "expert_bits": f"model.layers.{layer}.mlp.experts.0.gate_proj",
        "lm_head_bits": "lm_head",
    }
    bits = {key: _bits_of(name, qc) for key, name in examples.items()}
    bits["lm_head_bits"] = 8 if bits["lm_head_bits"] < 16 else 16  # a quantized lm_head: int8
    return Recipe(**bits, fmt4="int4", group_size=group, double_quant=False, preset="gptq")


def _bits_of(prefix: str, qc: dict) -> int:
    """GPTQ's bits for a module, or 16 when its config leaves it out."""
    if prefix == "lm_head" and not qc.get("lm_head", False):
        return 16
    if any(m in prefix for m in qc.get("modules_to_not_convert") or ()):
        return 16
    for key, rule in (qc.get("dynamic") or {}).items():
        if re.match(key.removeprefix("-:").removeprefix("+:"), prefix):
            return 16 if key.startswith("-:") else int(rule.get("bits", qc["bits"]))
    return int(qc["bits"])
