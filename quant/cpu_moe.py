"""A decode token's k int4 experts on the CPU in one call: a small C++ operator, `moe_int4_row`.

It computes exactly what the Python loop does (`Experts.one_token` over `QuantExperts`' bound
kernels, torch's `_weight_int4pack_mm_for_cpu` three times per expert): per expert in increasing id
order, down(silu(gate(x)) * up(x)) times its routing weight, added into the sum in bf16. The results
are equal bit for bit (tests/test_decode_fast.py); the Python loop stays the reference and the
fallback.

Own kernel (where torch dispatches to its AVX512 or AVX2 int4 kernels and every matrix has whole
blocks of rows): an int4 matrix-vector product in two parallel regions per layer, gate and up of
all k experts, then down of all k experts with the weighted sum, instead of 3k calls of torch's
kernel (each its own parallel region) and ~8 aten ops per expert. Weights in the CPU kernel layout
of quant/int4.py: rows in blocks of B, a block [K][B / 2] bytes; (scale, zero) bf16 [K / G, N, 2].

    block 64 ("cpu-halves64", torch's AVX512 kernel)     block 32 ("cpu-halves32", its AVX2 kernel)
    column k's 32 bytes: byte d (0-15) holds rows d      column k's 16 bytes: byte d holds rows d
    (low nibble) and d + 32 (high), byte 16 + d rows     (low nibble) and d + 16 (high)
    16 + d and 48 + d
    w = fma(code - 8, scale, zero)                        w = fma(code, scale, fma(scale, -8, zero))

then per output row c = fma(x[k], w, c) for k = 0..K-1 in order, in fp32 from 0, rounded to bf16
(nearest even): torch's formulas, which differ (the AVX2 one rounds zero - 8 scale first), so each
kernel is used only under its capability. silu and the product go through aten once for the k
experts (its silu's exp is not ours to copy); the weighted sum rounds as aten's bf16 `mul_` and
`add_` do: y = bf16(bf16(c) * w), sum = bf16(sum + y), experts in increasing id. Work items: a
block of one gate or up matrix; a block of output rows, through the k downs in order. Threads
(torch's `at::parallel_for`) take at least `GRAIN_BYTES` of weights each, so a tiny layer stays on
the calling thread. Elsewhere (another capability, a partial block, aarch64, MSVC) the operator
calls torch's kernel per matrix.

The operator is compiled on first use (torch.utils.cpp_extension, into torch's extension cache;
about a minute, once per machine and torch version) in a background thread; until it is ready, or
where no C++ compiler is found, the Python loop computes the token. The kernels are compiled for
their instruction sets with function attributes (no -march), so one build serves any x86-64 CPU
and the operator checks the CPU before taking one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .extensions import CppOperator

NAME = "qwenlocal_cpu_moe"
MAX_PICKS = 64  # the most experts a token picks that the operator takes (its sort buffer)
# The layouts whose torch kernel the operator's own kernel reproduces, and its block of rows.
KERNEL_BLOCKS = {"cpu-halves64": 64, "cpu-halves32": 32}
_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define OWN_KERNELS 1
#define T512 __attribute__((target("avx512f,avx2,fma")))
#define T256 __attribute__((target("avx2,fma")))
#define INL inline __attribute__((always_inline))
#endif

namespace {

constexpr int64_t MAX_K = 64;
// Work items per thread at least this many weight bytes: at the op-structure shape (4 KB a
// 64-row block) a layer stays on the calling thread; a thread's wake-up costs more than that work.
constexpr int64_t GRAIN_BYTES = 128 * 1024;
// Codes are prefetched this far ahead in software (torch's kernel does too): with the hardware
// prefetcher alone one thread ran at 0.73x torch's speed at the real shape, with it at 1.1x.
constexpr int64_t PREFETCH_BYTES = 4096;

struct Picks {  // the picks in increasing expert id, their weights in fp32
  int64_t k = 0;
  int64_t id[MAX_K];
  int64_t slot[MAX_K];
  float w[MAX_K];
};

Picks sorted_picks(const at::Tensor& ids, const at::Tensor& weights) {
  Picks p;
  at::Tensor idc = ids.contiguous();
  const int64_t* idp = idc.data_ptr<int64_t>();
  p.k = ids.numel();
  for (int64_t j = 0; j < p.k; ++j) {  // insertion sort: k is 8
    int64_t i = j;
    for (; i > 0 && idp[p.slot[i - 1]] > idp[j]; --i) p.slot[i] = p.slot[i - 1];
    p.slot[i] = j;
  }
  at::Tensor wc = weights.contiguous();  // bf16 (the own kernels' case) read as bits, else via fp32
  at::Tensor wf = wc.scalar_type() == at::kBFloat16 ? wc : wc.to(at::kFloat);
  for (int64_t j = 0; j < p.k; ++j) {
    p.id[j] = idp[p.slot[j]];
    if (wf.scalar_type() == at::kBFloat16) {
      const uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(wf.data_ptr())[p.slot[j]]) << 16;
      std::memcpy(&p.w[j], &u, 4);
    } else {
      p.w[j] = wf.data_ptr<float>()[p.slot[j]];
    }
  }
  return p;
}

// The loop this operator replaced: torch's int4 kernel three times per expert, then the same
// elementwise ops as the Python loop. Where no own kernel applies.
at::Tensor aten_loop(const at::Tensor& x, const Picks& p, const at::Tensor& weights, const at::Tensor& blob,
                     at::IntArrayRef offs, int64_t hidden, int64_t inter, int64_t group) {
  const int64_t nbytes = blob.size(1), base = blob.storage_offset();
  at::Tensor b16 = blob.view(at::kBFloat16);
  at::Tensor out;
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t row = base + p.id[j] * nbytes;
    auto w = [&](int64_t i, int64_t n, int64_t kk) {
      return blob.as_strided({n, kk / 2}, {kk / 2, 1}, row + offs[i]);
    };
    auto sz = [&](int64_t i, int64_t n, int64_t kk) {
      return b16.as_strided({kk / group, n, 2}, {n * 2, 2, 1}, (row + offs[i]) / 2);
    };
    at::Tensor g = at::_weight_int4pack_mm_for_cpu(x, w(0, inter, hidden), group, sz(1, inter, hidden));
    at::Tensor u = at::_weight_int4pack_mm_for_cpu(x, w(2, inter, hidden), group, sz(3, inter, hidden));
    at::Tensor h = at::silu(g).mul_(u);
    at::Tensor y = at::_weight_int4pack_mm_for_cpu(h, w(4, hidden, inter), group, sz(5, hidden, inter));
    y.mul_(weights.select(0, p.slot[j]));
    out = j == 0 ? y : out.add_(y);
  }
  return out;
}

void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

// One matrix of one expert: packed codes [N / B][K][B / 2] and (scale, zero) pairs [K / G][N],
// each pair one uint32 (scale in the low half: bf16 bits).
struct Mat {
  const uint8_t* w;
  const uint32_t* sz;
  int64_t n, k, group;
};

#ifdef OWN_KERNELS
// ---- AVX512 (torch's "AVX512" kernels; layout cpu-halves64) ----
// w = fma(code - 8, scale, zero); c = fma(a, w, c) over k in order; bf16 rounding to nearest even.

T512 INL void dot64(const float* a, const Mat& m, int64_t b, __m512 c[4]) {
  const __m512 lut = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
  const uint8_t* w = m.w + b * m.k * 32;
  for (int i = 0; i < 4; ++i) c[i] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < m.k; k0 += m.group) {
    const uint32_t* p = m.sz + (k0 / m.group) * m.n + b * 64;
    __m512 s[4], z[4];
    for (int i = 0; i < 4; ++i) {
      __m512i q = _mm512_loadu_si512(p + 16 * i);
      s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(q, 16));
      z[i] = _mm512_castsi512_ps(_mm512_and_si512(q, high));
    }
    for (int64_t k = k0; k < k0 + m.group; ++k) {
      // bytes 0-15: rows 0-15 (low nibble) and 32-47 (high); bytes 16-31: rows 16-31 and 48-63
      _mm_prefetch((const char*)(w + k * 32 + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(w + k * 32));
      const __m512i lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes));
      const __m512i hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1));
      const __m512 va = _mm512_set1_ps(a[k]);
      // permutexvar reads the low 4 bits of each index: the low nibble without a mask
      c[0] = _mm512_fmadd_ps(va, _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, lut), s[0], z[0]), c[0]);
      c[1] = _mm512_fmadd_ps(va, _mm512_fmadd_ps(_mm512_permutexvar_ps(hi, lut), s[1], z[1]), c[1]);
      c[2] = _mm512_fmadd_ps(va, _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(lo, 4), lut), s[2], z[2]), c[2]);
      c[3] = _mm512_fmadd_ps(va, _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(hi, 4), lut), s[3], z[3]), c[3]);
    }
  }
}

// bf16 bits (in the low half of each lane) of v rounded to nearest even; NaN as 0xffff (torch's
// vectorized conversion)
T512 INL __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  __m512i t = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  t = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(t, _mm512_set1_epi32(0x7fff)), u), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xffff), t);
}
T512 INL __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
T512 INL void store_bf16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(bf16_bits(v)));
}

T512 void rows64(const float* a, const Mat& m, int64_t b, uint16_t* out) {
  __m512 c[4];
  dot64(a, m, b, c);
  for (int i = 0; i < 4; ++i) store_bf16(out + b * 64 + 16 * i, c[i]);
}

// rows [64 b, 64 b + 64) of the weighted sum: per pick in order y = bf16(c), y = bf16(y * w),
// sum = y (first) or bf16(sum + y): the roundings of aten's bf16 mul_ and add_
T512 void down64(const float* h, const Mat* downs, const float* w, int64_t k, int64_t b, uint16_t* out) {
  __m512 sum[4], c[4];
  for (int64_t j = 0; j < k; ++j) {
    dot64(h + j * downs[j].k, downs[j], b, c);
    const __m512 wj = _mm512_set1_ps(w[j]);
    for (int i = 0; i < 4; ++i) {
      const __m512 y = round_bf16(_mm512_mul_ps(round_bf16(c[i]), wj));
      sum[i] = j == 0 ? y : round_bf16(_mm512_add_ps(sum[i], y));
    }
  }
  for (int i = 0; i < 4; ++i) store_bf16(out + b * 64 + 16 * i, sum[i]);
}

// ---- AVX2 (torch's "AVX2" kernels; layout cpu-halves32) ----
// zero' = fma(scale, -8, zero); w = fma(code, scale, zero'); c = fma(a, w, c); bf16 as above.

T256 INL void dot32(const float* a, const Mat& m, int64_t b, __m256 c[4]) {
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  const __m256i nibble = _mm256_set1_epi32(15);
  const __m256 minus8 = _mm256_set1_ps(-8.0f);
  const uint8_t* w = m.w + b * m.k * 16;
  for (int i = 0; i < 4; ++i) c[i] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < m.k; k0 += m.group) {
    const uint32_t* p = m.sz + (k0 / m.group) * m.n + b * 32;
    __m256 s[4], z[4];
    for (int i = 0; i < 4; ++i) {
      __m256i q = _mm256_loadu_si256((const __m256i*)(p + 8 * i));
      s[i] = _mm256_castsi256_ps(_mm256_slli_epi32(q, 16));
      z[i] = _mm256_fmadd_ps(s[i], minus8, _mm256_castsi256_ps(_mm256_and_si256(q, high)));
    }
    for (int64_t k = k0; k < k0 + m.group; ++k) {
      // byte d (0-15): row d (low nibble) and row d + 16 (high)
      _mm_prefetch((const char*)(w + k * 16 + PREFETCH_BYTES), _MM_HINT_T0);
      const __m128i bytes = _mm_loadu_si128((const __m128i*)(w + k * 16));
      const __m256i lo = _mm256_cvtepu8_epi32(bytes);
      const __m256i hi = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes));
      const __m256 va = _mm256_set1_ps(a[k]);
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(lo, nibble));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(hi, nibble));
      const __m256 q2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
      const __m256 q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
      c[0] = _mm256_fmadd_ps(va, _mm256_fmadd_ps(q0, s[0], z[0]), c[0]);
      c[1] = _mm256_fmadd_ps(va, _mm256_fmadd_ps(q1, s[1], z[1]), c[1]);
      c[2] = _mm256_fmadd_ps(va, _mm256_fmadd_ps(q2, s[2], z[2]), c[2]);
      c[3] = _mm256_fmadd_ps(va, _mm256_fmadd_ps(q3, s[3], z[3]), c[3]);
    }
  }
}

T256 INL __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  __m256i t = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(t, _mm256_set1_epi32(0x7fff)), u), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, ordered);
}
T256 INL __m256 round_bf16(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
T256 INL void store_bf16(uint16_t* dst, __m256 v) {
  const __m256i t = bf16_bits(v);
  _mm_storeu_si128((__m128i*)dst, _mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
}

T256 void rows32(const float* a, const Mat& m, int64_t b, uint16_t* out) {
  __m256 c[4];
  dot32(a, m, b, c);
  for (int i = 0; i < 4; ++i) store_bf16(out + b * 32 + 8 * i, c[i]);
}

T256 void down32(const float* h, const Mat* downs, const float* w, int64_t k, int64_t b, uint16_t* out) {
  __m256 sum[4], c[4];
  for (int64_t j = 0; j < k; ++j) {
    dot32(h + j * downs[j].k, downs[j], b, c);
    const __m256 wj = _mm256_set1_ps(w[j]);
    for (int i = 0; i < 4; ++i) {
      const __m256 y = round_bf16(_mm256_mul_ps(round_bf16(c[i]), wj));
      sum[i] = j == 0 ? y : round_bf16(_mm256_add_ps(sum[i], y));
    }
  }
  for (int i = 0; i < 4; ++i) store_bf16(out + b * 32 + 8 * i, sum[i]);
}
#endif

bool own_kernel(int64_t block) {
#ifdef OWN_KERNELS
  if (block == 64) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (block == 32) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

int64_t grain(int64_t item_bytes) { return std::max<int64_t>(1, GRAIN_BYTES / item_bytes); }

at::Tensor own_loop(const at::Tensor& x, const Picks& p, const at::Tensor& blob, at::IntArrayRef offs,
                    int64_t hidden, int64_t inter, int64_t group, int64_t block) {
  const int64_t k = p.k, nbytes = blob.size(1);
  const uint8_t* base = blob.data_ptr<uint8_t>();
  auto mat = [&](int64_t j, int i, int64_t n, int64_t kk) {
    const uint8_t* row = base + p.id[j] * nbytes;
    return Mat{row + offs[i], reinterpret_cast<const uint32_t*>(row + offs[i + 1]), n, kk, group};
  };
  std::vector<Mat> gate_up(2 * k), downs(k);  // gate_up: the k gates, then the k ups
  for (int64_t j = 0; j < k; ++j) {
    gate_up[j] = mat(j, 0, inter, hidden);
    gate_up[k + j] = mat(j, 2, inter, hidden);
    downs[j] = mat(j, 4, hidden, inter);
  }
  std::vector<float> xf(hidden), hf(k * inter);
  bf16_to_float(reinterpret_cast<const uint16_t*>(x.data_ptr()), xf.data(), hidden);

  // gate and up of every pick: [2, k, inter], row j the j-th pick in id order
  at::Tensor gu = at::empty({2, k, inter}, x.options());
  uint16_t* gup = reinterpret_cast<uint16_t*>(gu.data_ptr());
  const int64_t ib = inter / block;
  at::parallel_for(0, 2 * k * ib, grain(hidden * block / 2), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t / ib;
#ifdef OWN_KERNELS
      if (block == 64) rows64(xf.data(), gate_up[m], t % ib, gup + m * inter);
      else rows32(xf.data(), gate_up[m], t % ib, gup + m * inter);
#endif
    }
  });
  // silu and the product as the loop computes them (aten's own silu: its exp is not ours to copy);
  // one call for the k picks unless aten would split it across threads at a point not on a row
  at::Tensor h;
  if (k * inter < at::internal::GRAIN_SIZE) {
    h = at::silu(gu[0]).mul_(gu[1]);
  } else {
    h = at::empty({k, inter}, x.options());
    for (int64_t j = 0; j < k; ++j) {
      at::Tensor hj = h[j];
      at::silu_out(hj, gu[0][j]).mul_(gu[1][j]);
    }
  }
  bf16_to_float(reinterpret_cast<const uint16_t*>(h.data_ptr()), hf.data(), k * inter);

  at::Tensor out = at::empty({1, hidden}, x.options());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, hidden / block, grain(k * inter * block / 2), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
#ifdef OWN_KERNELS
      if (block == 64) down64(hf.data(), downs.data(), p.w, k, b, op);
      else down32(hf.data(), downs.data(), p.w, k, b, op);
#endif
    }
  });
  return out;
}

}  // namespace

// x [1, H] bf16; ids [k] int64; weights [k] bf16; blob uint8 [E, nbytes] (one row per expert);
// offs: byte offsets in a row of gate weight, gate scale_zero, up weight, up scale_zero, down
// weight, down scale_zero; block: 64 or 32 for the own kernel of that layout, 0 for torch's.
at::Tensor moe_int4_row(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                        const at::Tensor& blob, at::IntArrayRef offs, int64_t hidden, int64_t inter,
                        int64_t group, int64_t block) {
  TORCH_CHECK(blob.is_contiguous() && ids.numel() <= MAX_K && ids.numel() > 0 && offs.size() == 6,
              "moe_int4_row: a contiguous blob, 0 < k <= 64, six offsets");
  const Picks p = sorted_picks(ids, weights);
  for (int64_t j = 0; j < p.k; ++j)
    TORCH_CHECK(p.id[j] >= 0 && p.id[j] < blob.size(0), "moe_int4_row: expert id out of range");
  if (own_kernel(block) && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.numel() == hidden &&
      hidden % block == 0 && inter % block == 0 && hidden % group == 0 && inter % group == 0)
    return own_loop(x, p, blob, offs, hidden, inter, group, block);
  return aten_loop(x, p, weights, blob, offs, hidden, inter, group);
}

std::vector<int64_t> kernel_blocks() {
  std::vector<int64_t> out;
  for (int64_t b : {64, 32})
    if (own_kernel(b)) out.push_back(b);
  return out;
}

TORCH_LIBRARY(qwenlocal_cpu_moe, m) {
  m.def("moe_int4_row(Tensor x, Tensor ids, Tensor weights, Tensor blob, int[] offs, int hidden, "
        "int inter, int group, int block) -> Tensor");
  m.def("kernel_blocks() -> int[]", &kernel_blocks);
}
TORCH_LIBRARY_IMPL(qwenlocal_cpu_moe, CPU, m) { m.impl("moe_int4_row", &moe_int4_row); }
"""

OPERATOR = CppOperator(NAME, _SOURCE, openmp=True)


def kernel_block(packing: str, hidden: int, inter: int) -> int:
    """The block of rows of the own kernel for experts in `packing`, or 0 for torch's kernel: the
    own one reproduces the kernel torch dispatches to now, so the layout must be this CPU's."""
    from .int4 import cpu_packing

    block = KERNEL_BLOCKS.get(packing, 0)
    if block and packing == cpu_packing() and hidden % block == 0 and inter % block == 0:
        return block
    return 0


def kernel_blocks() -> list[int]:
    """The own kernels' blocks that the built operator can run on this CPU ([64, 32] with AVX512)."""
    return list(torch.ops.qwenlocal_cpu_moe.kernel_blocks())


def moe_int4_row(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    blob: Tensor,
    offsets: list[int],
    hidden: int,
    inter: int,
    group: int,
    block: int,
) -> Tensor:
    """x [1, H] bf16 through the k experts `ids` [k] of this layer's blob, weighted by `weights` [k];
    `block` from `kernel_block` (0: torch's kernel per matrix)."""
    return torch.ops.qwenlocal_cpu_moe.moe_int4_row(
        x, ids, weights, blob, offsets, hidden, inter, group, block
    )
