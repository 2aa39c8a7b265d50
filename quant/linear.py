"""QuantLinear: an nn.Module whose weight is a QTensor, and `qmatmul`, the torch op it computes
through: on CUDA a few tokens take the Triton GEMV (quant/moe_kernels.py) for the formats it
reads; everything else goes to quant.kernels.qlinear, the one dispatch of the other kernels.

int8 is computed as x @ dequantize(W).T (bnb's row scales), not LLM.int8()'s 8-bit activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import moe_kernels
from .formats import QTensor, dequantize, quantize
from .kernels import decode_in_bf16, qlinear, to_kernel_layout
from .spec import DEFAULT_BLOCKSIZE, PARTS, QSpec


class QuantLinear(nn.Module):
    """A bias-optional linear layer whose weight is a QTensor, stored as buffers.

    Buffer names are the QTensor part names ("weight", "absmax", "quant_map", ...), so the
    module's state_dict keys equal `q.to_tensors(module_name)` and load back with load_state_dict.
    """

    def __init__(self, q: QTensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {list(q.shape)}")
        self.spec = q.spec
        self.out_features, self.in_features = q.shape
        for name, t in q.parts().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self._q: QTensor | None = q

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear | Tensor,
        fmt: str,
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = False,
    ) -> QuantLinear:
        """Quantize an nn.Linear (or a bare [out, in] weight) into a QuantLinear."""
        if isinstance(linear, nn.Linear):
            weight, bias = linear.weight, linear.bias
        else:
            weight, bias = linear, None
        q = quantize(weight.detach(), fmt, blocksize, double_quant)
        return cls(q, None if bias is None else bias.detach().clone())

    @classmethod
    def from_spec(cls, spec: QSpec, bias: bool = False, device: torch.device | str = "meta") -> QuantLinear:
        """Empty buffers of the right shapes (e.g. on the meta device), to load a state_dict into."""
        parts = {name: torch.empty(shape, dtype=dt, device=device) for name, dt, shape in spec.parts()}
        q = QTensor(spec.fmt, spec.shape, spec.dtype, spec.blocksize, **parts, packing=spec.packing)
        b = torch.empty(spec.shape[0], dtype=spec.dtype, device=device) if bias else None
        return cls(q, b)

    @property
    def qtensor(self) -> QTensor:
        """The QTensor over the current buffers (rebuilt after .to() / load_state_dict)."""
        if self._q is None:
            s = self.spec
            parts = {name: getattr(self, name) for name, _, _ in s.parts()}
            self._q = QTensor(s.fmt, s.shape, s.dtype, s.blocksize, **parts, packing=s.packing)
        return self._q

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._q = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._q = None
        super()._load_from_state_dict(*args, **kwargs)

    def use_kernel_layout(self) -> None:
        """The weight as its device's kernels read it: aligned, and int4 repacked (quant/kernels.py)."""
        q = to_kernel_layout(self.qtensor)
        self.weight = q.weight  # an aligned copy where the loaded one was not (quant/kernels.py)
        self.spec, self._q = q.spec, q

    @classmethod
    def concat_rows(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """One layer whose output is the layers' outputs side by side: for int8 (bnb's row-wise
        codes and one scale per row) the codes' rows and the scales stacked, which the int8 kernels
        compute row by row, so each output is bit for bit the layer's own. Each layer's buffers
        become views into the stacked ones (no weight held twice). None for other formats, or
        layers that do not stack (dtype, device, width, bias or none)."""
        first = layers[0].qtensor
        if first.fmt != "int8" or any(
            type(m) is not cls
            or m.spec.fmt != "int8"
            or m.spec.dtype != first.dtype
            or m.in_features != first.shape[1]
            or m.weight.device != first.weight.device
            or (m.bias is None) != (layers[0].bias is None)
            for m in layers
        ):
            return None
        rows = [m.out_features for m in layers]
        names = ("weight", "absmax") if layers[0].bias is None else ("weight", "absmax", "bias")
        whole = {name: torch.cat([getattr(m, name) for m in layers]) for name in names}
        for name in names:
            for m, part in zip(layers, whole[name].split(rows), strict=True):
                if isinstance(getattr(m, name), nn.Parameter):  # a bias the loader assigned as one
                    part = nn.Parameter(part, requires_grad=False)
                setattr(m, name, part)
        for m in layers:
            m._q = None
        shape = (sum(rows), first.shape[1])
        q = QTensor("int8", shape, first.dtype, first.blocksize, whole["weight"], whole["absmax"])
        return cls(q, whole.get("bias"))

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda:  # the op's CPU body is qlinear; calling it here keeps q's kernel cache
            if decode_in_bf16(x, self.qtensor):
                return qlinear(x.to(torch.bfloat16), self.qtensor, self.bias).to(x.dtype)
            return qlinear(x, self.qtensor, self.bias)
        return qmatmul(x, self.qtensor, self.bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self.qtensor, dtype)

    def extra_repr(self) -> str:
        s = self.spec
        dq = ", double_quant" if s.double_quant else ""
        bs = "" if s.fmt == "int8" else f", blocksize={s.blocksize}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={s.fmt}{bs}{dq}, bias={self.bias is not None}"
        )


def qmatmul(x: Tensor, q, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ dequantize(q).T (+ bias) through one torch op: on CUDA a few tokens take the
    Triton GEMV (no dequantized copy of the matrix per token); otherwise quant.linear.qlinear."""
    parts = [getattr(q, name) for name in PARTS]
    return torch.ops.qwenlocal.qmatmul(x, parts, bias, q.fmt, list(q.shape), q.dtype, q.blocksize, q.packing)


@torch.library.custom_op("qwenlocal::qmatmul", mutates_args=())
def _qmatmul_op(
    x: Tensor,
    parts: list[Tensor | None],  # the QTensor's, in PARTS order
    bias: Tensor | None,
    fmt: str,
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    packing: str,
) -> Tensor:
    q = QTensor(fmt, tuple(shape), dtype, blocksize, **dict(zip(PARTS, parts, strict=True)), packing=packing)
    flat = x.reshape(-1, x.shape[-1])
    if (
        x.is_cuda
        and flat.shape[0] <= moe_kernels.MAX_GROUPED_TOKENS
        and moe_kernels.use_triton(x, "gemv")
        and shape[1] % 2 == 0
    ):
        y = moe_kernels.triton_qgemv(flat, q)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], shape[0])
    return qlinear(x, q, bias)


@_qmatmul_op.register_fake
def _(x, parts, bias, fmt, shape, dtype, blocksize, packing):
    return x.new_empty(*x.shape[:-1], shape[0])
