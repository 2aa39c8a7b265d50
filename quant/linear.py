"""QuantLinear: an nn.Module whose weight is a QTensor; it computes through quant.kernels.qlinear.

int8 is computed as x @ dequantize(W).T (bnb's row scales), not LLM.int8()'s 8-bit activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .formats import DEFAULT_BLOCKSIZE, QSpec, QTensor, dequantize, quantize
from .kernels import qlinear, to_kernel_layout


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
        """Repack the weight for its device's kernels, in place (int4 on the CPU; quant/int4.py)."""
        q = to_kernel_layout(self.qtensor)
        self.spec, self._q = q.spec, q

    def forward(self, x: Tensor) -> Tensor:
        return qlinear(x, self.qtensor, self.bias)

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
