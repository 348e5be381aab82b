// AVX-512 fp32 linear: a 14 x 32 register-tiled micro-kernel over K-major weight panels, with
// the epilogue (bias, activation, residual) fused before the single store of each tile.
// Every function carries a target attribute, so this file works without -march=native; the
// dispatcher in gemm.cpp only calls it when the CPU reports avx512f.
// GCC 12 flags _mm512_undefined_ps inside its own min/max/scalef intrinsics; a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_internal.hpp"

#define TESSERA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define TESSERA_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define TESSERA_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define TESSERA_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline

namespace tessera::gemm_detail {
namespace {

// Horner evaluation of c[0] t^(n-1) + ... + c[n-1].
template <int N>
TESSERA_AVX512_INLINE __m512 poly(__m512 t, const float (&c)[N]) {
  __m512 r = _mm512_set1_ps(c[0]);
  for (int i = 1; i < N; ++i) r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(c[i]));
  return r;
}


// exp(p) for p in [-30, 0]: 2^n * exp(r), n = round(p / ln2), r = p - n ln2 (two-part ln2).
TESSERA_AVX512_INLINE __m512 exp_neg(__m512 p) {
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(p, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), p);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187e-6f), r);
  return _mm512_scalef_ps(poly(r, kExp), n);
}

// erfc(t) for t >= 0.921875 (0 past 4), and erf(z) for |z| <= 0.921875.
TESSERA_AVX512_INLINE __m512 erfc_large(__m512 t) {
  __m512 tc = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(kErfSplit)), _mm512_set1_ps(kErfcZero));
  __m512 e = exp_neg(poly(tc, kLogErfc));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(kErfcZero), _CMP_LE_OQ), e);
}
TESSERA_AVX512_INLINE __m512 erf_small(__m512 z) {
  __m512 zc = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-kErfSplit)), _mm512_set1_ps(kErfSplit));
  return _mm512_fmadd_ps(zc, poly(_mm512_mul_ps(zc, zc), kErfSmall), zc);
}

TESSERA_AVX512_INLINE __m512 erf_v(__m512 z) {
  __m512 t = _mm512_abs_ps(z);
  __mmask16 small = _mm512_cmp_ps_mask(t, _mm512_set1_ps(kErfSplit), _CMP_LE_OQ);
  __m512 large = _mm512_sub_ps(_mm512_set1_ps(1.0f), erfc_large(t));
  // copysign(large, z)
  large = _mm512_or_ps(large, _mm512_and_ps(z, _mm512_set1_ps(-0.0f)));
  return _mm512_mask_blend_ps(small, large, erf_small(z));
}

// gelu(x) = 0.5 x (1 + erf(x / sqrt 2)); for |z| > 0.92, 1 + erf(z) is 2 - erfc(|z|) or
// erfc(|z|), which keeps full relative accuracy on the negative tail.
TESSERA_AVX512_INLINE __m512 one_plus_erf_v(__m512 x) {  // 1 + erf(x / sqrt 2)
  __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  __m512 t = _mm512_abs_ps(z);
  __mmask16 small = _mm512_cmp_ps_mask(t, _mm512_set1_ps(kErfSplit), _CMP_LE_OQ);
  __mmask16 positive = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ);
  __m512 e = erfc_large(t);
  __m512 one_plus = _mm512_mask_sub_ps(e, positive, _mm512_set1_ps(2.0f), e);
  return _mm512_mask_add_ps(one_plus, small, _mm512_set1_ps(1.0f), erf_small(z));
}
TESSERA_AVX512_INLINE __m512 gelu_v(__m512 x) {
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus_erf_v(x));
}

TESSERA_AVX512_INLINE __m512 activate(__m512 v, Activation act) {
  if (act == Activation::Gelu) return gelu_v(v);
  if (act == Activation::Relu) return _mm512_max_ps(v, _mm512_setzero_ps());
  return v;
}

struct Tile {
  float* y;               // tile's top-left output
  const float* residual;  // same position in residual, or null
  int64_t ldy;
  const float* bias;      // 32 floats (padded), or null
  __mmask16 mask0, mask1; // valid columns of the two halves
  Activation act;
};

// Cache lines of the task's next weight panel for one micro-kernel call to ask for, one every
// `step` iterations of its loop: a task's calls on one panel share out the next one, so each
// panel is in cache before its first pass (see task_walk).
struct Prefetch {
  const char* next = nullptr;
  int64_t count = 0, step = 1;
};

// y[r, :] = act(c[r] + bias) (+ residual[r, :]) for r < R, masked to the tile's columns.
template <int R>
TESSERA_AVX512_INLINE void store_tile(const __m512 (&c0)[R], const __m512 (&c1)[R], const Tile& t) {
  __m512 bias0 = t.bias ? _mm512_load_ps(t.bias) : _mm512_setzero_ps();
  __m512 bias1 = t.bias ? _mm512_load_ps(t.bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    __m512 v0 = activate(_mm512_add_ps(c0[r], bias0), t.act);
    __m512 v1 = activate(_mm512_add_ps(c1[r], bias1), t.act);
    float* yr = t.y + r * t.ldy;
    if (t.residual) {
      const float* rr = t.residual + r * t.ldy;
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(t.mask0, rr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(t.mask1, rr + 16));
    }
    _mm512_mask_storeu_ps(yr, t.mask0, v0);
    _mm512_mask_storeu_ps(yr + 16, t.mask1, v1);
  }
}

// c[r] += a[r] * b[0:32] for r < R: one k of the micro-kernel.
template <int R>
TESSERA_AVX512_INLINE void fma_step(const float* a, const float* b, __m512 (&c0)[R],
                                    __m512 (&c1)[R]) {
  const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    const __m512 av = _mm512_set1_ps(a[r]);
    c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
    c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
  }
}

// y[r, 0:32] = epilogue(sum_k a[k*kMR + r] * b[k*32 + 0:32]) for r < R: the micro-kernel.
template <int R>
TESSERA_AVX512 void micro_kernel(int64_t K, const float* a, const float* b, const Tile& t,
                                 const Prefetch& pf) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t line = 0; line < pf.count; ++line) {
    _mm_prefetch(pf.next + line * 64, _MM_HINT_T0);
    for (const int64_t end = k + pf.step; k < end; ++k, a += kMR, b += kNR)
      fma_step<R>(a, b, c0, c1);
  }
#pragma GCC unroll 2
  for (; k < K; ++k, a += kMR, b += kNR) fma_step<R>(a, b, c0, c1);
  store_tile<R>(c0, c1, t);
}

using MicroKernel = void (*)(int64_t, const float*, const float*, const Tile&, const Prefetch&);
constexpr MicroKernel kKernels[kMR + 1] = {
    nullptr,          micro_kernel<1>,  micro_kernel<2>,  micro_kernel<3>,  micro_kernel<4>,
    micro_kernel<5>,  micro_kernel<6>,  micro_kernel<7>,  micro_kernel<8>,  micro_kernel<9>,
    micro_kernel<10>, micro_kernel<11>, micro_kernel<12>, micro_kernel<13>, micro_kernel<14>};

// y[r, 0:32] = epilogue(sum_i a[i*kMR + r] . b[i*32 + 0:32]) over bf16 pairs i < K2, for r < R.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), always_inline)) inline void
dot_step_bf16(const uint32_t* a, const uint32_t* b, __m512 (&c0)[R], __m512 (&c1)[R]) {
  const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 16);
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
    c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
    c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
  }
}

template <int R>
TESSERA_AVX512_BF16 void micro_kernel_bf16(int64_t K2, const uint32_t* a, const uint32_t* b,
                                           const Tile& t, const Prefetch& pf) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (int64_t line = 0; line < pf.count; ++line) {
    _mm_prefetch(pf.next + line * 64, _MM_HINT_T0);
    for (const int64_t end = i + pf.step; i < end; ++i, a += kMR, b += kNR)
      dot_step_bf16<R>(a, b, c0, c1);
  }
#pragma GCC unroll 2
  for (; i < K2; ++i, a += kMR, b += kNR) dot_step_bf16<R>(a, b, c0, c1);
  store_tile<R>(c0, c1, t);
}

using MicroKernelBf16 = void (*)(int64_t, const uint32_t*, const uint32_t*, const Tile&,
                                 const Prefetch&);
constexpr MicroKernelBf16 kKernelsBf16[kMR + 1] = {
    nullptr,               micro_kernel_bf16<1>,  micro_kernel_bf16<2>,  micro_kernel_bf16<3>,
    micro_kernel_bf16<4>,  micro_kernel_bf16<5>,  micro_kernel_bf16<6>,  micro_kernel_bf16<7>,
    micro_kernel_bf16<8>,  micro_kernel_bf16<9>,  micro_kernel_bf16<10>, micro_kernel_bf16<11>,
    micro_kernel_bf16<12>, micro_kernel_bf16<13>, micro_kernel_bf16<14>};

// acc + u8 a . s8 b per 32-bit lane (vpdpbusd). Written as inline asm: with the intrinsic, GCC 12
// does not tie the accumulator to the destination and shuffles or spills the 26+ live
// accumulators on every iteration (less than 60% of the VNNI rate, measured).
TESSERA_AVX512_INLINE __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// The int8 epilogue of one tile: int32 sums (from memory) to fp32, then store_tile. Kept out of
// line so its registers do not compete with the kernel loop's accumulators.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), noinline)) void int8_epilogue(
    const int32_t (&acc)[R][kNR], const uint32_t* rq, const float* ws, const int32_t* wsum,
    const Tile& t) {
  const __m512 ws0 = _mm512_load_ps(ws), ws1 = _mm512_load_ps(ws + 16);
  const __m512i sum0 = _mm512_load_si512(wsum), sum1 = _mm512_load_si512(wsum + 16);
  __m512 f0[R], f1[R];
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    float scale;
    std::memcpy(&scale, rq + r, 4);
    const __m512 sr = _mm512_set1_ps(scale);
    const __m512i zp = _mm512_set1_epi32(static_cast<int>(rq[kMR + r]));
    __m512i d0 = _mm512_sub_epi32(_mm512_load_si512(acc[r]), _mm512_mullo_epi32(zp, sum0));
    __m512i d1 = _mm512_sub_epi32(_mm512_load_si512(acc[r] + 16), _mm512_mullo_epi32(zp, sum1));
    f0[r] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0), sr), ws0);
    f1[r] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d1), sr), ws1);
  }
  store_tile<R>(f0, f1, t);
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), always_inline)) inline void
dot_step_int8(const uint32_t* a, const uint32_t* b, __m512i (&c0)[R], __m512i (&c1)[R]) {
  const __m512i b0 = _mm512_load_si512(b), b1 = _mm512_load_si512(b + 16);
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    const __m512i av = _mm512_set1_epi32(static_cast<int>(a[r]));
    c0[r] = dpbusd(c0[r], av, b0);
    c1[r] = dpbusd(c1[r], av, b1);
  }
}

// y[r, 0:32] = epilogue(s[r] scale_w (sum_i a[i*kMR + r] . b[i*32 + 0:32] - zp[r] colsum)) over
// u8 x s8 quads i < K4, for r < R (int32 accumulation; see gemm_internal.hpp for the math).
// rq: the micro-panel's kMR row scales (float bits) then kMR zero points; ws/wsum: the panel's
// 32 column scales and column sums.
template <int R>
TESSERA_AVX512_VNNI void micro_kernel_int8(int64_t K4, const uint32_t* a, const uint32_t* b,
                                           const uint32_t* rq, const float* ws, const int32_t* wsum,
                                           const Tile& t, const Prefetch& pf) {
  __m512i c0[R], c1[R];
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_si512();
  int64_t i = 0;
  for (int64_t line = 0; line < pf.count; ++line) {
    _mm_prefetch(pf.next + line * 64, _MM_HINT_T0);
    for (const int64_t end = i + pf.step; i < end; ++i, a += kMR, b += kNR)
      dot_step_int8<R>(a, b, c0, c1);
  }
#pragma GCC unroll 2
  for (; i < K4; ++i, a += kMR, b += kNR) dot_step_int8<R>(a, b, c0, c1);
  alignas(64) int32_t acc[R][kNR];
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    _mm512_store_si512(acc[r], c0[r]);
    _mm512_store_si512(acc[r] + 16, c1[r]);
  }
  int8_epilogue<R>(acc, rq, ws, wsum, t);
}

using MicroKernelInt8 = void (*)(int64_t, const uint32_t*, const uint32_t*, const uint32_t*,
                                 const float*, const int32_t*, const Tile&, const Prefetch&);
constexpr MicroKernelInt8 kKernelsInt8[kMR + 1] = {
    nullptr,               micro_kernel_int8<1>,  micro_kernel_int8<2>,  micro_kernel_int8<3>,
    micro_kernel_int8<4>,  micro_kernel_int8<5>,  micro_kernel_int8<6>,  micro_kernel_int8<7>,
    micro_kernel_int8<8>,  micro_kernel_int8<9>,  micro_kernel_int8<10>, micro_kernel_int8<11>,
    micro_kernel_int8<12>, micro_kernel_int8<13>, micro_kernel_int8<14>};

// v[r] holds 16 consecutive words of micro-panel row r (r < 16; rows past the panel are
// ignored): dst[i * kMR + r] = v[r][i] for i < count, r < kMR. The micro-panel layout is the
// transpose of the rows, so one 16 x 16 register transpose replaces 14 x 16 scalar stores.
TESSERA_AVX512_INLINE void store_columns(__m512 (&v)[16], int64_t count, uint32_t* dst) {
  transpose16(v);
  constexpr __mmask16 kPanelRows = (1u << kMR) - 1;
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if (i < count) _mm512_mask_storeu_ps(dst + i * kMR, kPanelRows, v[i]);
}

// Quantizes x rows (rows <= kMR) to u8 quads: dst[i*kMR + r] = u[r, 4i..4i+3], then kMR row
// scales and kMR zero points (gemm_internal.hpp's math, vectorised; cvtps rounds to nearest
// even like std::nearbyint).
TESSERA_AVX512 void pack_rows_int8(const float* x, int64_t ldx, int64_t rows, int64_t K,
                                   uint32_t* dst) {
  const int64_t K4 = int8_quads(K);
  RowQuant q[kMR];
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes(K - k), xr + k);
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
    }
    q[r] = row_quant(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
    std::memcpy(dst + K4 * kMR + r, &q[r].scale, 4);
    dst[K4 * kMR + kMR + r] = static_cast<uint32_t>(q[r].zero);
  }
  const __m512i top = _mm512_set1_epi32(255);
  for (int64_t k = 0; k < 4 * K4; k += 64) {  // 16 quads of every row at a time
    __m512 v[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      v[r] = _mm512_setzero_ps();
      if (r >= rows) continue;
      const float* xr = x + r * ldx + k;
      const __m512 inv = _mm512_set1_ps(q[r].inv);
      const __m512i zp = _mm512_set1_epi32(q[r].zero);
      __m128i bytes[4];
      for (int g = 0; g < 4; ++g) {
        const __mmask16 m = lanes(K - k - 16 * g);
        __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + 16 * g), inv)), zp);
        u = _mm512_min_epi32(_mm512_max_epi32(u, _mm512_setzero_si512()), top);
        bytes[g] = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, u));  // past K: 0, as W
      }
      __m512i w = _mm512_castsi128_si512(bytes[0]);
      w = _mm512_inserti32x4(w, bytes[1], 1);
      w = _mm512_inserti32x4(w, bytes[2], 2);
      w = _mm512_inserti32x4(w, bytes[3], 3);
      v[r] = _mm512_castsi512_ps(w);
    }
    store_columns(v, K4 - k / 4, dst + (k / 4) * kMR);
  }
}

// dst[i*kMR + r] = bf16 pair (x[r, 2i], x[r, 2i+1]) for r < rows: vcvtne2ps2bf16 on 32 floats
// at a time (round to nearest even like bf16_bits; it also flushes float denormals to zero).
TESSERA_AVX512_BF16 void pack_rows_bf16(const float* x, int64_t ldx, int64_t rows, int64_t K,
                                        uint32_t* dst) {
  const int64_t K2 = ceil_div(K, 2);
  for (int64_t k = 0; k < K; k += 32) {  // 16 pairs of every row at a time
    __m512 v[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      v[r] = _mm512_setzero_ps();
      if (r >= rows) continue;
      const float* xr = x + r * ldx + k;
      const __m512 lo = _mm512_maskz_loadu_ps(lanes(K - k), xr);
      const __m512 hi = _mm512_maskz_loadu_ps(lanes(K - k - 16), xr + 16);
      v[r] = _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    store_columns(v, K2 - k / 2, dst + (k / 2) * kMR);
  }
}

// The same from x stored column-major (x[r, k] at x[k*ldx + r]): each pair row of the
// micro-panel from two of x's rows, rounded by the same instruction and interleaved.
TESSERA_AVX512_BF16 void pack_cols_bf16(const float* x, int64_t ldx, int64_t rows, int64_t K,
                                        uint32_t* dst) {
  const __mmask16 in = lanes(rows), out = lanes(kMR);
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t k = 0; k < K; k += 2) {
    const __m512 lo = _mm512_maskz_loadu_ps(in, x + k * ldx);
    const __m512 hi = k + 1 < K ? _mm512_maskz_loadu_ps(in, x + (k + 1) * ldx) : _mm512_setzero_ps();
    const __m512i pairs = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    _mm512_mask_storeu_epi32(dst + (k / 2) * kMR, out, pairs);
  }
}

// The epilogue parameters of column panel j (its bias, and masks for N not a multiple of 32).
Tile panel_tile(const LinearArgs& a, int64_t j) {
  int64_t cols = a.N - j * kNR < kNR ? a.N - j * kNR : kNR;
  Tile t;
  t.y = nullptr;
  t.residual = nullptr;
  t.ldy = a.ldy;
  t.bias = a.bias ? a.bias + j * kNR : nullptr;
  t.mask0 = lanes(cols);
  t.mask1 = lanes(cols - 16);
  t.act = a.act;
  return t;
}

// apack[k*kMR + r] = x[r*ldx + k] for r < rows (rows <= kMR): one micro-panel of A.
TESSERA_AVX512 void pack_rows(const float* x, int64_t ldx, int64_t rows, int64_t K, float* apack) {
  for (int64_t k = 0; k < K; k += 16) {
    __m512 v[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r)
      v[r] = r < rows ? _mm512_maskz_loadu_ps(lanes(K - k), x + r * ldx + k) : _mm512_setzero_ps();
    store_columns(v, K - k, reinterpret_cast<uint32_t*>(apack + k * kMR));
  }
}

// The same micro-panel from x stored column-major (x[r, k] at x[k*ldx + r]): row k of the
// micro-panel is x's `rows` consecutive floats at k*ldx, so packing is a copy.
TESSERA_AVX512 void pack_cols(const float* x, int64_t ldx, int64_t rows, int64_t K, float* apack) {
  const __mmask16 in = lanes(rows), out = lanes(kMR);
  for (int64_t k = 0; k < K; ++k)
    _mm512_mask_storeu_ps(apack + k * kMR, out, _mm512_maskz_loadu_ps(in, x + k * ldx));
}

// The walk every task makes, whatever the weight type: pack the task's micro-panels of x
// (pack(x, ldx, rows, K, dst), `words` words each), then for each column panel j run every
// micro-panel's tile (tile(rows, micro-panel words, j, Tile, Prefetch)). Weight panels are
// `steps` rows of 128 bytes (one per kernel iteration), consecutive from `panels`.
//
// Each panel is used by all the task's micro-panels in turn, so only the first pass reads it
// from memory, at one 128-byte row per ~14 cycles: faster than one core's share of the memory
// bandwidth, and the hardware prefetcher did not hide it (the linears were 3-12% slower with
// cold weights than in a warm loop). So the passes over panel j share out panel j+1's cache
// lines, one every few iterations, and the next panel is in cache when its turn comes. ViT-B,
// 2 threads, batch 1, alternating runs: fp32 117 -> 111 ms, bf16 66 -> 62 ms per image (batch 8
// unchanged). A task of one micro-panel asks for nothing: there the weights are all there is to
// stream.
//
// The walk only moves pointers and calls the kernels through their tables, so it needs no CPU
// target of its own.
template <class Word, class Pack, class RunTile>
void task_walk(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1, Word* apack,
               int64_t words, const void* panels, int64_t steps, Pack pack, RunTile tile) {
  for (int64_t p = 0; p < rows.panels; ++p) {
    const int64_t r0 = rows.row_begin(p), r1 = rows.row_begin(p + 1);
    pack(a.row(r0), a.ldx, r1 - r0, a.K, apack + p * words);
  }
  const int64_t passes = rows.panels, lines = 2 * steps;  // 64-byte lines per panel
  const int64_t share = ceil_div(lines, passes);      // lines per pass
  for (int64_t j = j0; j < j1; ++j) {
    Tile t = panel_tile(a, j);
    const char* next = static_cast<const char*>(panels) + (j + 1) * steps * 128;
    for (int64_t p = 0; p < rows.panels; ++p) {
      const int64_t r0 = rows.row_begin(p), r1 = rows.row_begin(p + 1);
      t.y = a.y + r0 * a.ldy + j * kNR;
      t.residual = a.residual ? a.residual + r0 * a.ldy + j * kNR : nullptr;
      Prefetch pf;
      if (j + 1 < j1 && passes > 1) {
        const int64_t first = p * share;
        pf.next = next + first * 64;
        pf.count = std::clamp<int64_t>(lines - first, 0, share);
        pf.step = steps / share;  // >= 1: share <= steps when there are 2 or more passes
      }
      tile(r1 - r0, apack + p * words, j, t, pf);
    }
  }
}

}  // namespace

void linear_task_avx512(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                        float* apack) {
  const int64_t K = a.K;
  task_walk(a, rows, j0, j1, apack, K * kMR, a.wpack, K, a.x_cols ? pack_cols : pack_rows,
            [&](int64_t n, const float* ap, int64_t j, const Tile& t, const Prefetch& pf) {
              kKernels[n](K, ap, a.wpack + j * K * kNR, t, pf);
            });
}

void linear_task_avx512_bf16(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                             uint32_t* apack) {
  const int64_t K2 = ceil_div(a.K, 2);
  task_walk(a, rows, j0, j1, apack, K2 * kMR, a.wpack_bf16, K2, a.x_cols ? pack_cols_bf16 : pack_rows_bf16,
            [&](int64_t n, const uint32_t* ap, int64_t j, const Tile& t, const Prefetch& pf) {
              kKernelsBf16[n](K2, ap, a.wpack_bf16 + j * K2 * kNR, t, pf);
            });
}

void linear_task_avx512_int8(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                             uint32_t* apack) {
  const int64_t K4 = int8_quads(a.K);
  task_walk(a, rows, j0, j1, apack, int8_apack_words(a.K, kMR), a.wpack_i8, K4,
            pack_rows_int8,
            [&](int64_t n, const uint32_t* ap, int64_t j, const Tile& t, const Prefetch& pf) {
              // ap: the quads, then the micro-panel's row scales and zero points
              kKernelsInt8[n](K4, ap, a.wpack_i8 + j * K4 * kNR, ap + K4 * kMR, a.wscale + j * kNR,
                              a.wsum + j * kNR, t, pf);
            });
}

TESSERA_AVX512 void gelu_avx512(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(y + i, m, gelu_v(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

TESSERA_AVX512 void erf_avx512(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(y + i, m, erf_v(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

// dx[i] += dy[i] (Φ(x) + x φ(x)) with gelu_v's 1 + erf (erfc on the tails) and φ(x) =
// exp(-x²/2)/√(2π), 0 where x²/2 > 30 (φ < 4e-14 there; exp_neg's range ends at -30).
TESSERA_AVX512 void gelu_backward_avx512(const float* x, const float* dy, float* dx, int64_t n, bool accumulate) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 one_plus = one_plus_erf_v(v);
    const __m512 h = _mm512_mul_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(-0.5f));
    const __mmask16 in_range = _mm512_cmp_ps_mask(h, _mm512_set1_ps(-30.0f), _CMP_GE_OQ);
    const __m512 pdf = _mm512_maskz_mul_ps(in_range, exp_neg(_mm512_max_ps(h, _mm512_set1_ps(-30.0f))),
                                           _mm512_set1_ps(0.39894228040143268f));
    const __m512 g = _mm512_fmadd_ps(v, pdf, _mm512_mul_ps(_mm512_set1_ps(0.5f), one_plus));
    const __m512 d = accumulate ? _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, dy + i), g, _mm512_maskz_loadu_ps(m, dx + i))
                                : _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), g);
    _mm512_mask_storeu_ps(dx + i, m, d);
  }
}

TESSERA_AVX512 float fma_loop_avx512(int64_t n) {
  // a = a * b + c converges to c / (1 - b) = 0.1: no overflow, no denormals.
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  __m512 a[24];
#pragma GCC unroll 24
  for (int j = 0; j < 24; ++j) a[j] = _mm512_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < n; ++i) {
#pragma GCC unroll 24
    for (int j = 0; j < 24; ++j) a[j] = _mm512_fmadd_ps(a[j], b, c);
  }
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 24
  for (int j = 0; j < 24; ++j) sum = _mm512_add_ps(sum, a[j]);
  return _mm512_reduce_add_ps(sum);
}

}  // namespace tessera::gemm_detail
