// AVX2 + FMA linear layers: a 6 x 16 register-tiled micro-kernel over the same K-major weight
// panels as the AVX-512 path (each 32-column panel read as two 16-column halves), with the
// same fused epilogue (bias, exact-erf GELU with the shared coefficients, ReLU, residual).
// Every function carries a target attribute, so this file works without -march=native; the
// dispatcher in gemm.cpp only calls it when the CPU reports avx2 and fma and the cap allows.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm_internal.hpp"

#define TESSERA_AVX2 __attribute__((target("avx2,fma")))
#define TESSERA_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

namespace tessera::gemm_detail {
namespace {

constexpr int64_t kMR6 = kMrAvx2;

// ---- epilogue math: gemm_avx512.cpp's, lane for lane, on 8 floats ---------------------------

template <int N>
TESSERA_AVX2_INLINE __m256 poly(__m256 t, const float (&c)[N]) {
  __m256 r = _mm256_set1_ps(c[0]);
  for (int i = 1; i < N; ++i) r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(c[i]));
  return r;
}

// exp(p) for p in [-30, 0]: 2^n exp(r), 2^n built in the exponent field (n >= -44: normal).
TESSERA_AVX2_INLINE __m256 exp_neg(__m256 p) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(p, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693145751953125f), p);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.428606765330187e-6f), r);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly(r, kExp), _mm256_castsi256_ps(bits));
}

TESSERA_AVX2_INLINE __m256 abs_ps(__m256 v) {
  return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
}

// erfc(t) for t >= 0.921875 (0 past 4), and erf(z) for |z| <= 0.921875.
TESSERA_AVX2_INLINE __m256 erfc_large(__m256 t) {
  const __m256 tc = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(kErfSplit)), _mm256_set1_ps(kErfcZero));
  const __m256 e = exp_neg(poly(tc, kLogErfc));
  return _mm256_and_ps(_mm256_cmp_ps(t, _mm256_set1_ps(kErfcZero), _CMP_LE_OQ), e);
}
TESSERA_AVX2_INLINE __m256 erf_small(__m256 z) {
  const __m256 zc = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-kErfSplit)), _mm256_set1_ps(kErfSplit));
  return _mm256_fmadd_ps(zc, poly(_mm256_mul_ps(zc, zc), kErfSmall), zc);
}

TESSERA_AVX2_INLINE __m256 erf_v(__m256 z) {
  const __m256 t = abs_ps(z);
  const __m256 small = _mm256_cmp_ps(t, _mm256_set1_ps(kErfSplit), _CMP_LE_OQ);
  __m256 large = _mm256_sub_ps(_mm256_set1_ps(1.0f), erfc_large(t));
  large = _mm256_or_ps(large, _mm256_and_ps(z, _mm256_set1_ps(-0.0f)));  // copysign(large, z)
  return _mm256_blendv_ps(large, erf_small(z), small);
}

// 1 + erf(x / sqrt 2): 2 - erfc or erfc past 0.92, which keeps the negative tail's accuracy.
TESSERA_AVX2_INLINE __m256 one_plus_erf_v(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 t = abs_ps(z);
  const __m256 small = _mm256_cmp_ps(t, _mm256_set1_ps(kErfSplit), _CMP_LE_OQ);
  const __m256 positive = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
  const __m256 e = erfc_large(t);
  const __m256 one_plus = _mm256_blendv_ps(e, _mm256_sub_ps(_mm256_set1_ps(2.0f), e), positive);
  return _mm256_blendv_ps(one_plus, _mm256_add_ps(_mm256_set1_ps(1.0f), erf_small(z)), small);
}

// gelu(x) = 0.5 x (1 + erf(x / sqrt 2)).
TESSERA_AVX2_INLINE __m256 gelu_v(__m256 x) {
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), one_plus_erf_v(x));
}

TESSERA_AVX2_INLINE __m256 activate(__m256 v, Activation act) {
  if (act == Activation::Gelu) return gelu_v(v);
  if (act == Activation::Relu) return _mm256_max_ps(v, _mm256_setzero_ps());
  return v;
}

// Lanes [0, n) of 8 as a maskload/maskstore mask.
TESSERA_AVX2_INLINE __m256i lanes8(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int32_t m = static_cast<int32_t>(n < 0 ? 0 : n > 8 ? 8 : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), idx);
}

struct Tile {
  float* y;               // tile's top-left output
  const float* residual;  // same position in residual, or null
  int64_t ldy;
  const float* bias;      // 16 floats (padded), or null
  int64_t cols;           // valid columns of the half, 1..16
  Activation act;
};

// y[r, :] = act(c[r] + bias) (+ residual[r, :]) for r < R, masked to the tile's columns.
template <int R>
TESSERA_AVX2_INLINE void store_tile(const __m256 (&c0)[R], const __m256 (&c1)[R], const Tile& t) {
  const __m256 bias0 = t.bias ? _mm256_loadu_ps(t.bias) : _mm256_setzero_ps();
  const __m256 bias1 = t.bias ? _mm256_loadu_ps(t.bias + 8) : _mm256_setzero_ps();
  const bool full = t.cols == 16;
  const __m256i m0 = lanes8(t.cols), m1 = lanes8(t.cols - 8);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    __m256 v0 = activate(_mm256_add_ps(c0[r], bias0), t.act);
    __m256 v1 = activate(_mm256_add_ps(c1[r], bias1), t.act);
    float* yr = t.y + r * t.ldy;
    if (full) {
      if (t.residual) {
        const float* rr = t.residual + r * t.ldy;
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(rr));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(rr + 8));
      }
      _mm256_storeu_ps(yr, v0);
      _mm256_storeu_ps(yr + 8, v1);
    } else {
      if (t.residual) {
        const float* rr = t.residual + r * t.ldy;
        v0 = _mm256_add_ps(v0, _mm256_maskload_ps(rr, m0));
        v1 = _mm256_add_ps(v1, _mm256_maskload_ps(rr + 8, m1));
      }
      _mm256_maskstore_ps(yr, m0, v0);
      _mm256_maskstore_ps(yr + 8, m1, v1);
    }
  }
}

// ---- fp32 ------------------------------------------------------------------------------------

// y[r, 0:16] = epilogue(sum_k a[k*6 + r] * b[k*32 + 0:16]) for r < R: the micro-kernel.
// Lines of the task's next weight half for one micro-kernel call to ask for, one every `step`
// k (a half row is one 64-byte line, rows 128 bytes apart): the calls on one half share out
// the next one, as in gemm_avx512.cpp's task_walk, so its first pass finds it in cache.
struct Prefetch {
  const char* next = nullptr;
  int64_t count = 0, step = 1;
};

// c0[r] += a[r] * b0, c1[r] += a[r] * b1 for r < R: one k of the tile.
template <int R>
TESSERA_AVX2_INLINE void fma_rows(const float* a, __m256 b0, __m256 b1, __m256 (&c0)[R], __m256 (&c1)[R]) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m256 av = _mm256_broadcast_ss(a + r);
    c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
    c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
  }
}

template <int R>
TESSERA_AVX2_INLINE void fma_step(const float* a, const float* b, __m256 (&c0)[R], __m256 (&c1)[R]) {
  fma_rows<R>(a, _mm256_loadu_ps(b), _mm256_loadu_ps(b + 8), c0, c1);
}

template <int R>
TESSERA_AVX2 void micro_kernel(int64_t K, const float* a, const float* b, const Tile& t,
                               const Prefetch& pf = {}) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t line = 0; line < pf.count; ++line) {
    _mm_prefetch(pf.next + line * kNR * 4, _MM_HINT_T0);
    for (const int64_t end = k + pf.step; k < end; ++k, a += kMR6, b += kNR) fma_step<R>(a, b, c0, c1);
  }
#pragma GCC unroll 2
  for (; k < K; ++k, a += kMR6, b += kNR) fma_step<R>(a, b, c0, c1);
  store_tile<R>(c0, c1, t);
}

// The bf16 tile (AVX2 has no bf16 dot product): each pair row's 16-column half (one 64-byte line
// of 16 words) is read twice straight from the bf16 panel and widened in registers: the high
// halves masked (W[c, 2i+1]) for x[2i+1], then the low halves shifted up (W[c, 2i]) for x[2i]:
// exact, and per pair acc += x1 w1 then acc += x0 w0, the order of vdpbf16ps and the portable
// path, so the bits are theirs (tested). The tile is 12 accumulators + the mask + 2 W + the
// broadcast: 16 ymm. (Widening each panel once per task into an fp32 copy for the fp32 kernel,
// the first way, ran at 0.96-0.98x fp32 on ViT-B; this at 1.01-1.03x on the GEMMs alone.)
template <int R>
TESSERA_AVX2_INLINE void bf16_pair_step(const float* a, const uint32_t* b, __m256 mask, __m256 (&c0)[R],
                                        __m256 (&c1)[R]) {
  if constexpr (R == 6) {
    // The full tile needs all 16 ymm registers (12 accumulators, the mask, 2 W, the broadcast),
    // which GCC 12's allocator does not find from intrinsics (it spilled an accumulator, whose
    // store-to-load chain then set the pace: 0.55x); so this step is written out.
    __m256 w0, w1, bc;
    asm("vandps (%[b]), %[mask], %[w0]\n\t"
      "vandps 32(%[b]), %[mask], %[w1]\n\t"
      "vbroadcastss 0(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c00]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c10]\n\t"
      "vbroadcastss 4(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c01]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c11]\n\t"
      "vbroadcastss 8(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c02]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c12]\n\t"
      "vbroadcastss 12(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c03]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c13]\n\t"
      "vbroadcastss 16(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c04]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c14]\n\t"
      "vbroadcastss 20(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c05]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c15]\n\t"
      "vmovdqu (%[b]), %[w0]\n\t"
      "vmovdqu 32(%[b]), %[w1]\n\t"
      "vpslld $16, %[w0], %[w0]\n\t"
      "vpslld $16, %[w1], %[w1]\n\t"
      "vbroadcastss 24(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c00]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c10]\n\t"
      "vbroadcastss 28(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c01]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c11]\n\t"
      "vbroadcastss 32(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c02]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c12]\n\t"
      "vbroadcastss 36(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c03]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c13]\n\t"
      "vbroadcastss 40(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c04]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c14]\n\t"
      "vbroadcastss 44(%[a]), %[bc]\n\t"
      "vfmadd231ps %[w0], %[bc], %[c05]\n\t"
      "vfmadd231ps %[w1], %[bc], %[c15]\n\t"
        : [c00] "+x"(c0[0]), [c10] "+x"(c1[0]), [c01] "+x"(c0[1]), [c11] "+x"(c1[1]), [c02] "+x"(c0[2]), [c12] "+x"(c1[2]), [c03] "+x"(c0[3]), [c13] "+x"(c1[3]), [c04] "+x"(c0[4]), [c14] "+x"(c1[4]), [c05] "+x"(c0[5]), [c15] "+x"(c1[5]),
          [w0] "=&x"(w0), [w1] "=&x"(w1), [bc] "=&x"(bc)
        : [a] "r"(a), [b] "r"(b), [mask] "x"(mask)
        : "memory");
  } else {
    const float* w = reinterpret_cast<const float*>(b);
    const __m256i* wi = reinterpret_cast<const __m256i*>(b);
    fma_rows<R>(a, _mm256_and_ps(mask, _mm256_loadu_ps(w)), _mm256_and_ps(mask, _mm256_loadu_ps(w + 8)), c0, c1);
    fma_rows<R>(a + kMR6, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(wi), 16)),
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(wi + 1), 16)), c0, c1);
  }
}

template <int R>
TESSERA_AVX2 void micro_kernel_bf16(int64_t K2, const float* a, const uint32_t* b, const Tile& t,
                                    const Prefetch& pf = {}) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  int64_t i = 0;
  for (int64_t line = 0; line < pf.count; ++line) {
    _mm_prefetch(pf.next + line * kNR * 4, _MM_HINT_T0);
    for (const int64_t end = i + pf.step; i < end; ++i, a += 2 * kMR6, b += kNR) bf16_pair_step<R>(a, b, mask, c0, c1);
  }
  for (; i < K2; ++i, a += 2 * kMR6, b += kNR) bf16_pair_step<R>(a, b, mask, c0, c1);
  store_tile<R>(c0, c1, t);
}

// ---- int8 ------------------------------------------------------------------------------------

// The int8 epilogue of one tile: int32 sums to fp32 (gemm_internal.hpp's rescale), then
// store_tile. Out of line so its registers do not compete with the kernel loop's.
template <int R>
__attribute__((target("avx2,fma"), noinline)) void int8_epilogue(
    const int32_t (&acc)[R][16], const uint32_t* rq, const float* ws, const int32_t* wsum,
    const Tile& t, int offset) {
  const __m256 ws0 = _mm256_loadu_ps(ws), ws1 = _mm256_loadu_ps(ws + 8);
  const __m256i sum0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum));
  const __m256i sum1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + 8));
  __m256 f0[R], f1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float scale;
    std::memcpy(&scale, rq + r, 4);
    const __m256 sr = _mm256_set1_ps(scale);
    // sum xs w + (127 - zp) colsum = sum u w - zp colsum (offset: what the kernel's bytes add
    // to xs, times -1: 0 for vpmaddubsw's xs, -128 for vpdpbusd's xs + 128)
    const __m256i shift = _mm256_set1_epi32(127 - static_cast<int>(rq[kMR6 + r]) + offset);
    const __m256i d0 = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[r])),
                                        _mm256_mullo_epi32(shift, sum0));
    const __m256i d1 = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[r] + 8)),
                                        _mm256_mullo_epi32(shift, sum1));
    f0[r] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d0), sr), ws0);
    f1[r] = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d1), sr), ws1);
  }
  store_tile<R>(f0, f1, t);
}

// y[r, 0:16] = epilogue(s[r] scale_w (sum_i a[i*6 + r] . b[i*32 + 0:16] + (127 - zp[r])
// colsum)) over s8 xs (u - 127, in [-127, 127]) x s8 quads i < K4: vpmaddubsw(|w|, sign(w) xs)
// makes the two exact int16 pair sums per column, vpmaddwd with ones adds them into int32
// (see RowQuant for why nothing saturates).
template <int R>
TESSERA_AVX2 void micro_kernel_int8(int64_t K4, const uint32_t* a, const uint32_t* b,
                                    const uint32_t* rq, const float* ws, const int32_t* wsum,
                                    const Tile& t) {
  // One 8-column quarter of the panel at a time (6 accumulators + W, |W|, ones, the broadcast
  // and a temporary: 16 columns at once would need 18 ymm and spill), summed into acc.
  alignas(32) int32_t acc[R][16];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256i c[R];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) c[r] = _mm256_setzero_si256();
    const uint32_t* ai = a;
    const uint32_t* bi = b + 8 * half;
    for (int64_t i = 0; i < K4; ++i, ai += kMR6, bi += kNR) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bi));
      const __m256i aw = _mm256_abs_epi8(w);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256i av = _mm256_set1_epi32(static_cast<int>(ai[r]));
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, w));
        c[r] = _mm256_add_epi32(c[r], _mm256_madd_epi16(p, ones));
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r] + 8 * half), c[r]);
  }
  int8_epilogue<R>(acc, rq, ws, wsum, t, 0);
}

// The same tile with AVX-VNNI: x's bytes packed as xs ^ 0x80 = xs + 128 (u8, in [1, 255]), and
// vpdpbusd multiplies them by W's s8 and adds each column's four products straight into int32:
// exact, no int16 step that could saturate, one instruction per row and 8 columns (against
// four), and all 16 columns at once (12 accumulators + 2 W + the broadcast: 15 ymm). The sums
// are sum xs w + 128 colsum, which the epilogue's offset takes back out, so the result has the
// bits of micro_kernel_int8's.
template <int R>
__attribute__((target("avx2,fma,avxvnni"))) void micro_kernel_int8_vnni(
    int64_t K4, const uint32_t* a, const uint32_t* b, const uint32_t* rq, const float* ws,
    const int32_t* wsum, const Tile& t) {
  __m256i c0[R], c1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) c0[r] = _mm256_setzero_si256(), c1[r] = _mm256_setzero_si256();
  const uint32_t* ai = a;
  const uint32_t* bi = b;
  for (int64_t i = 0; i < K4; ++i, ai += kMR6, bi += kNR) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bi));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bi + 8));
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256i av = _mm256_set1_epi32(static_cast<int>(ai[r]));
      c0[r] = _mm256_dpbusd_avx_epi32(c0[r], av, w0);
      c1[r] = _mm256_dpbusd_avx_epi32(c1[r], av, w1);
    }
  }
  alignas(32) int32_t acc[R][16];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r]), c0[r]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc[r] + 8), c1[r]);
  }
  int8_epilogue<R>(acc, rq, ws, wsum, t, -128);
}

// ---- packing x ---------------------------------------------------------------------------------

// apack[k*6 + r] = x[r*ldx + k] for r < rows (rows <= 6), 0 for the rows past them.
TESSERA_AVX2 void pack_rows(const float* x, int64_t ldx, int64_t rows, int64_t K, float* apack) {
  for (int64_t r = 0; r < kMR6; ++r) {
    if (r < rows) {
      const float* xr = x + r * ldx;
      for (int64_t k = 0; k < K; ++k) apack[k * kMR6 + r] = xr[k];
    } else {
      for (int64_t k = 0; k < K; ++k) apack[k * kMR6 + r] = 0.0f;
    }
  }
}

// The same from x stored column-major (x[r, k] at x[k*ldx + r]): a copy of `rows` consecutive
// floats per k.
TESSERA_AVX2 void pack_cols(const float* x, int64_t ldx, int64_t rows, int64_t K, float* apack) {
  const __m256i in = lanes8(rows), out = lanes8(kMR6);
  for (int64_t k = 0; k < K; ++k) _mm256_maskstore_ps(apack + k * kMR6, out, _mm256_maskload_ps(x + k * ldx, in));
}

// bf16_bits(x) << 16 on 8 floats' bits: round to nearest even, NaN stays (quiet) NaN.
TESSERA_AVX2_INLINE __m256i bf16_high_bits(__m256i u) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), high);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i quieted = _mm256_or_si256(_mm256_and_si256(u, high), _mm256_set1_epi32(0x00400000));
  return _mm256_blendv_epi8(rounded, quieted, nan);
}

// The same with x rounded to bf16 (bf16_bits), K padded to even with zeros, and each pair's
// two k swapped (apack[(k ^ 1) * 6 + r] = x[r, k]): micro_kernel_bf16 takes each pair's odd k first.
TESSERA_AVX2 void pack_rows_bf16(const float* x, int64_t ldx, int64_t rows, int64_t K,
                                 float* apack) {
  const int64_t K2 = ceil_div(K, 2) * 2;
  alignas(32) uint32_t bits[8];
  for (int64_t r = 0; r < kMR6; ++r) {
    const float* xr = x + r * ldx;
    int64_t k = 0;
    if (r < rows)
      for (; k + 8 <= K; k += 8) {  // 8 at a time
        _mm256_store_si256(reinterpret_cast<__m256i*>(bits), bf16_high_bits(_mm256_castps_si256(_mm256_loadu_ps(xr + k))));
        for (int e = 0; e < 8; ++e) std::memcpy(apack + ((k + e) ^ 1) * kMR6 + r, bits + e, 4);
      }
    for (; k < K2; ++k) {
      const uint32_t b = r < rows && k < K ? bf16_bits(xr[k]) << 16 : 0u;
      std::memcpy(apack + (k ^ 1) * kMR6 + r, &b, 4);
    }
  }
}

// The same from x stored column-major (x[r, k] at x[k*ldx + r]): `rows` consecutive floats per k,
// rounded as above.
TESSERA_AVX2 void pack_cols_bf16(const float* x, int64_t ldx, int64_t rows, int64_t K, float* apack) {
  const __m256i in = lanes8(rows), out = lanes8(kMR6);
  const int64_t K2 = ceil_div(K, 2) * 2;
  for (int64_t k = 0; k < K2; ++k) {
    const __m256i u = k < K ? _mm256_castps_si256(_mm256_maskload_ps(x + k * ldx, in)) : _mm256_setzero_si256();
    _mm256_maskstore_ps(apack + (k ^ 1) * kMR6, out, _mm256_castsi256_ps(bf16_high_bits(u)));
  }
}

// Quantizes x rows (rows <= 6) at 254 levels: dst[i*6 + r] = xs[r, 4i..4i+3] (s8 bytes,
// xs = u - 127; 0 past K, which W's zero padding cancels), then 6 row scales (float bits) and
// 6 zero points (gemm_internal.hpp's math).
TESSERA_AVX2 void pack_rows_int8(const float* x, int64_t ldx, int64_t rows, int64_t K,
                                 uint32_t* dst, uint32_t flip = 0) {
  constexpr int32_t levels = 254;
  const int64_t K4 = int8_quads(K);
  for (int64_t r = 0; r < kMR6; ++r) {
    RowQuant q{0.0f, 0.0f, 0, levels};
    if (r < rows) {
      const float* xr = x + r * ldx;
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
      }
      alignas(32) float l8[8], h8[8];
      _mm256_store_ps(l8, lo);
      _mm256_store_ps(h8, hi);
      float mn = 0.0f, mx = 0.0f;
      for (int l = 0; l < 8; ++l) mn = std::min(mn, l8[l]), mx = std::max(mx, h8[l]);
      for (; k < K; ++k) mn = std::min(mn, xr[k]), mx = std::max(mx, xr[k]);
      q = row_quant(mn, mx, levels);
      // quantize_u8 on 8 lanes, two quads at a time: cvtps rounds to nearest even as
      // nearbyint does (the default MXCSR), then clamp, - 127, and narrow to bytes in order.
      const __m256 inv = _mm256_set1_ps(q.inv);
      const __m256i zp = _mm256_set1_epi32(q.zero), top = _mm256_set1_epi32(q.top);
      const __m256i floor0 = _mm256_setzero_si256(), mid = _mm256_set1_epi32(127);
      int64_t i = 0;
      for (; 4 * i + 8 <= K; i += 2) {
        __m256i u = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + 4 * i), inv)), zp);
        u = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(u, floor0), top), mid);
        const __m256i w16 = _mm256_packs_epi32(u, u);      // lane l: u[4l..4l+3] twice, int16
        const __m256i w8 = _mm256_packs_epi16(w16, w16);   // lane l: those 4 as bytes, 4 times
        dst[i * kMR6 + r] = static_cast<uint32_t>(_mm256_extract_epi32(w8, 0)) ^ flip;
        dst[(i + 1) * kMR6 + r] = static_cast<uint32_t>(_mm256_extract_epi32(w8, 4)) ^ flip;
      }
      for (; i < K4; ++i) {
        uint32_t word = 0;
        for (int e = 0; e < 4; ++e) {
          const int64_t kk = 4 * i + e;
          if (kk < K) word |= ((quantize_u8(xr[kk], q) - 127u) & 0xffu) << (8 * e);
        }
        dst[i * kMR6 + r] = word ^ flip;
      }
    } else {
      for (int64_t i = 0; i < K4; ++i) dst[i * kMR6 + r] = 0;
    }
    std::memcpy(dst + K4 * kMR6 + r, &q.scale, 4);
    dst[K4 * kMR6 + kMR6 + r] = static_cast<uint32_t>(q.zero);
  }
}

// ---- the walk ----------------------------------------------------------------------------------

// Packs the task's micro-panels of x (`words` words each), then for each column panel j and
// each of its 16-column halves runs every micro-panel's tile: tile(rows, micro-panel, j, half,
// Tile). Each half is streamed from memory by its first micro-panel and from cache after.
template <class Word, class Pack, class RunTile>
void task_walk(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1, Word* apack,
               int64_t words, Pack pack, RunTile tile) {
  for (int64_t p = 0; p < rows.panels; ++p) {
    const int64_t r0 = rows.row_begin(p), r1 = rows.row_begin(p + 1);
    pack(a.row(r0), a.ldx, r1 - r0, a.K, apack + p * words);
  }
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t c0 = j * kNR + 16 * h;
      if (c0 >= a.N) break;
      Tile t;
      t.ldy = a.ldy;
      t.bias = a.bias ? a.bias + c0 : nullptr;
      t.cols = std::min<int64_t>(16, a.N - c0);
      t.act = a.act;
      for (int64_t p = 0; p < rows.panels; ++p) {
        const int64_t r0 = rows.row_begin(p), r1 = rows.row_begin(p + 1);
        t.y = a.y + r0 * a.ldy + c0;
        t.residual = a.residual ? a.residual + r0 * a.ldy + c0 : nullptr;
        tile(r1 - r0, apack + p * words, j, h, t);
      }
    }
}

template <class F>
void by_rows(int64_t n, F f) {  // f(std::integral_constant<int, n>) for n in 1..6
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 6>{}); break;
  }
}

}  // namespace

void linear_task_avx2(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                      float* apack) {
  const int64_t K = a.K;
  const int64_t passes = rows.panels, share = ceil_div(K, passes);
  task_walk(a, rows, j0, j1, apack, K * kMR6, a.x_cols ? pack_cols : pack_rows,
            [&](int64_t n, const float* ap, int64_t j, int64_t h, const Tile& t) {
              const float* b = a.wpack + j * K * kNR + 16 * h;
              Prefetch pf;
              const int64_t nj = h ? j + 1 : j, nh = 1 - h;  // the next half
              if (passes > 1 && nj < j1 && nj * kNR + 16 * nh < a.N) {
                const int64_t first = (ap - apack) / (K * kMR6) * share;
                pf.next = reinterpret_cast<const char*>(a.wpack + nj * K * kNR + 16 * nh + first * kNR);
                pf.count = std::clamp<int64_t>(K - first, 0, share);
                pf.step = std::max<int64_t>(1, K / share);
              }
              by_rows(n, [&](auto R) { micro_kernel<decltype(R)::value>(K, ap, b, t, pf); });
            });
}

void linear_task_avx2_bf16(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                           float* apack) {
  const int64_t K2 = ceil_div(a.K, 2);
  // As linear_task_avx2, over pair rows: each half of a bf16 pair row is one 64-byte line, rows
  // 128 bytes apart, so the passes over a half share out the next half's prefetch the same way.
  const int64_t passes = rows.panels, share = ceil_div(K2, passes);
  task_walk(a, rows, j0, j1, apack, 2 * K2 * kMR6, a.x_cols ? pack_cols_bf16 : pack_rows_bf16,
            [&](int64_t n, const float* ap, int64_t j, int64_t h, const Tile& t) {
              const uint32_t* b = a.wpack_bf16 + j * K2 * kNR + 16 * h;
              Prefetch pf;
              const int64_t nj = h ? j + 1 : j, nh = 1 - h;  // the next half
              if (passes > 1 && nj < j1 && nj * kNR + 16 * nh < a.N) {
                const int64_t first = (ap - apack) / (2 * K2 * kMR6) * share;
                pf.next = reinterpret_cast<const char*>(a.wpack_bf16 + nj * K2 * kNR + 16 * nh + first * kNR);
                pf.count = std::clamp<int64_t>(K2 - first, 0, share);
                pf.step = std::max<int64_t>(1, K2 / share);
              }
              by_rows(n, [&](auto R) { micro_kernel_bf16<decltype(R)::value>(K2, ap, b, t, pf); });
            });
}

void linear_task_avx2_int8(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                           uint32_t* apack, bool vnni) {
  const int64_t K4 = int8_quads(a.K);
  const uint32_t flip = vnni ? 0x80808080u : 0u;  // vpdpbusd reads x's bytes as u8: xs + 128
  task_walk(a, rows, j0, j1, apack, int8_apack_words(a.K, kMR6),
            [flip](const float* x, int64_t ldx, int64_t n, int64_t K, uint32_t* dst) {
              pack_rows_int8(x, ldx, n, K, dst, flip);
            },
            [&](int64_t n, const uint32_t* ap, int64_t j, int64_t h, const Tile& t) {
              const uint32_t* b = a.wpack_i8 + j * K4 * kNR + 16 * h;
              const int64_t c0 = j * kNR + 16 * h;
              by_rows(n, [&](auto R) {
                if (vnni)
                  micro_kernel_int8_vnni<decltype(R)::value>(K4, ap, b, ap + K4 * kMR6, a.wscale + c0,
                                                             a.wsum + c0, t);
                else
                  micro_kernel_int8<decltype(R)::value>(K4, ap, b, ap + K4 * kMR6, a.wscale + c0,
                                                        a.wsum + c0, t);
              });
            });
}

TESSERA_AVX2 void gelu_avx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu_v(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i m = lanes8(n - i);
    _mm256_maskstore_ps(y + i, m, gelu_v(_mm256_maskload_ps(x + i, m)));
  }
}

TESSERA_AVX2 void erf_avx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, erf_v(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i m = lanes8(n - i);
    _mm256_maskstore_ps(y + i, m, erf_v(_mm256_maskload_ps(x + i, m)));
  }
}

// gelu_backward_avx512's math on 8 lanes.
TESSERA_AVX2_INLINE __m256 gelu_grad_v(__m256 v) {
  const __m256 one_plus = one_plus_erf_v(v);
  const __m256 h = _mm256_mul_ps(_mm256_mul_ps(v, v), _mm256_set1_ps(-0.5f));
  const __m256 in_range = _mm256_cmp_ps(h, _mm256_set1_ps(-30.0f), _CMP_GE_OQ);
  const __m256 pdf = _mm256_and_ps(in_range, _mm256_mul_ps(exp_neg(_mm256_max_ps(h, _mm256_set1_ps(-30.0f))),
                                                          _mm256_set1_ps(0.39894228040143268f)));
  return _mm256_fmadd_ps(v, pdf, _mm256_mul_ps(_mm256_set1_ps(0.5f), one_plus));
}

TESSERA_AVX2 void gelu_backward_avx2(const float* x, const float* dy, float* dx, int64_t n, bool accumulate) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 dyv = _mm256_loadu_ps(dy + i), gv = gelu_grad_v(_mm256_loadu_ps(x + i));
    _mm256_storeu_ps(dx + i, accumulate ? _mm256_fmadd_ps(dyv, gv, _mm256_loadu_ps(dx + i)) : _mm256_mul_ps(dyv, gv));
  }
  if (i < n) {
    const __m256i m = lanes8(n - i);
    const __m256 dyv = _mm256_maskload_ps(dy + i, m), gv = gelu_grad_v(_mm256_maskload_ps(x + i, m));
    const __m256 d = accumulate ? _mm256_fmadd_ps(dyv, gv, _mm256_maskload_ps(dx + i, m)) : _mm256_mul_ps(dyv, gv);
    _mm256_maskstore_ps(dx + i, m, d);
  }
}

TESSERA_AVX2 float fma_loop_avx2(int64_t n) {
  // a = a * b + c converges to c / (1 - b) = 0.1: no overflow, no denormals.
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  __m256 a[12];
#pragma GCC unroll 12
  for (int j = 0; j < 12; ++j) a[j] = _mm256_set1_ps(static_cast<float>(j));
  for (int64_t i = 0; i < n; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) a[j] = _mm256_fmadd_ps(a[j], b, c);
  }
  __m256 sum = _mm256_setzero_ps();
#pragma GCC unroll 12
  for (int j = 0; j < 12; ++j) sum = _mm256_add_ps(sum, a[j]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float s = 0;
  for (float v : lanes) s += v;
  return s;
}

}  // namespace tessera::gemm_detail
