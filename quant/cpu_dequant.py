"""int4 dequantize on the CPU in C++: the codes of one or several stacked matrices in a CPU kernel
layout ("cpu-halves64", "cpu-halves32", "cpu-pairs32": quant/int4.py) straight to W.T [K, N] (what
a prefill GEMM reads) or W [N, K], in bf16 or fp32.

    weight      uint8    [..., N, K/2]      a CPU kernel layout: blocks of B rows, K-major inside
    scale_zero  bfloat16 [..., K/G, N, 2]   (scale, zero) per group of G along K
    out         bf16/fp32 [..., K, N] (W.T) or [..., N, K] (W), contiguous

Each value is computed as quant.int4.dequantize_int4_t computes it: fp32 offset = zero + scale * -8,
then code * scale + offset (the product is exact: a 4-bit code times a bf16 scale), one IEEE add,
no contraction into an FMA; a bf16 out takes it rounded to nearest even, as torch's fp32 -> bf16
copy does. So the result equals `dequantize_int4_t(...)` (then `.to(out dtype)`) bit for bit for
finite values (tests/test_cpu_dequant.py); a NaN (from a NaN scale) stays a NaN, its payload not
guaranteed. One pass over the codes and one over the output, where the plain-torch path makes
several: a 768 x 2048 expert matrix into bf16 took 0.28 ms on one Xeon core against 1.3 ms
(BENCHMARKS.md, issue 22 prefill); the loop is bound by vector ops (the rounding to bf16 is 5 of
~12 a vector), not by memory.

The operator is compiled on first use (torch.utils.cpp_extension, under a minute) in a background
thread, with -march=native into a build folder named after this CPU; until it is ready, or without
a C++ compiler, callers use the plain-torch path (quant.int4), which stays the reference
(quant.extensions builds it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .extensions import CppOperator
from .int4 import cpu_packing_parts

NAME = "qwenlocal_cpu_dequant"
# The layouts the operator reads: (block of rows, style) as quant.int4.cpu_packing_parts gives them.
LAYOUTS = {(64, "halves"), (32, "halves"), (32, "pairs")}
_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> bf16, rounded to nearest even as torch's conversion does (a NaN from bf16 inputs or
// arithmetic stays a NaN, without the check and its three vector ops)
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void put(float* o, float v) { *o = v; }
inline void put(uint16_t* o, float v) { *o = to_bf16(v); }

constexpr int64_t CHUNK = 512;  // columns unpacked at a time (a multiple of every block)

// Rows [k0, k0 + rows) of W.T of one matrix into o (row r at o + r * ld, N values): codes w
// [N/B, K, B/2], fp32 scale and offset [N] of their group. HALVES: byte j of a block holds rows j
// (low nibble) and j + B/2 (high); otherwise rows 2j (low) and 2j + 1 (high). The codes of a
// chunk of a row are unpacked first, so that the arithmetic is one long loop (full-width vectors).
template <typename T, int B, bool HALVES>
void rows_t(const uint8_t* __restrict w, const float* __restrict sc, const float* __restrict of,
            int64_t n, int64_t k, int64_t k0, int64_t rows, T* __restrict o, int64_t ld) {
  alignas(64) uint8_t c[CHUNK];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n0 = 0; n0 < n; n0 += CHUNK) {
      const int64_t width = std::min(CHUNK, n - n0);
      for (int64_t nb = 0; nb < width / B; ++nb) {
        const uint8_t* __restrict p = w + ((n0 / B + nb) * k + k0 + r) * (B / 2);
        uint8_t* __restrict q = c + nb * B;
        if (HALVES) {
          for (int j = 0; j < B / 2; ++j) q[j] = p[j] & 15;
          for (int j = 0; j < B / 2; ++j) q[B / 2 + j] = p[j] >> 4;
        } else {
          for (int j = 0; j < B / 2; ++j) {
            q[2 * j] = p[j] & 15;
            q[2 * j + 1] = p[j] >> 4;
          }
        }
      }
      T* __restrict d = o + r * ld + n0;
      const float* __restrict s = sc + n0;
      const float* __restrict f = of + n0;
      for (int64_t i = 0; i < width; ++i) put(d + i, float(c[i]) * s[i] + f[i]);
    }
  }
}

// One group (G rows of W.T) of one matrix: W.T rows straight into out, or for W a block of B
// columns at a time through a small W.T tile, then transposed.
template <typename T, int B, bool HALVES>
void group(const uint8_t* w, const uint16_t* sz, int64_t n, int64_t k, int64_t g, int64_t gs,
           bool transposed, T* out, float* sc, float* of, T* tile) {
  const uint16_t* z = sz + g * n * 2;
  for (int64_t i = 0; i < n; ++i) {
    sc[i] = bf16_to_float(z[2 * i]);
    of[i] = bf16_to_float(z[2 * i + 1]) + sc[i] * -8.0f;  // zero + scale * -8, as addcmul does
  }
  if (transposed) {
    rows_t<T, B, HALVES>(w, sc, of, n, k, g * gs, gs, out + g * gs * n, n);
    return;
  }
  for (int64_t nb = 0; nb < n / B; ++nb) {  // tile [G, B] of W.T, then W[nb*B + j, g*G + r]
    rows_t<T, B, HALVES>(w + nb * k * (B / 2), sc + nb * B, of + nb * B, B, k, g * gs, gs, tile, B);
    for (int j = 0; j < B; ++j) {
      T* d = out + (nb * B + j) * k + g * gs;
      for (int64_t r = 0; r < gs; ++r) d[r] = tile[r * B + j];
    }
  }
}

template <typename T, int B, bool HALVES>
void run(const at::Tensor& weight, const at::Tensor& scale_zero, int64_t gs, bool transposed, at::Tensor& out) {
  const int64_t s = weight.size(0), n = weight.size(1), k = weight.size(2) * 2, groups = k / gs;
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scale_zero.data_ptr<at::BFloat16>());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (gs * n));  // >= 32K values a task
  at::parallel_for(0, s * groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(n), offset(n);
    std::vector<T> tile(transposed ? 0 : gs * B);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m = u / groups, g = u % groups;
      group<T, B, HALVES>(w + m * n * (k / 2), sz + m * groups * n * 2, n, k, g, gs, transposed,
                          o + m * n * k, scale.data(), offset.data(), tile.data());
    }
  });
}

// weight uint8 [S, N, K/2]; scale_zero bf16 [S, K/G, N, 2]; out [S, K, N] (transposed) or
// [S, N, K], bf16 or fp32; every tensor contiguous.
void int4_dequant(const at::Tensor& weight, const at::Tensor& scale_zero, int64_t group_size,
                  int64_t block, bool halves, bool transposed, at::Tensor out) {
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "int4_dequant: weight uint8 [S, N, K/2], contiguous");
  const int64_t s = weight.size(0), n = weight.size(1), k = weight.size(2) * 2;
  TORCH_CHECK(group_size > 0 && k % group_size == 0 && n % block == 0, "int4_dequant: shapes");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous() &&
                  scale_zero.numel() == s * (k / group_size) * n * 2,
              "int4_dequant: scale_zero bf16 [S, K/G, N, 2], contiguous");
  TORCH_CHECK(out.is_contiguous() && out.numel() == s * n * k &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "int4_dequant: out contiguous, S * N * K values of bf16 or fp32");
  const bool f32 = out.scalar_type() == at::kFloat;
  if (block == 64 && halves) {
    f32 ? run<float, 64, true>(weight, scale_zero, group_size, transposed, out)
        : run<uint16_t, 64, true>(weight, scale_zero, group_size, transposed, out);
  } else if (block == 32 && halves) {
    f32 ? run<float, 32, true>(weight, scale_zero, group_size, transposed, out)
        : run<uint16_t, 32, true>(weight, scale_zero, group_size, transposed, out);
  } else if (block == 32 && !halves) {
    f32 ? run<float, 32, false>(weight, scale_zero, group_size, transposed, out)
        : run<uint16_t, 32, false>(weight, scale_zero, group_size, transposed, out);
  } else {
    TORCH_CHECK(false, "int4_dequant: no such layout");
  }
}

}  // namespace

TORCH_LIBRARY(qwenlocal_cpu_dequant, m) {
  m.def("int4_dequant(Tensor weight, Tensor scale_zero, int group, int block, bool halves, "
        "bool transposed, Tensor(a!) out) -> ()");
}
TORCH_LIBRARY_IMPL(qwenlocal_cpu_dequant, CPU, m) { m.impl("int4_dequant", &int4_dequant); }
"""

OPERATOR = CppOperator(NAME, _SOURCE, cflags=("-O3", "-ffp-contract=off"), openmp=True, native=True)


def reads(packing: str) -> bool:
    """Whether the operator reads this int4 packing (the CPU kernel layouts; not "plain")."""
    return packing.startswith("cpu-") and cpu_packing_parts(packing) in LAYOUTS


def dequantize_int4_t(
    weight: Tensor, scale_zero: Tensor, shape: tuple[int, int], group: int, packing: str, out: Tensor
) -> Tensor:
    """W.T [..., K, N] into out (bf16 or fp32), from weight [..., N, K/2] in `packing`: equal to
    quant.int4.dequantize_int4_t (rounded to out's dtype). The operator must be `ready()`."""
    return _run(weight, scale_zero, shape, group, packing, out, True)


def dequantize_int4(
    weight: Tensor, scale_zero: Tensor, shape: tuple[int, int], group: int, packing: str, out: Tensor
) -> Tensor:
    """W [..., N, K] into out (bf16 or fp32): equal to quant.int4.dequantize_int4."""
    return _run(weight, scale_zero, shape, group, packing, out, False)


def _run(weight, scale_zero, shape, group, packing, out, transposed: bool) -> Tensor:
    n, k = shape
    block, style = cpu_packing_parts(packing)
    lead = weight.shape[:-2]
    w = weight.reshape(-1, n, k // 2)
    torch.ops.qwenlocal_cpu_dequant.int4_dequant(
        w, scale_zero.reshape(w.shape[0], k // group, n, 2), group, block, style == "halves", transposed, out
    )
    return out.view(*lead, k, n) if transposed else out.view(*lead, n, k)
