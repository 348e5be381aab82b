#pragma once
// Shared between gemm.cpp (packing, dispatch, threading, portable kernel) and gemm_avx512.cpp.
#include <cstdint>
#include <cmath>
#include <cstring>

#include "tessera/gemm.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace tessera::gemm_detail {

// Packed fp32 weights: ceil(N / kNR) column panels; panel j holds W[j*kNR + c, k] at
// [j][k][c] (K-major, kNR floats per k, zero-padded past N), so the micro-kernel reads one
// contiguous 128-byte row of the panel per k. Panels start 64-byte aligned.
constexpr int64_t kNR = 32;
// Rows per AVX-512 micro-tile: 14 x 32 = 28 zmm accumulators + 2 for the W row + 1 broadcast.
constexpr int64_t kMR = 14;

// Coefficients fitted with mpmath.chebyfit (near-minimax), shared by the AVX-512 and portable
// epilogues so both paths compute the same function.
// erf(z) = z + z P(z^2) for |z| <= 0.921875 (abs error of the fit 1.6e-8 relative).
inline constexpr float kErfSmall[] = {-6.0040811559210596e-4f, 4.9960201222474733e-3f,
                               -2.6768756699813974e-2f, 1.1281882319397829e-1f,
                               -3.7612500896193643e-1f, 1.2837915083041535e-1f};
// log(erfc(t)) for 0.921875 <= t <= 4 (abs error of the fit 1.3e-8); erfc(t > 4) < 1.6e-8.
inline constexpr float kLogErfc[] = {-5.2118401230289077e-8f, 2.7693390928981964e-6f,
                              -5.6694016112174003e-5f, 6.5338191070383903e-4f,
                              -4.9469219598384478e-3f, 2.6820471093298858e-2f,
                              -1.1062677159739033e-1f, -6.3136371624523515e-1f,
                              -1.1304521390424502f,    3.6415000589354947e-4f};
// exp(r) for |r| <= ln2/2 (relative error of the fit 2e-9).
inline constexpr float kExp[] = {1.3941108433972675e-3f, 8.3751263981533357e-3f,
                          4.1666352896775157e-2f, 1.6666415514653275e-1f,
                          5.0000000471177577e-1f, 1.0000000377162138f,
                          1.0f};
inline constexpr float kErfSplit = 0.921875f;
inline constexpr float kErfcZero = 4.0f;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// bf16 weights use the same panels with k taken in pairs: per pair i a row of 32 uint32, word
// c = bf16(W[c, 2i]) | bf16(W[c, 2i+1]) << 16 (K padded to even with zeros), the operand
// layout of vdpbf16ps. x is rounded to bf16 the same way when its rows are packed.
inline uint32_t bf16_bits(float f) {  // round to nearest even; NaN stays (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
inline uint32_t bf16_pair(const float* x, int64_t k, int64_t K) {  // x[k], x[k+1] (0 past K)
  return bf16_bits(x[k]) | (k + 1 < K ? bf16_bits(x[k + 1]) << 16 : 0u);
}

// int8 weights: per output channel n, scale_w[n] = max_k |W[n,k]| / 127 and
// Wq[n,k] = round(W[n,k] * 127 / max_k |W[n,k]|) in [-127, 127]. Same panels with k taken in
// fours: per quad i a row of 32 uint32, word c = Wq[c,4i] | Wq[c,4i+1] << 8 | ... (bytes, K
// padded to a multiple of 4 with zeros): the signed operand of vpdpbusd. After the panels:
// scale_w (kNR * panels floats) and the column sums sum_k Wq[n,k] (kNR * panels int32).
//
// x is quantized per row when its rows are packed (dynamic, asymmetric, unsigned):
//   lo = min(0, min_k x), hi = max(0, max_k x), s = (hi - lo) / 255, zp = round(-lo / s),
//   u[k] = clamp(round(x[k] / s) + zp, 0, 255)      (x / s as x * (255 / (hi - lo)))
// so y[m,n] = s[m] * scale_w[n] * (sum_k u[m,k] Wq[n,k] - zp[m] * colsum[n]) + b[n]: integer
// dot products, one float rescale per output.
//
// The AVX2 family (no u8 x s8 dot product with int32 accumulation) uses L = 254 levels:
// u in [0, 254], s = (hi - lo) / 254, zp = round(-lo / s) in [0, 254], and it multiplies the
// signed xs = u - 127 in [-127, 127]. Its dot product is vpmaddubsw, which adds two u8 x s8
// products into an int16 that saturates at +-32767: with u up to 255, 2 * 255 * 127 = 64770
// would. So the kernel takes |w| as the unsigned operand and sign(w) xs (vpsignb) as the
// signed one: |products| <= 127 * 127, pair sums <= 32258, exact; vpmaddwd with ones widens
// them to int32 (exact). Then sum_k u w = sum_k xs w + 127 colsum, so
//   y[m,n] = s[m] * scale_w[n] * (sum_k xs[m,k] Wq[n,k] + (127 - zp[m]) * colsum[n]) + b[n].
// One code of the 256 is given up (x keeps ~8 bits); the weights and the packed layout are the
// same for every family.
struct RowQuant {
  float scale;   // s (0 for an all-zero row)
  float inv;     // 1 / s (0 for an all-zero row)
  int32_t zero;  // zp
  int32_t top = 255;  // L
};
inline RowQuant row_quant(float lo, float hi, int32_t levels = 255) {  // lo <= 0 <= hi
  RowQuant q{0.0f, 0.0f, 0, levels};
  const float range = hi - lo;
  if (!(range > 0.0f)) return q;
  const float l = static_cast<float>(levels);
  q.scale = range / l;
  q.inv = l / range;
  q.zero = static_cast<int32_t>(std::nearbyint(-lo * q.inv));
  q.zero = q.zero < 0 ? 0 : q.zero > levels ? levels : q.zero;
  return q;
}
inline uint32_t quantize_u8(float x, const RowQuant& q) {
  int32_t u = static_cast<int32_t>(std::nearbyint(x * q.inv)) + q.zero;
  return static_cast<uint32_t>(u < 0 ? 0 : u > q.top ? q.top : u);
}
inline int64_t int8_quads(int64_t K) { return ceil_div(K, 4); }
// uint32 words of packed x per micro-panel: the quads, then kMR row scales (float bits) and
// kMR zero points.
inline int64_t int8_apack_words(int64_t K, int64_t mr) { return int8_quads(K) * mr + 2 * mr; }

struct LinearArgs {
  const float* x;  // row x_first of x (0, or a task's first row when its rows were normalised)
  int64_t M, ldx, K, N;
  const float* wpack;  // panels as above (fp32), or
  const uint32_t* wpack_bf16;  // bf16 pair panels (then wpack is null), or
  const uint32_t* wpack_i8;    // int8 quad panels, followed by
  const float* wscale;         //   their per-column scales and
  const int32_t* wsum;         //   column sums
  const float* bias;   // kNR * panels floats (zero-padded), or null
  float* y;
  int64_t ldy;
  const float* residual;  // rows ldy apart, may alias y, or null
  Activation act;
  int64_t x_first = 0;
  // x column-major (x[r, k] at x[k * ldx + r]): only for the fp32 and bf16 AVX-512 and AVX2
  // tasks, which then pack with pack_cols(_bf16); row(r) is then where row r's first element is.
  bool x_cols = false;
  const float* row(int64_t r) const { return x_cols ? x + (r - x_first) : x + (r - x_first) * ldx; }  // x row r
};

// M rows (from row first_row on: a task's row block) are cut into P = ceil(M / mr_max)
// micro-panels of as equal size as possible (14 x 13 rows beat 14 x 14 + 1); micro-panel p covers
// rows [row_begin(p), row_begin(p+1)).
struct RowSplit {
  int64_t panels, base, extra, first;
  RowSplit(int64_t M, int64_t mr_max, int64_t first_row = 0)
      : panels(ceil_div(M, mr_max)), base(M / panels), extra(M % panels), first(first_row) {}
  int64_t row_begin(int64_t p) const { return first + p * base + (p < extra ? p : extra); }
};

// Computes y for the rows of `rows` (a task's row block, all its micro-panels) x column panels
// [j0, j1). apack: scratch of at least rows.panels * K * kMR floats, 64-byte aligned. Every
// output element gets the same fixed k-order sum whatever the task split, so results do not
// depend on the thread count.
void linear_task_avx512(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                        float* apack);

// The same with bf16 weights and x (fp32 accumulation); apack: rows.panels * ceil(K/2) * kMR.
void linear_task_avx512_bf16(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                             uint32_t* apack);

// The same with int8 weights and dynamically quantized u8 x (vpdpbusd, int32 accumulation);
// apack: rows.panels * int8_apack_words(K, kMR) words.
void linear_task_avx512_int8(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                             uint32_t* apack);

// y[i] = gelu(x[i]) / erf(x[i]) with the AVX-512 epilogue math (n any).
void gelu_avx512(const float* x, float* y, int64_t n);
void erf_avx512(const float* x, float* y, int64_t n);
// dx[i] += dy[i] · gelu'(x[i]) (the exact-erf GELU's derivative; see linear_gelu_backward).
void gelu_backward_avx512(const float* x, const float* dy, float* dx, int64_t n, bool accumulate);
// n steps of 24 independent zmm FMAs (384 multiply-adds per step; see fma_peak_gflops);
// returns a sum of the accumulators so the work cannot be dropped.
float fma_loop_avx512(int64_t n);

// ---- AVX2 + FMA family (gemm_avx2.cpp): the same panels, each read as two 16-column halves
// by a 6 x 16 micro-tile (12 ymm accumulators + 2 for the W row + 1 broadcast). x micro-panels
// hold kMrAvx2 rows: apack[k * kMrAvx2 + r] (fp32; for bf16, x rounded to bf16 and stored as
// fp32, K padded to even), or int8 quads as above with kMrAvx2 rows.
constexpr int64_t kMrAvx2 = 6;
void linear_task_avx2(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                      float* apack);  // apack: rows.panels * K * kMrAvx2 floats
// bf16 pair panels widened to fp32 in registers (mask / shift) inside the 6 x 16 tile, FMAs in
// vdpbf16ps's order;
// apack: rows.panels * 2 * ceil(K/2) * kMrAvx2 floats.
void linear_task_avx2_bf16(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                           float* apack);
// int8 quad panels: vpsignb + vpmaddubsw + vpmaddwd with x at 254 levels (see RowQuant);
// apack: rows.panels * int8_apack_words(K, kMrAvx2) words. `vnni` (the CPU has AVX-VNNI and
// it is not switched off): vpdpbusd on ymm instead, the same integer sums (so the same bits).
void linear_task_avx2_int8(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1,
                           uint32_t* apack, bool vnni);
void gelu_avx2(const float* x, float* y, int64_t n);
void erf_avx2(const float* x, float* y, int64_t n);
void gelu_backward_avx2(const float* x, const float* dy, float* dx, int64_t n, bool accumulate);
// n steps of 12 independent ymm FMA chains (96 multiply-adds per step): 2 FMA units x 4-5
// cycles of latency need 8-10 chains in flight.
float fma_loop_avx2(int64_t n);

#if defined(__x86_64__)
// Lanes [0, n) of 16, n clamped to [0, 16]: plain mask arithmetic, so kernels of every AVX-512
// target (GEMM packing and epilogues, attention) inline it.
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// In-register 16 x 16 transpose of 32-bit words: afterwards v[i] lane r = old v[r] lane i.
// AVX-512F only, so the kernels of every AVX-512 target (GEMM packing, attention) can inline it.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 (&v)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    v[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    v[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    v[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    v[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const int lo = (i / 4) * 8 + i % 4;
    t[lo] = _mm512_shuffle_f32x4(v[lo], v[lo + 4], 0x88);
    t[lo + 4] = _mm512_shuffle_f32x4(v[lo], v[lo + 4], 0xdd);
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    v[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}
#endif

}  // namespace tessera::gemm_detail
