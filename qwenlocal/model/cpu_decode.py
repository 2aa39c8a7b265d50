"""A decode token's decoder layer on the CPU in one call, up to its experts: a C++ operator
(torch.library) that calls the aten ops the Python layer calls (qwen3_moe.DecoderLayer at one
token), in the same order with the same arguments, so its results are equal bit for bit
(tests/test_cpu_decode.py). The Python layer stays the reference and the fallback.

For x [1, 1, H] at one position, with the first `end` keys stored after it:

    input_layernorm -> q/k/v as one projection [1, heads + 2 kv, 1, D] -> q and k normed and
    rotated together -> k, v written at the position (KVCache.update) -> SDPA, each KV head's
    query heads as its rows, over the first `end` keys -> o_proj -> + x (the residual) ->
    post_attention_layernorm -> the router: gate, softmax in fp32, top-k, renormalised
    (norm_topk_prob), cast to x's dtype

and returns (residual [1, 1, H], the MoE's input [1, H], ids [1, k], weights [1, k]); the experts
then run as before (`Experts`). A dense-MLP layer gets the MLP's input [1, 1, H] and no routing.

A linear layer's weight is 16-bit (at::linear, what F.linear calls) or int8 (torch's
_weight_int8pack_mm with the row scales quant.kernels.qlinear uses, the bias added after). The
operator is used only where the Python path makes no cast it does not (`linear_parts`,
`takes`): a 16-bit weight in x's dtype; an int8 one under a bf16/fp16 x; a KV cache in x's dtype.
Anything else (a GPU, several rows, prefill, fp8 KV, 4-bit attention, a float32 model's int8
attention, which the Python path computes in bf16) takes the Python path.

Per layer this replaces ~30 aten calls from Python (each a few µs of Python and argument parsing)
with one. It is compiled on first use in the background (quant.extensions); until it is ready, or
where no C++ compiler is found, the Python layer computes the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quant.extensions import CppOperator
from quant.kernels import int8_scales, is_aligned
from quant.linear import QuantLinear

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>

using OptTensor = std::optional<at::Tensor>;

// x W^T (+ b) as the Python layer computes it: a 16-bit W through at::linear (F.linear); an int8 W
// (its row scales given) through _weight_int8pack_mm on x's rows, then the bias (quant.kernels).
static at::Tensor linear(const at::Tensor& x, const OptTensor& w, const OptTensor& scales,
                         const OptTensor& bias) {
  if (!scales.has_value()) return at::linear(x, *w, bias);
  at::Tensor y = at::_weight_int8pack_mm(x.reshape({-1, x.size(-1)}).contiguous(), *w, *scales);
  if (bias.has_value()) y = y + bias->to(y.scalar_type());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w->size(0);
  return y.view(shape);
}

// qwen3_moe.rms_norm: weight * F.rms_norm(x, [last dim], eps)
static at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return weight * at::rms_norm(x, {x.size(-1)}, std::nullopt, eps);
}

// tensors: input_layernorm, qkv weight, scales, bias, qk norm [heads + kv, 1, D], o_proj weight,
// scales, bias, post_attention_layernorm, gate weight, scales, bias (None: no such part / no gate).
// sizes: heads, kv heads, head dim, top-k. x [1, 1, H]; cos, sin [1, D]; positions [1].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
    at::Tensor& k_cache, at::Tensor& v_cache, int64_t end, const c10::List<OptTensor>& tensors,
    at::IntArrayRef sizes, double eps_in, double eps_qk, double eps_post, bool norm_topk) {
  const std::vector<OptTensor> t = tensors.vec();
  TORCH_CHECK(t.size() == 12 && sizes.size() == 4, "decode_layer: 12 tensors and 4 sizes");
  const int64_t heads = sizes[0], kv = sizes[1], d = sizes[2], top_k = sizes[3];
  // Attention.project at one token
  at::Tensor y = linear(rms_norm(x, *t[0], eps_in), t[1], t[2], t[3]).view({1, heads + 2 * kv, 1, d});
  at::Tensor qk = rms_norm(y.slice(1, 0, heads + kv), *t[4], eps_qk);
  at::Tensor cos_part = qk * cos;  // apply_rope: x * cos + x.roll(D / 2) * sin
  at::Tensor sin_part = qk.roll({d / 2}, {-1}) * sin;
  qk = cos_part + sin_part;
  // KVCache.update (the cache in x's dtype: no casts), then Attention.forward's one-query SDPA
  k_cache.index_copy_(2, positions, qk.slice(1, heads));
  v_cache.index_copy_(2, positions, y.slice(1, heads + kv));
  at::Tensor rows = qk.slice(1, 0, heads).reshape({1, kv, heads / kv, d});
  at::Tensor out = at::scaled_dot_product_attention(rows, k_cache.narrow(2, 0, end), v_cache.narrow(2, 0, end))
                       .view({1, heads, 1, -1});
  at::Tensor h = x + linear(out.transpose(1, 2).reshape({1, 1, -1}), t[5], t[6], t[7]);
  at::Tensor normed = rms_norm(h, *t[8], eps_post);
  if (!t[9].has_value()) return {h, normed, at::empty({0}, x.options().dtype(at::kLong)), at::empty({0}, x.options())};
  // SparseMoeBlock.route
  at::Tensor flat = normed.reshape({-1, normed.size(-1)});
  at::Tensor probs = at::softmax(linear(flat, t[9], t[10], t[11]), -1, at::kFloat);
  auto [weights, ids] = at::topk(probs, top_k, -1);
  if (norm_topk) weights = weights / weights.sum({-1}, true);
  return {h, flat, ids, weights.to(flat.scalar_type())};
}

TORCH_LIBRARY(qwenlocal_cpu_decode, m) {
  m.def("decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor positions, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int end, Tensor?[] tensors, int[] sizes, float eps_in, float eps_qk, "
        "float eps_post, bool norm_topk) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(qwenlocal_cpu_decode, CPU, m) { m.impl("decode_layer", &decode_layer); }
"""

OPERATOR = CppOperator("qwenlocal_cpu_decode", _SOURCE)
# x dtypes under which QuantLinear computes an int8 row with _weight_int8pack_mm as it is
INT8_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LinearParts:
    """What the operator needs of a linear layer: its weight, int8 row scales (None: a 16-bit weight
    for at::linear) and bias."""

    weight: Tensor
    scales: Tensor | None = None
    bias: Tensor | None = None


@dataclass(frozen=True)
class LayerArgs:
    """One layer's operands, in the operator's order; made once at load (DecoderLayer.fuse_decode)."""

    layer: int
    tensors: list[Tensor | None]
    sizes: list[int]  # heads, kv heads, head dim, top-k (0: a dense-MLP layer)
    eps: tuple[float, float, float]  # input_layernorm, q/k norm, post_attention_layernorm
    norm_topk: bool


def quant_linear_parts(m: torch.nn.Module, dtype: torch.dtype) -> LinearParts | None:
    """A QuantLinear's parts where its forward on one CPU row of `dtype` is _weight_int8pack_mm on
    the stored codes (quant.kernels.pick_kernel: int8, bf16/fp16 x, an aligned weight); else None."""
    if not isinstance(m, QuantLinear):
        return None
    q = m.qtensor
    if q.fmt != "int8" or dtype not in INT8_DTYPES or q.device.type != "cpu" or not is_aligned(q.weight):
        return None
    return LinearParts(q.weight, int8_scales(q, dtype), m.bias)


def layer_args(
    layer: int,
    norms: tuple[Tensor, Tensor, Tensor],
    linears: tuple[LinearParts, LinearParts, LinearParts | None],
    sizes: tuple[int, int, int, int],
    eps: tuple[float, float, float],
    norm_topk: bool,
) -> LayerArgs | None:
    """The operator's operands from the layer's: norms (input, q/k per head, post-attention) and
    linears (qkv, o_proj, the router's gate or None). None where a tensor is not on the CPU."""
    input_norm, qk_norm, post_norm = norms
    qkv, o_proj, gate = linears
    tensors = [input_norm, *_parts(qkv), qk_norm, *_parts(o_proj), post_norm]
    tensors += [None, None, None] if gate is None else _parts(gate)
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return None
    return LayerArgs(layer, tensors, list(sizes), eps, norm_topk)


def _parts(p: LinearParts) -> list[Tensor | None]:
    return [p.weight, p.scales, p.bias]


def takes(x: Tensor, cache, end: int) -> bool:
    """Whether a one-row step x [1, 1, H] with `cache` (a KVCache) and `end` keys goes through the
    operator: on the CPU, a cache in x's dtype (no cast on write or read) that holds `end` keys, and
    the operator built (the first ask starts its build)."""
    return (
        not x.is_cuda
        and x.dtype == cache.k[0].dtype == cache.compute_dtype
        and end <= cache.max_len
        and OPERATOR.ready()
    )


def decode_layer(
    x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache, end: int, args: LayerArgs
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [1, 1, H] through one layer up to its experts: (residual, MoE input, ids, weights)."""
    return torch.ops.qwenlocal_cpu_decode.decode_layer(
        x,
        cos,
        sin,
        positions,
        cache.k[args.layer],
        cache.v[args.layer],
        end,
        args.tensors,
        args.sizes,
        *args.eps,
        args.norm_topk,
    )
