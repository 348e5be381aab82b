// Element-wise, normalisation, attention and resampling kernels.
#include "tessera/kernels.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tessera/gemm.hpp"
#include "tessera/parallel.hpp"
#include "gemm_internal.hpp"

namespace tessera {

// ---------------------------------------------------------------------------------------------
// Branch-free float exp and erf, written so that loops over them vectorise.
// ---------------------------------------------------------------------------------------------
namespace {

// exp(x) to ~1 ulp (Cephes expf): x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial.
inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.3f ? 0.0f : p * two_n;
}

// For a = |z| >= 1: erfc(a) = exp(-a^2) R(1/a), R a least-squares fit on [1, 4]. Relative error
// of R ~5e-7 after float rounding, so erf is within ~1e-7; beyond 4 (where erf rounds to +-1)
// R is extrapolated, still accurate enough for erfc's tiny values, and exp underflows past ~9.3.
inline float erfc_tail(float a) {
  const float u = 1.0f / std::max(a, 1.0f);
  float r = -0.03335384966166295f;
  r = r * u + 0.23448679365105404f;
  r = r * u - 0.7280707317004094f;
  r = r * u + 1.2931220608670386f;
  r = r * u - 1.3909518213050813f;
  r = r * u + 0.8088958730599046f;
  r = r * u - 0.027526869939863644f;
  r = r * u - 0.29803097740264806f;
  r = r * u + 0.005539640262388094f;
  r = r * u + 0.5634333265057326f;
  r = r * u + 4.013130260446063e-05f;
  return exp_approx(-a * a) * r;
}

// For |z| < 1: erf(z) = z P(z^2), P a degree-6 fit (relative error 1.4e-9 before rounding).
inline float erf_small(float z) {
  const float t = z * z;
  float p = 7.882497194276672e-05f;
  p = p * t - 0.0008018855018228852f;
  p = p * t + 0.0051893119454910295f;
  p = p * t - 0.026854328797436322f;
  p = p * t + 0.11283597463515913f;
  p = p * t - 0.3761262690358185f;
  p = p * t + 1.128379165881502f;
  return z * p;
}

inline float erf_approx(float z) {
  const float a = std::min(std::fabs(z), 10.0f);
  const float big = std::copysign(1.0f - erfc_tail(a), z);
  return a < 1.0f ? erf_small(z) : big;
}

// 1 + erf(z), as erfc(-z) for z <= -1 so that GELU's negative tail keeps its relative accuracy.
inline float one_plus_erf(float z) {
  const float a = std::min(std::fabs(z), 10.0f);
  const float tail = erfc_tail(a);
  const float big = z < 0 ? tail : 2.0f - tail;
  return a < 1.0f ? 1.0f + erf_small(z) : big;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Layer norm, GELU, softmax
// ---------------------------------------------------------------------------------------------
namespace {


// y = (x - mean) * rsqrt(var + eps) * gamma + beta for one row. Two passes with double sums, so
// a row with a large mean and a small spread keeps its variance (conformance uses eps down to
// 1e-12).
void layer_norm_row_portable(const float* xr, int64_t dim, const float* gamma, const float* beta,
                             float eps, float* yr) {
  double sum = 0;
  for (int64_t i = 0; i < dim; ++i) sum += xr[i];
  const double mean = sum / static_cast<double>(dim);
  double sq = 0;
  for (int64_t i = 0; i < dim; ++i) {
    const double d = xr[i] - mean;
    sq += d * d;
  }
  const double var = sq / static_cast<double>(dim);
  const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
  // x - mean in double: rounding the mean to float first would cost ~1e-4 when |mean| >> std.
  for (int64_t i = 0; i < dim; ++i)
    yr[i] = static_cast<float>((xr[i] - mean) * rstd) * gamma[i] + beta[i];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TESSERA_HAVE_AVX512_LAYER_NORM 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12, inside _mm512_reduce_add_pd
// The same row, 16 floats at a time, sums in 8-lane doubles (only the summation order differs).
__attribute__((target("avx512f,avx512dq"))) void layer_norm_row_avx512(
    const float* xr, int64_t dim, const float* gamma, const float* beta, float eps, float* yr) {
  const int64_t full = dim / 16 * 16;
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 v = _mm512_loadu_ps(xr + i);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  }
  double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  for (int64_t i = full; i < dim; ++i) sum += xr[i];
  const double mean = sum / static_cast<double>(dim);
  const __m512d mv = _mm512_set1_pd(mean);
  s0 = s1 = _mm512_setzero_pd();
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 v = _mm512_loadu_ps(xr + i);
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), mv);
    const __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), mv);
    s0 = _mm512_fmadd_pd(d0, d0, s0);
    s1 = _mm512_fmadd_pd(d1, d1, s1);
  }
  double sq = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  for (int64_t i = full; i < dim; ++i) {
    const double d = xr[i] - mean;
    sq += d * d;
  }
  const double var = sq / static_cast<double>(dim);
  const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
  const __m512d rv = _mm512_set1_pd(rstd);
  for (int64_t i = 0; i < full; i += 16) {
    const __m512 v = _mm512_loadu_ps(xr + i);
    const __m256 n0 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), mv), rv));
    const __m256 n1 = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), mv), rv));
    const __m512 n = _mm512_insertf32x8(_mm512_castps256_ps512(n0), n1, 1);
    _mm512_storeu_ps(yr + i, _mm512_add_ps(_mm512_mul_ps(n, _mm512_loadu_ps(gamma + i)), _mm512_loadu_ps(beta + i)));
  }
  for (int64_t i = full; i < dim; ++i)
    yr[i] = static_cast<float>((xr[i] - mean) * rstd) * gamma[i] + beta[i];
}

// The same row on AVX2: 8 floats at a time, sums in 4-lane doubles.
__attribute__((target("avx2,fma"))) void layer_norm_row_avx2(
    const float* xr, int64_t dim, const float* gamma, const float* beta, float eps, float* yr) {
  const int64_t full = dim / 8 * 8;
  auto hsum = [](__m256d v) __attribute__((target("avx2,fma"))) {
    alignas(32) double l[4];
    _mm256_store_pd(l, v);
    return (l[0] + l[1]) + (l[2] + l[3]);
  };
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (int64_t i = 0; i < full; i += 8) {
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm_loadu_ps(xr + i)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm_loadu_ps(xr + i + 4)));
  }
  double sum = hsum(_mm256_add_pd(s0, s1));
  for (int64_t i = full; i < dim; ++i) sum += xr[i];
  const double mean = sum / static_cast<double>(dim);
  const __m256d mv = _mm256_set1_pd(mean);
  s0 = s1 = _mm256_setzero_pd();
  for (int64_t i = 0; i < full; i += 8) {
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xr + i)), mv);
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xr + i + 4)), mv);
    s0 = _mm256_fmadd_pd(d0, d0, s0);
    s1 = _mm256_fmadd_pd(d1, d1, s1);
  }
  double sq = hsum(_mm256_add_pd(s0, s1));
  for (int64_t i = full; i < dim; ++i) {
    const double d = xr[i] - mean;
    sq += d * d;
  }
  const double var = sq / static_cast<double>(dim);
  const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
  const __m256d rv = _mm256_set1_pd(rstd);
  for (int64_t i = 0; i < full; i += 8) {
    const __m128 n0 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xr + i)), mv), rv));
    const __m128 n1 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(xr + i + 4)), mv), rv));
    const __m256 n = _mm256_insertf128_ps(_mm256_castps128_ps256(n0), n1, 1);
    _mm256_storeu_ps(yr + i, _mm256_add_ps(_mm256_mul_ps(n, _mm256_loadu_ps(gamma + i)), _mm256_loadu_ps(beta + i)));
  }
  for (int64_t i = full; i < dim; ++i)
    yr[i] = static_cast<float>((xr[i] - mean) * rstd) * gamma[i] + beta[i];
}
#pragma GCC diagnostic pop
#endif

}  // namespace

namespace {
using LayerNormRow = void (*)(const float*, int64_t, const float*, const float*, float, float*);
LayerNormRow layer_norm_row_kernel() {
#ifdef TESSERA_HAVE_AVX512_LAYER_NORM
  const IsaFamily family = isa_family();
  if (family == IsaFamily::Avx512) return layer_norm_row_avx512;
  if (family == IsaFamily::Avx2) return layer_norm_row_avx2;
#endif
  return layer_norm_row_portable;
}
}  // namespace

void layer_norm_row(const float* x, int64_t dim, const float* gamma, const float* beta, float eps,
                    float* y) {
  if (dim > 0) layer_norm_row_kernel()(x, dim, gamma, beta, eps, y);
}

// y[r] = layer norm of x[r], row by row (see layer_norm_row_portable for the precision choices).
void layer_norm(const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* gamma,
                const float* beta, float eps, float* y, int64_t ldy) {
  if (rows <= 0 || dim <= 0) return;
  const LayerNormRow row = layer_norm_row_kernel();
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(x + r * ldx, dim, gamma, beta, eps, y + r * ldy);
  });
}

// x = 0.5 x (1 + erf(x / sqrt 2)); 1 + erf is formed without cancellation for negative x.
void gelu_erf(float* x, int64_t n) {
  if (n <= 0) return;
  parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      x[i] = 0.5f * v * one_plus_erf(v * 0.70710678118654752f);
    }
  });
}

// x[r] = exp(x[r] - max) / sum exp(x[r] - max), in place.
void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / cols);
  parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = x + r * ld;
      float mx = xr[0];
      for (int64_t i = 1; i < cols; ++i) mx = std::max(mx, xr[i]);
      double sum = 0;  // double: thousands of terms summed in float would lose ~1e-5
      for (int64_t i = 0; i < cols; ++i) {
        const float e = exp_approx(xr[i] - mx);
        xr[i] = e;
        sum += e;
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t i = 0; i < cols; ++i) xr[i] *= inv;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Resampling: PyTorch's upsample_bicubic2d / upsample_bilinear2d / _upsample_bicubic2d_aa
// (CPU, float32). The coordinate arithmetic mirrors ATen's UpSample.h step by step, including
// which operations happen in float and which in double, so results agree to rounding.
// ---------------------------------------------------------------------------------------------
namespace {

// ATen area_pixel_compute_scale<float>: source step per destination pixel.
// align_corners with a single output pixel maps it to source 0; otherwise an output of one
// pixel still uses in/out (it samples the middle), as current ATen does.
float pixel_scale(int64_t in_size, int64_t out_size, bool align_corners, double scale) {
  if (align_corners)
    return out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.0f;
  if (scale > 0) return static_cast<float>(1.0 / scale);
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

// ATen area_pixel_compute_source_index<float>.
float source_index(float scale, int64_t dst, bool align_corners, bool cubic) {
  if (align_corners) return scale * static_cast<float>(dst);
  const float src = static_cast<float>(static_cast<double>(scale) * (static_cast<double>(dst) + 0.5) - 0.5);
  return (!cubic && src < 0) ? 0.0f : src;
}

float cubic1(float x, float a) { return ((a + 2) * x - (a + 3)) * x * x + 1; }         // |x| <= 1
float cubic2(float x, float a) { return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a; }  // 1 < |x| < 2

// Taps of one output coordinate along one axis: `taps` clamped source indices and weights.
struct Taps {
  std::vector<int64_t> index;  // [out, taps]
  std::vector<float> weight;   // [out, taps]
  int taps = 0;
};

// ATen guard_index_and_lambda: floor index kept inside the input, fraction in [0, 1].
void floor_and_fraction(float real, int64_t in_size, int64_t& index, float& frac) {
  index = std::min(static_cast<int64_t>(std::floor(real)), in_size - 1);
  frac = std::min(std::max(real - static_cast<float>(index), 0.0f), 1.0f);
}

Taps cubic_taps(int64_t in_size, int64_t out_size, bool align_corners, double scale_arg) {
  Taps t;
  t.taps = 4;
  t.index.resize(out_size * 4);
  t.weight.resize(out_size * 4);
  const float scale = pixel_scale(in_size, out_size, align_corners, scale_arg);
  const float A = -0.75f;
  for (int64_t o = 0; o < out_size; ++o) {
    const float real = source_index(scale, o, align_corners, /*cubic=*/true);
    int64_t i0;
    float f;
    floor_and_fraction(real, in_size, i0, f);
    const float w[4] = {cubic2(f + 1.0f, A), cubic1(f, A), cubic1(1.0f - f, A),
                        cubic2((1.0f - f) + 1.0f, A)};
    for (int j = 0; j < 4; ++j) {
      t.index[o * 4 + j] = std::clamp<int64_t>(i0 - 1 + j, 0, in_size - 1);
      t.weight[o * 4 + j] = w[j];
    }
  }
  return t;
}

Taps linear_taps(int64_t in_size, int64_t out_size, bool align_corners, double scale_arg) {
  Taps t;
  t.taps = 2;
  t.index.resize(out_size * 2);
  t.weight.resize(out_size * 2);
  // PyTorch's bilinear kernel maps an axis whose size does not change one to one even when a
  // scale_factor (say 1.025 on 4 pixels) would say otherwise; bicubic applies the scale.
  const bool same_size = in_size == out_size;
  const float scale = same_size ? 1.0f : pixel_scale(in_size, out_size, align_corners, scale_arg);
  for (int64_t o = 0; o < out_size; ++o) {
    const float real = source_index(scale, o, align_corners, /*cubic=*/false);
    int64_t i0;
    float f;
    floor_and_fraction(real, in_size, i0, f);
    t.index[o * 2 + 0] = i0;
    t.index[o * 2 + 1] = i0 + (i0 < in_size - 1 ? 1 : 0);
    t.weight[o * 2 + 0] = 1.0f - f;
    t.weight[o * 2 + 1] = f;
  }
  return t;
}

// out[c, y, x] = sum_i wy[i] * (sum_j wx[j] * in[c, iy[i], ix[j]]), summed in ATen's order.
void resample_2d(const float* in, int64_t channels, int64_t in_h, int64_t in_w, float* out,
                 int64_t out_h, int64_t out_w, const Taps& ty, const Taps& tx) {
  const int64_t plane = out_h * out_w;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, plane));
  parallel_for(0, channels, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* src = in + c * in_h * in_w;
      float* dst = out + c * plane;
      for (int64_t y = 0; y < out_h; ++y) {
        const int64_t* iy = &ty.index[y * ty.taps];
        const float* wy = &ty.weight[y * ty.taps];
        for (int64_t x = 0; x < out_w; ++x) {
          const int64_t* ix = &tx.index[x * tx.taps];
          const float* wx = &tx.weight[x * tx.taps];
          float acc = 0;
          for (int i = 0; i < ty.taps; ++i) {
            const float* row = src + iy[i] * in_w;
            float t = row[ix[0]] * wx[0];
            for (int j = 1; j < tx.taps; ++j) t += row[ix[j]] * wx[j];
            acc = (i == 0) ? t * wy[0] : acc + t * wy[i];
          }
          dst[y * out_w + x] = acc;
        }
      }
    }
  });
}

// Keys' cubic with a = -0.5, the antialiasing filter of ATen's HelperInterpCubic::aa_filter.
float aa_cubic_filter(float x) {
  x = std::fabs(x);
  if (x < 1.0f) return cubic1(x, -0.5f);
  if (x < 2.0f) return cubic2(x, -0.5f);
  return 0.0f;
}

// ATen _compute_weights_aa: a variable-width window per output pixel, weights normalised.
struct AaTaps {
  std::vector<int64_t> start, size;
  std::vector<float> weight;  // [out, max_taps]
  int64_t max_taps = 0;
};

AaTaps aa_taps(int64_t in_size, int64_t out_size) {
  AaTaps t;
  const float scale = pixel_scale(in_size, out_size, /*align_corners=*/false, 0.0);
  const float support = static_cast<float>(scale >= 1.0f ? 2.0 * scale : 2.0);
  const float invscale = static_cast<float>(scale >= 1.0f ? 1.0 / scale : 1.0);
  t.max_taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  t.start.resize(out_size);
  t.size.resize(out_size);
  t.weight.assign(out_size * t.max_taps, 0.0f);
  for (int64_t o = 0; o < out_size; ++o) {
    const float center = static_cast<float>(scale * (o + 0.5));
    const int64_t xmin = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
    const int64_t xsize =
        std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in_size) - xmin;
    float* w = &t.weight[o * t.max_taps];
    float total = 0;
    for (int64_t j = 0; j < xsize; ++j) {
      w[j] = aa_cubic_filter(
          static_cast<float>((static_cast<float>(j + xmin) - center + 0.5) * invscale));
      total += w[j];
    }
    if (total != 0.0f)
      for (int64_t j = 0; j < xsize; ++j) w[j] /= total;
    t.start[o] = xmin;
    t.size[o] = xsize;
  }
  return t;
}

// out[o] = sum_j w[o, j] * in[(start[o] + j) * stride], for `count` interleaved lines.
inline float aa_dot(const float* src, int64_t stride, const float* w, int64_t n) {
  float acc = src[0] * w[0];
  for (int64_t j = 1; j < n; ++j) acc += src[j * stride] * w[j];
  return acc;
}

}  // namespace

void interpolate_bicubic(const float* in, int64_t channels, int64_t in_h, int64_t in_w, float* out,
                         int64_t out_h, int64_t out_w, bool align_corners, double scale_h,
                         double scale_w) {
  const Taps ty = cubic_taps(in_h, out_h, align_corners, scale_h);
  const Taps tx = cubic_taps(in_w, out_w, align_corners, scale_w);
  resample_2d(in, channels, in_h, in_w, out, out_h, out_w, ty, tx);
}

void interpolate_bilinear(const float* in, int64_t channels, int64_t in_h, int64_t in_w,
                          float* out, int64_t out_h, int64_t out_w, bool align_corners,
                          double scale_h, double scale_w) {
  const Taps ty = linear_taps(in_h, out_h, align_corners, scale_h);
  const Taps tx = linear_taps(in_w, out_w, align_corners, scale_w);
  resample_2d(in, channels, in_h, in_w, out, out_h, out_w, ty, tx);
}

// Separable like ATen: along W into a [C, in_h, out_w] float buffer, then along H.
void interpolate_bicubic_antialias(const float* in, int64_t channels, int64_t in_h, int64_t in_w,
                                   float* out, int64_t out_h, int64_t out_w) {
  const AaTaps tx = aa_taps(in_w, out_w);
  const AaTaps ty = aa_taps(in_h, out_h);
  std::vector<float> mid(static_cast<size_t>(channels * in_h * out_w));
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, in_h * out_w + out_h * out_w));
  parallel_for(0, channels, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* src = in + c * in_h * in_w;
      float* m = mid.data() + c * in_h * out_w;
      for (int64_t y = 0; y < in_h; ++y)
        for (int64_t x = 0; x < out_w; ++x)
          m[y * out_w + x] = aa_dot(src + y * in_w + tx.start[x], 1, &tx.weight[x * tx.max_taps],
                                    tx.size[x]);
      float* dst = out + c * out_h * out_w;
      for (int64_t y = 0; y < out_h; ++y)
        for (int64_t x = 0; x < out_w; ++x)
          dst[y * out_w + x] = aa_dot(m + ty.start[y] * out_w + x, out_w,
                                      &ty.weight[y * ty.max_taps], ty.size[y]);
    }
  });
}

namespace {

// attention_grad_rows for one row of n, portable: p = exp(scale·p − lse), ds = p·(ds − d)·scale
// (the vector rows below compute the same, their tails through this).
void attention_grad_row(float* p, float* ds, int64_t n, float lse, float d, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_approx(std::fma(p[j], scale, -lse));
    ds[j] = p[j] * (ds[j] - d) * scale;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fused multi-head attention: flash-attention style tiling with an online softmax, so memory per
// thread is O(block^2 + head_dim * kv_len) whatever the sequence length. A task is one (batch,
// head) and a chunk of its queries; it transposes the head's keys once, then walks the chunk in
// blocks of at most kQueryBlock rows and the keys in fixed blocks of kKeyBlock. Every query row
// is computed the same way whatever the chunking, so results do not depend on the thread count.
// ---------------------------------------------------------------------------------------------
namespace {

constexpr int64_t kQueryBlock = 64;  // query rows per online-softmax pass
constexpr int64_t kKeyBlock = 512;   // keys per online-softmax step (a ViT's 197 take one)

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Rows per query block for nq queries: as few blocks as kQueryBlock allows, each a multiple of
// the kernels' 6-row tile where that still fits, so only the last block ends in a short tile
// (197 queries: 54 + 54 + 54 + 35, not 49 + 49 + 49 + 50 with four 1-2 row tails).
inline int64_t query_block_rows(int64_t nq) {
  const int64_t blocks = (nq + kQueryBlock - 1) / kQueryBlock;
  const int64_t even = (nq + blocks - 1) / blocks, tiled = (even + 5) / 6 * 6;
  return tiled <= kQueryBlock ? tiled : even;
}

constexpr int64_t kPairBlock = kKeyBlock / 2;  // bf16 pairs of weights per row of p

// Per-thread scratch, grown when a larger head or sequence first shows up and otherwise reused.
// Tasks never wait, so a thread never uses it for two tasks at once.
struct AttentionScratch {
  std::vector<float> kt;  // [head_dim, ld]: the head's keys transposed, zero past kv_len
  std::vector<float> s;   // [kQueryBlock, kKeyBlock]: scores, then (fp32) probabilities
  std::vector<float> o;   // [kQueryBlock, head_dim rounded to 16]: unnormalised output rows
  std::vector<float> m;   // [kQueryBlock]: running max of the scaled scores
  std::vector<float> l;   // [kQueryBlock]: running sum of exp(score - m)
  // BF16 precision: words of two bf16 (the low half first), the operand layout of vdpbf16ps.
  std::vector<uint32_t> kt2;  // [ceil(hd/2), ld]: (k[j, 2e], k[j, 2e+1]) at [e, j]; 0 past kv_len
  std::vector<uint32_t> v2;   // [ceil(kv_len/2), hdp]: (v[2i, d], v[2i+1, d]) at [i, d]; 0 padded
  std::vector<uint32_t> qb;   // [kQueryBlock, ceil(hd/2)]: the block's queries in pairs
  std::vector<uint32_t> p;    // [kQueryBlock, kPairBlock]: the softmax weights in pairs
  void reserve(int64_t hd_padded, int64_t ld, bool bf16) {
    const int64_t hd2 = hd_padded / 2;
    if (!bf16 && static_cast<int64_t>(kt.size()) < hd_padded * ld) kt.resize(hd_padded * ld);
    if (bf16 && static_cast<int64_t>(kt2.size()) < hd2 * ld) kt2.resize(hd2 * ld);
    if (bf16 && static_cast<int64_t>(v2.size()) < ld / 2 * hd_padded) v2.resize(ld / 2 * hd_padded);
    if (bf16 && static_cast<int64_t>(qb.size()) < kQueryBlock * hd2) qb.resize(kQueryBlock * hd2);
    if (static_cast<int64_t>(o.size()) < kQueryBlock * hd_padded) o.resize(kQueryBlock * hd_padded);
    s.resize(kQueryBlock * kKeyBlock);
    if (bf16) p.resize(kQueryBlock * kPairBlock);
    m.resize(kQueryBlock);
    l.resize(kQueryBlock);
  }
};

AttentionScratch& attention_scratch(int64_t hd_padded, int64_t ld, bool bf16) {
  thread_local AttentionScratch scratch;
  scratch.reserve(hd_padded, ld, bf16);
  return scratch;
}

// Starts a query block: zero output rows, running max -inf, running sum 0.
void start_block(AttentionScratch& w, int64_t rows, int64_t hdp) {
  std::fill(w.o.begin(), w.o.begin() + rows * hdp, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);
}

// out row r = o row r / l[r]; lse[r] = m[r] + log l[r] where lse is given (the training pass's
// saved log-sum-exp of the scaled scores).
void finish_block(const AttentionScratch& w, int64_t rows, int64_t hd, int64_t hdp, float* out,
                  int64_t out_rs, float* lse) {
  if (lse)
    for (int64_t r = 0; r < rows; ++r) lse[r] = w.m[r] + std::log(w.l[r]);
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / w.l[r];
    float* dst = out + r * out_rs;
    for (int64_t d = 0; d < hd; ++d) dst[d] = w.o[r * hdp + d] * inv;
  }
}

// kt[d * ld + j] = k[j * k_rs + d] for j < kv_len, 0 for kv_len <= j < ld; 16 x 16 tiles keep
// both sides' cache lines in use.
void transpose_keys(const float* k, int64_t k_rs, int64_t kv_len, int64_t hd, float* kt,
                    int64_t ld) {
  for (int64_t j0 = 0; j0 < kv_len; j0 += 16) {
    const int64_t j1 = std::min(j0 + 16, kv_len);
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      const int64_t d1 = std::min(d0 + 16, hd);
      for (int64_t d = d0; d < d1; ++d)
        for (int64_t j = j0; j < j1; ++j) kt[d * ld + j] = k[j * k_rs + d];
    }
  }
  for (int64_t d = 0; d < hd; ++d) std::fill(kt + d * ld + kv_len, kt + (d + 1) * ld, 0.0f);
}

// The portable block operations; attention_chunk drives them (and their AVX-512 twins below).
struct PortableOps {
  static void keys(const float* k, int64_t k_rs, int64_t kv_len, int64_t hd, float* kt,
                   int64_t ld) {
    transpose_keys(k, k_rs, kv_len, hd, kt, ld);
  }
  // s[r * kKeyBlock + j] = scale * q[r] . kt[:, j] for r < nq, j < nk.
  static void scores(const float* q, int64_t q_rs, int64_t nq, const float* kt, int64_t ld,
                     int64_t hd, int64_t nk, float scale, float* s) {
    for (int64_t i = 0; i < nq; ++i) {
      const float* qi = q + i * q_rs;
      float* si = s + i * kKeyBlock;
      for (int64_t j = 0; j < nk; ++j) si[j] = 0.0f;
      for (int64_t d = 0; d < hd; ++d) {
        const float qd = qi[d];
        const float* ktd = kt + d * ld;
        for (int64_t j = 0; j < nk; ++j) si[j] += qd * ktd[j];
      }
      for (int64_t j = 0; j < nk; ++j) si[j] *= scale;
    }
  }
  // Online softmax step: s rows become exp(s - m_new); l and the o rows are rescaled.
  static void softmax_step(float* s, int64_t nq, int64_t nk, float* m, float* l, float* o,
                           int64_t hdp) {
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * kKeyBlock;
      float mx = m[i];
      for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, si[j]);
      const float alpha = exp_approx(m[i] - mx);  // 0 on the first block (m = -inf)
      float sum = 0.0f;
      for (int64_t j = 0; j < nk; ++j) {
        si[j] = exp_approx(si[j] - mx);
        sum += si[j];
      }
      m[i] = mx;
      l[i] = l[i] * alpha + sum;
      float* oi = o + i * hdp;
      for (int64_t d = 0; d < hdp; ++d) oi[d] *= alpha;
    }
  }
  // o[r] += sum_j p[r, j] v[j] for r < nq, j < nk.
  static void accumulate(const float* p, int64_t nq, const float* v, int64_t v_rs, int64_t nk,
                         float* o, int64_t hd, int64_t hdp) {
    for (int64_t i = 0; i < nq; ++i) {
      float* oi = o + i * hdp;
      for (int64_t j = 0; j < nk; ++j) {
        const float pj = p[i * kKeyBlock + j];
        const float* vj = v + j * v_rs;
        for (int64_t d = 0; d < hd; ++d) oi[d] += pj * vj[d];
      }
    }
  }
};

// One (batch, head) and query rows [0, nq): out[i] = sum_j softmax_j(scale q_i . k_j) v_j.
// q, k, v, out point at the head's first column of the chunk's (q, out) or the batch's (k, v)
// first row.
template <class Ops>
void attention_chunk(const float* q, int64_t q_rs, const float* k, int64_t k_rs, const float* v,
                     int64_t v_rs, float* out, int64_t out_rs, int64_t nq, int64_t kv_len,
                     int64_t hd, float scale, float* lse) {
  const int64_t hdp = round16(hd), ld = round16(kv_len);
  AttentionScratch& w = attention_scratch(hdp, ld, false);
  float* kt = w.kt.data();
  Ops::keys(k, k_rs, kv_len, hd, kt, ld);
  const int64_t per = query_block_rows(nq);
  for (int64_t i0 = 0; i0 < nq; i0 += per) {
    const int64_t rows = std::min(per, nq - i0);
    start_block(w, rows, hdp);
    for (int64_t k0 = 0; k0 < kv_len; k0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, kv_len - k0);
      Ops::scores(q + i0 * q_rs, q_rs, rows, kt + k0, ld, hd, nk, scale, w.s.data());
      Ops::softmax_step(w.s.data(), rows, nk, w.m.data(), w.l.data(), w.o.data(), hdp);
      Ops::accumulate(w.s.data(), rows, v + k0 * v_rs, v_rs, nk, w.o.data(), hd, hdp);
    }
    finish_block(w, rows, hd, hdp, out + i0 * out_rs, out_rs, lse ? lse + i0 : nullptr);
  }
}

// The same walk at BF16 precision: keys and values are rounded into pairs once per task, each
// query block once, and the softmax weights once per key block.
template <class Ops>
void attention_chunk_bf16(const float* q, int64_t q_rs, const float* k, int64_t k_rs,
                          const float* v, int64_t v_rs, float* out, int64_t out_rs, int64_t nq,
                          int64_t kv_len, int64_t hd, float scale, float* lse) {
  const int64_t hdp = round16(hd), hd2 = (hd + 1) / 2, ld = round16(kv_len);
  AttentionScratch& w = attention_scratch(hdp, ld, true);
  Ops::pack_keys(k, k_rs, kv_len, hd, w.kt2.data(), ld);
  Ops::pack_values(v, v_rs, kv_len, hd, w.v2.data(), hdp);
  const int64_t per = query_block_rows(nq);
  for (int64_t i0 = 0; i0 < nq; i0 += per) {
    const int64_t rows = std::min(per, nq - i0);
    Ops::pack_queries(q + i0 * q_rs, q_rs, rows, hd, w.qb.data());
    start_block(w, rows, hdp);
    for (int64_t k0 = 0; k0 < kv_len; k0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, kv_len - k0);
      Ops::scores(w.qb.data(), hd2, rows, w.kt2.data() + k0, ld, nk, scale, w.s.data());
      Ops::softmax_step(w.s.data(), rows, nk, w.m.data(), w.l.data(), w.o.data(), hdp,
                        w.p.data());
      Ops::accumulate(w.p.data(), rows, w.v2.data() + k0 / 2 * hdp, hdp, nk, w.o.data());
    }
    finish_block(w, rows, hd, hdp, out + i0 * out_rs, out_rs, lse ? lse + i0 : nullptr);
  }
}

// Portable C++ with the rounding of the AVX-512 BF16 path (sums in a different order).
struct PortableBf16Ops {
  static uint32_t word(float lo, float hi) {
    return gemm_detail::bf16_bits(lo) | gemm_detail::bf16_bits(hi) << 16;
  }
  static float low(uint32_t w) { return std::bit_cast<float>(w << 16); }
  static float high(uint32_t w) { return std::bit_cast<float>(w & 0xffff0000u); }
  static void pack_keys(const float* k, int64_t k_rs, int64_t kv_len, int64_t hd, uint32_t* kt2,
                        int64_t ld) {
    for (int64_t e = 0; e < (hd + 1) / 2; ++e)
      for (int64_t j = 0; j < ld; ++j)
        kt2[e * ld + j] = j < kv_len ? gemm_detail::bf16_pair(k + j * k_rs, 2 * e, hd) : 0u;
  }
  static void pack_values(const float* v, int64_t v_rs, int64_t kv_len, int64_t hd, uint32_t* v2,
                          int64_t hdp) {
    for (int64_t i = 0; i < (kv_len + 1) / 2; ++i)
      for (int64_t d = 0; d < hdp; ++d) {
        const bool second = 2 * i + 1 < kv_len;
        v2[i * hdp + d] = d < hd ? word(v[2 * i * v_rs + d], second ? v[(2 * i + 1) * v_rs + d] : 0.0f)
                                 : 0u;
      }
  }
  static void pack_queries(const float* q, int64_t q_rs, int64_t nq, int64_t hd, uint32_t* qb) {
    const int64_t hd2 = (hd + 1) / 2;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t e = 0; e < hd2; ++e) qb[i * hd2 + e] = gemm_detail::bf16_pair(q + i * q_rs, 2 * e, hd);
  }
  static void scores(const uint32_t* qb, int64_t hd2, int64_t nq, const uint32_t* kt2, int64_t ld,
                     int64_t nk, float scale, float* s) {
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < nk; ++j) {
        float acc = 0.0f;
        for (int64_t e = 0; e < hd2; ++e) {
          const uint32_t a = qb[i * hd2 + e], b = kt2[e * ld + j];
          acc += high(a) * high(b);
          acc += low(a) * low(b);
        }
        s[i * kKeyBlock + j] = acc * scale;
      }
  }
  static void softmax_step(float* s, int64_t nq, int64_t nk, float* m, float* l, float* o,
                           int64_t hdp, uint32_t* p) {
    PortableOps::softmax_step(s, nq, nk, m, l, o, hdp);
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < (nk + 1) / 2; ++j) {
        const float* si = s + i * kKeyBlock;
        p[i * kPairBlock + j] = word(si[2 * j], 2 * j + 1 < nk ? si[2 * j + 1] : 0.0f);
      }
  }
  static void accumulate(const uint32_t* p, int64_t nq, const uint32_t* v2, int64_t hdp,
                         int64_t nk, float* o) {
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < (nk + 1) / 2; ++j) {
        const uint32_t a = p[i * kPairBlock + j];
        for (int64_t d = 0; d < hdp; ++d) {
          const uint32_t b = v2[j * hdp + d];
          o[i * hdp + d] += high(a) * high(b);
          o[i * hdp + d] += low(a) * low(b);
        }
      }
  }
};

std::atomic<bool> g_force_portable_attention{false};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TESSERA_HAVE_AVX512_ATTENTION 1
// GCC 12 warns about the intrinsics' own _mm512_undefined_ps() placeholders; a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define TESSERA_AVX512 __attribute__((target("avx512f")))

using gemm_detail::lanes;

// How many 3-vector tiles to run before the 4-vector ones over n vectors of keys, so that none
// is left over for a 1- or 2-vector tile (13 = 3 + 3 + 3 + 4, not 4 + 4 + 4 + 1): 0 when n is
// a multiple of 4 or too small to avoid a short tile.
inline int64_t threes(int64_t n) {
  const int64_t k = (4 - n % 4) % 4;
  return 3 * k <= n ? k : 0;
}

// exp(x) for 16 lanes, the same Cephes scheme as exp_approx; 0 below -87.3.
TESSERA_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 e = _mm512_scalef_ps(p, n);
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(under, e, _mm512_setzero_ps());
}

// s[r, j] = scale * q[r] . kt[:, j] for R query rows and 16*NV keys (kt rows ld apart).
template <int R, int NV>
TESSERA_AVX512 inline void qk_tile(const float* q, int64_t q_rs, const float* kt, int64_t ld,
                                   int64_t hd, float scale, float* s) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    __m512 kv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) kv[v] = _mm512_loadu_ps(kt + d * ld + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * q_rs + d]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(qb, kv[v], acc[r][v]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + r * kKeyBlock + 16 * v, _mm512_mul_ps(acc[r][v], sc));
}

template <int R>
TESSERA_AVX512 void qk_rows(const float* q, int64_t q_rs, const float* kt, int64_t ld, int64_t hd,
                            int64_t nk16, float scale, float* s) {
  int64_t j = 0;
  for (int64_t k = threes(nk16 / 16); k > 0; --k, j += 48)
    qk_tile<R, 3>(q, q_rs, kt + j, ld, hd, scale, s + j);
  for (; j + 64 <= nk16; j += 64) qk_tile<R, 4>(q, q_rs, kt + j, ld, hd, scale, s + j);
  switch ((nk16 - j) / 16) {
    case 3: qk_tile<R, 3>(q, q_rs, kt + j, ld, hd, scale, s + j); break;
    case 2: qk_tile<R, 2>(q, q_rs, kt + j, ld, hd, scale, s + j); break;
    case 1: qk_tile<R, 1>(q, q_rs, kt + j, ld, hd, scale, s + j); break;
    default: break;
  }
}

// o[r, 16c : 16c + 16*NV] += sum_j p[r, j] v[j, ...] for R rows; `last` masks the final vector.
template <int R, int NV>
TESSERA_AVX512 inline void pv_tile(const float* p, const float* v, int64_t v_rs, int64_t nk,
                                   float* o, int64_t hdp, __mmask16 last) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * hdp + 16 * c);
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c)
      vv[c] = (c == NV - 1) ? _mm512_maskz_loadu_ps(last, v + j * v_rs + 16 * c)
                            : _mm512_loadu_ps(v + j * v_rs + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * kKeyBlock + j]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * hdp + 16 * c, acc[r][c]);
}

template <int R>
TESSERA_AVX512 void pv_rows(const float* p, const float* v, int64_t v_rs, int64_t nk, float* o,
                            int64_t hd, int64_t hdp) {
  // o rows are hdp floats apart (a multiple of 16), so full-width stores stay in the row. The
  // mask is the valid lanes of a tile's last vector (all of them but in the head's last).
  const int64_t vectors = hdp / 16;
  int64_t c = 0;
  for (; c + 4 <= vectors; c += 4)
    pv_tile<R, 4>(p, v + 16 * c, v_rs, nk, o + 16 * c, hdp, lanes(hd - 16 * (c + 3)));
  const __mmask16 m = lanes(hd - 16 * (vectors - 1));
  switch (vectors - c) {
    case 3: pv_tile<R, 3>(p, v + 16 * c, v_rs, nk, o + 16 * c, hdp, m); break;
    case 2: pv_tile<R, 2>(p, v + 16 * c, v_rs, nk, o + 16 * c, hdp, m); break;
    case 1: pv_tile<R, 1>(p, v + 16 * c, v_rs, nk, o + 16 * c, hdp, m); break;
    default: break;
  }
}

// Runs Fn<R>::run(row, ...) over rows [0, n) in tiles of 6 (24 accumulators) and one tail tile.
template <template <int> class Fn, class... Args>
TESSERA_AVX512 inline void by_row_tiles(int64_t n, Args... args) {
  int64_t i = 0;
  for (; i + 6 <= n; i += 6) Fn<6>::run(i, args...);
  switch (n - i) {
    case 5: Fn<5>::run(i, args...); break;
    case 4: Fn<4>::run(i, args...); break;
    case 3: Fn<3>::run(i, args...); break;
    case 2: Fn<2>::run(i, args...); break;
    case 1: Fn<1>::run(i, args...); break;
    default: break;
  }
}

struct Avx512Ops {
  // transpose_keys (ld = kv_len rounded up to 16) in 16 x 16 register blocks: whole 64-byte
  // rows of kt, and the last block's zero keys fill the padding.
  TESSERA_AVX512 static void keys(const float* k, int64_t k_rs, int64_t kv_len, int64_t hd,
                                  float* kt, int64_t ld) {
    for (int64_t j0 = 0; j0 < kv_len; j0 += 16) {
      const int64_t keys = std::min<int64_t>(16, kv_len - j0);
      for (int64_t d = 0; d < hd; d += 16) {
        const __mmask16 dims = lanes(hd - d);
        __m512 v[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r)
          v[r] = r < keys ? _mm512_maskz_loadu_ps(dims, k + (j0 + r) * k_rs + d) : _mm512_setzero_ps();
        gemm_detail::transpose16(v);  // v[e] lane r: dim d + e of key j0 + r
        for (int64_t e = 0; e < std::min<int64_t>(16, hd - d); ++e)
          _mm512_storeu_ps(kt + (d + e) * ld + j0, v[e]);
      }
    }
  }

  template <int R>
  struct Scores {
    TESSERA_AVX512 static void run(int64_t i, const float* q, int64_t q_rs, const float* kt,
                                   int64_t ld, int64_t hd, int64_t nk16, float scale, float* s) {
      qk_rows<R>(q + i * q_rs, q_rs, kt, ld, hd, nk16, scale, s + i * kKeyBlock);
    }
  };
  template <int R>
  struct Accumulate {
    TESSERA_AVX512 static void run(int64_t i, const float* p, const float* v, int64_t v_rs,
                                   int64_t nk, float* o, int64_t hd, int64_t hdp) {
      pv_rows<R>(p + i * kKeyBlock, v, v_rs, nk, o + i * hdp, hd, hdp);
    }
  };

  // Scores for keys past nk (up to the next 16) come from kt's zero padding; softmax_step masks
  // them out and accumulate never reads them.
  TESSERA_AVX512 static void scores(const float* q, int64_t q_rs, int64_t nq, const float* kt,
                                    int64_t ld, int64_t hd, int64_t nk, float scale, float* s) {
    by_row_tiles<Scores>(nq, q, q_rs, kt, ld, hd, round16(nk), scale, s);
  }

  TESSERA_AVX512 static void softmax_step(float* s, int64_t nq, int64_t nk, float* m, float* l,
                                          float* o, int64_t hdp) {
    const int64_t nk16 = round16(nk);
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < nq; ++r) {
      float* sr = s + r * kKeyBlock;
      __m512 mx = ninf;
      for (int64_t j = 0; j < nk16; j += 16)
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, lanes(nk - j), sr + j));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float alpha = exp_approx(m[r] - m_new);
      const __m512 mb = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < nk16; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(lanes(nk - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mb)));
        _mm512_storeu_ps(sr + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      m[r] = m_new;
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.0f) {
        const __m512 ab = _mm512_set1_ps(alpha);
        float* orow = o + r * hdp;
        for (int64_t d = 0; d < hdp; d += 16)
          _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), ab));
      }
    }
  }

  TESSERA_AVX512 static void accumulate(const float* p, int64_t nq, const float* v, int64_t v_rs,
                                        int64_t nk, float* o, int64_t hd, int64_t hdp) {
    by_row_tiles<Accumulate>(nq, p, v, v_rs, nk, o, hd, hdp);
  }
};

#define TESSERA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))

// 16 words of bf16 pairs from 32 floats x[0, n) (0 past n): (x[0], x[1]), (x[2], x[3]), ...
TESSERA_AVX512_BF16 inline __m512i pairs32(const float* x, int64_t n) {
  const __m512 lo = _mm512_maskz_loadu_ps(lanes(n), x);
  const __m512 hi = _mm512_maskz_loadu_ps(lanes(n - 16), x + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// exp(x) for x <= 0 to 5.3e-6 relative error (2^x: 2^round(t) times a degree-4 polynomial of the
// rest), for softmax weights about to be rounded to bf16 (3.9e-3); 0 below about -103.
TESSERA_AVX512_BF16 inline __m512 exp_for_bf16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(9.554105163815434e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.58704085137047e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024696601651616e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931280281735193e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999994397928007e-1f));
  return _mm512_scalef_ps(p, n);
}

// s[r, j] = scale * qb[r] . kt2[:, j] over hd2 pairs, for R query rows and 16*NV keys.
template <int R, int NV>
TESSERA_AVX512_BF16 inline void qk_tile_bf16(const uint32_t* qb, int64_t hd2, const uint32_t* kt2,
                                             int64_t ld, float scale, float* s) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t e = 0; e < hd2; ++e) {
    __m512bh kv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) kv[v] = (__m512bh)_mm512_loadu_si512(kt2 + e * ld + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qb[r * hd2 + e]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], qv, kv[v]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(s + r * kKeyBlock + 16 * v, _mm512_mul_ps(acc[r][v], sc));
}

// o[r, 16c : 16c + 16*NV] += sum over pairs i < n2 of p[r, i] . v2[i, ...], for R rows.
template <int R, int NV>
TESSERA_AVX512_BF16 inline void pv_tile_bf16(const uint32_t* p, const uint32_t* v2, int64_t hdp,
                                             int64_t n2, float* o) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * hdp + 16 * c);
  for (int64_t i = 0; i < n2; ++i) {
    __m512bh vv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(v2 + i * hdp + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * kPairBlock + i]));
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * hdp + 16 * c, acc[r][c]);
}

template <int R>
TESSERA_AVX512_BF16 void qk_rows_bf16(const uint32_t* qb, int64_t hd2, const uint32_t* kt2,
                                      int64_t ld, int64_t nk16, float scale, float* s) {
  int64_t j = 0;
  for (int64_t k = threes(nk16 / 16); k > 0; --k, j += 48)
    qk_tile_bf16<R, 3>(qb, hd2, kt2 + j, ld, scale, s + j);
  for (; j + 64 <= nk16; j += 64) qk_tile_bf16<R, 4>(qb, hd2, kt2 + j, ld, scale, s + j);
  switch ((nk16 - j) / 16) {
    case 3: qk_tile_bf16<R, 3>(qb, hd2, kt2 + j, ld, scale, s + j); break;
    case 2: qk_tile_bf16<R, 2>(qb, hd2, kt2 + j, ld, scale, s + j); break;
    case 1: qk_tile_bf16<R, 1>(qb, hd2, kt2 + j, ld, scale, s + j); break;
    default: break;
  }
}

template <int R>
TESSERA_AVX512_BF16 void pv_rows_bf16(const uint32_t* p, const uint32_t* v2, int64_t hdp,
                                      int64_t n2, float* o) {
  int64_t c = 0;
  for (; c + 64 <= hdp; c += 64) pv_tile_bf16<R, 4>(p, v2 + c, hdp, n2, o + c);
  switch ((hdp - c) / 16) {
    case 3: pv_tile_bf16<R, 3>(p, v2 + c, hdp, n2, o + c); break;
    case 2: pv_tile_bf16<R, 2>(p, v2 + c, hdp, n2, o + c); break;
    case 1: pv_tile_bf16<R, 1>(p, v2 + c, hdp, n2, o + c); break;
    default: break;
  }
}

struct Avx512Bf16Ops {
  // kt2[e * ld + j] = pair e of key j, 0 for kv_len <= j < ld (ld = kv_len rounded up to 16):
  // 16 keys x 32 dims at a time, rounded into 16 x 16 words and transposed in registers, so each
  // row of kt2 gets whole 64-byte stores.
  TESSERA_AVX512_BF16 static void pack_keys(const float* k, int64_t k_rs, int64_t kv_len,
                                            int64_t hd, uint32_t* kt2, int64_t ld) {
    const int64_t hd2 = (hd + 1) / 2;
    for (int64_t j0 = 0; j0 < kv_len; j0 += 16) {
      const int64_t keys = std::min<int64_t>(16, kv_len - j0);
      for (int64_t d = 0; d < hd; d += 32) {
        __m512 v[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r)
          v[r] = r < keys ? _mm512_castsi512_ps(pairs32(k + (j0 + r) * k_rs + d, hd - d))
                          : _mm512_setzero_ps();
        gemm_detail::transpose16(v);  // v[e] lane r: pair d/2 + e of key j0 + r
        for (int64_t e = 0; e < std::min<int64_t>(16, hd2 - d / 2); ++e)
          _mm512_storeu_ps(reinterpret_cast<float*>(kt2 + (d / 2 + e) * ld + j0), v[e]);
      }
    }
  }

  TESSERA_AVX512_BF16 static void pack_values(const float* v, int64_t v_rs, int64_t kv_len,
                                              int64_t hd, uint32_t* v2, int64_t hdp) {
    // [x0..x15 | y0..y15] as 16-bit lanes → x0 y0 x1 y1 ... x15 y15.
    alignas(64) static constexpr uint16_t kInterleave[32] = {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i idx = _mm512_load_si512(kInterleave);
    for (int64_t i = 0; i < (kv_len + 1) / 2; ++i) {
      const float* x = v + 2 * i * v_rs;
      const bool second = 2 * i + 1 < kv_len;
      for (int64_t d = 0; d < hdp; d += 16) {
        const __mmask16 m = lanes(hd - d);
        const __m512 a = _mm512_maskz_loadu_ps(m, x + d);
        const __m512 b = second ? _mm512_maskz_loadu_ps(m, x + v_rs + d) : _mm512_setzero_ps();
        const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);
        _mm512_storeu_si512(v2 + i * hdp + d, _mm512_permutexvar_epi16(idx, ab));
      }
    }
  }

  TESSERA_AVX512_BF16 static void pack_queries(const float* q, int64_t q_rs, int64_t nq,
                                               int64_t hd, uint32_t* qb) {
    const int64_t hd2 = (hd + 1) / 2;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t d = 0; d < hd; d += 32)
        _mm512_mask_storeu_epi32(qb + i * hd2 + d / 2, lanes(hd2 - d / 2),
                                 pairs32(q + i * q_rs + d, hd - d));
  }

  template <int R>
  struct Scores {
    TESSERA_AVX512_BF16 static void run(int64_t i, const uint32_t* qb, int64_t hd2,
                                        const uint32_t* kt2, int64_t ld, int64_t nk16,
                                        float scale, float* s) {
      qk_rows_bf16<R>(qb + i * hd2, hd2, kt2, ld, nk16, scale, s + i * kKeyBlock);
    }
  };
  template <int R>
  struct Accumulate {
    TESSERA_AVX512_BF16 static void run(int64_t i, const uint32_t* p, const uint32_t* v2,
                                        int64_t hdp, int64_t n2, float* o) {
      pv_rows_bf16<R>(p + i * kPairBlock, v2, hdp, n2, o + i * hdp);
    }
  };

  // Scores for keys past nk (up to the next 16) come from kt2's zero padding; softmax_step
  // gives them weight 0.
  TESSERA_AVX512_BF16 static void scores(const uint32_t* qb, int64_t hd2, int64_t nq,
                                         const uint32_t* kt2, int64_t ld, int64_t nk, float scale,
                                         float* s) {
    by_row_tiles<Scores>(nq, qb, hd2, kt2, ld, round16(nk), scale, s);
  }

  // As Avx512Ops::softmax_step, but the weights go to p as bf16 pairs (the sums use them
  // unrounded), and exp is computed only as accurately as bf16 needs.
  TESSERA_AVX512_BF16 static void softmax_step(float* s, int64_t nq, int64_t nk, float* m,
                                               float* l, float* o, int64_t hdp, uint32_t* p) {
    const int64_t nk16 = round16(nk);
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < nq; ++r) {
      const float* sr = s + r * kKeyBlock;
      __m512 mx = ninf;
      for (int64_t j = 0; j < nk16; j += 16)
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, lanes(nk - j), sr + j));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float alpha = exp_approx(m[r] - m_new);
      const __m512 mb = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < nk16; j += 32) {
        const __m512 e0 = _mm512_maskz_mov_ps(
            lanes(nk - j), exp_for_bf16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mb)));
        const __m512 e1 = _mm512_maskz_mov_ps(
            lanes(nk - j - 16), exp_for_bf16(_mm512_sub_ps(_mm512_loadu_ps(sr + j + 16), mb)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(p + r * kPairBlock + j / 2, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      m[r] = m_new;
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.0f) {
        const __m512 ab = _mm512_set1_ps(alpha);
        float* orow = o + r * hdp;
        for (int64_t d = 0; d < hdp; d += 16)
          _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), ab));
      }
    }
  }

  TESSERA_AVX512_BF16 static void accumulate(const uint32_t* p, int64_t nq, const uint32_t* v2,
                                             int64_t hdp, int64_t nk, float* o) {
    by_row_tiles<Accumulate>(nq, p, v2, hdp, (nk + 1) / 2, o);
  }
};

// ---- AVX2 + FMA: the same block operations on 8-lane vectors -------------------------------
#define TESSERA_AVX2 __attribute__((target("avx2,fma")))

// exp(x) for 8 lanes, the same Cephes scheme as exp_approx; 0 below -87.3.
TESSERA_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n in the exponent field: n in [-126, 128]; n = 128 only past exp's range, where the
  // scalar path overflows too.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ), e);
}

// Lanes j0 + [0, 8) that are below n, as an all-ones mask per lane.
TESSERA_AVX2 inline __m256 below8(int64_t j0, int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t m = std::clamp<int64_t>(n - j0, 0, 8);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(m)), idx));
}

// s[r, 0:16] = scale * q[r] . kt[:, 0:16] for R query rows (kt rows ld apart).
template <int R>
TESSERA_AVX2 inline void qk_tile_avx2(const float* q, int64_t q_rs, const float* kt, int64_t ld,
                                      int64_t hd, float scale, float* s) {
  __m256 a0[R], a1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * ld), k1 = _mm256_loadu_ps(kt + d * ld + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * q_rs + d);
      a0[r] = _mm256_fmadd_ps(qb, k0, a0[r]);
      a1[r] = _mm256_fmadd_ps(qb, k1, a1[r]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(s + r * kKeyBlock, _mm256_mul_ps(a0[r], sc));
    _mm256_storeu_ps(s + r * kKeyBlock + 8, _mm256_mul_ps(a1[r], sc));
  }
}

// o[r, 0:16] += sum_j p[r, j] v[j, 0:16] for R rows (o rows hdp apart, a multiple of 16; v
// lanes past hd are masked to 0 by `m0`, `m1`).
template <int R>
TESSERA_AVX2 inline void pv_tile_avx2(const float* p, const float* v, int64_t v_rs, int64_t nk,
                                      float* o, int64_t hdp, __m256i m0, __m256i m1, bool full) {
  __m256 a0[R], a1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) a0[r] = _mm256_loadu_ps(o + r * hdp), a1[r] = _mm256_loadu_ps(o + r * hdp + 8);
  for (int64_t j = 0; j < nk; ++j) {
    const float* vj = v + j * v_rs;
    const __m256 v0 = full ? _mm256_loadu_ps(vj) : _mm256_maskload_ps(vj, m0);
    const __m256 v1 = full ? _mm256_loadu_ps(vj + 8) : _mm256_maskload_ps(vj + 8, m1);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + r * kKeyBlock + j);
      a0[r] = _mm256_fmadd_ps(pb, v0, a0[r]);
      a1[r] = _mm256_fmadd_ps(pb, v1, a1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(o + r * hdp, a0[r]), _mm256_storeu_ps(o + r * hdp + 8, a1[r]);
}

template <template <int> class Fn, class... Args>
TESSERA_AVX2 inline void by_six_rows(int64_t n, Args... args) {
  int64_t i = 0;
  for (; i + 6 <= n; i += 6) Fn<6>::run(i, args...);
  switch (n - i) {
    case 5: Fn<5>::run(i, args...); break;
    case 4: Fn<4>::run(i, args...); break;
    case 3: Fn<3>::run(i, args...); break;
    case 2: Fn<2>::run(i, args...); break;
    case 1: Fn<1>::run(i, args...); break;
    default: break;
  }
}

struct Avx2Ops {
  static void keys(const float* k, int64_t k_rs, int64_t kv_len, int64_t hd, float* kt,
                   int64_t ld) {
    transpose_keys(k, k_rs, kv_len, hd, kt, ld);
  }
  template <int R>
  struct Scores {
    TESSERA_AVX2 static void run(int64_t i, const float* q, int64_t q_rs, const float* kt,
                                 int64_t ld, int64_t hd, int64_t nk16, float scale, float* s) {
      for (int64_t j = 0; j < nk16; j += 16)
        qk_tile_avx2<R>(q + i * q_rs, q_rs, kt + j, ld, hd, scale, s + i * kKeyBlock + j);
    }
  };
  template <int R>
  struct Accumulate {
    TESSERA_AVX2 static void run(int64_t i, const float* p, const float* v, int64_t v_rs,
                                 int64_t nk, float* o, int64_t hd, int64_t hdp) {
      for (int64_t c = 0; c < hdp; c += 16) {
        const bool full = c + 16 <= hd;
        const __m256i m0 = _mm256_castps_si256(below8(c, hd));
        const __m256i m1 = _mm256_castps_si256(below8(c + 8, hd));
        pv_tile_avx2<R>(p + i * kKeyBlock, v + c, v_rs, nk, o + i * hdp + c, hdp, m0, m1, full);
      }
    }
  };
  // Scores for keys past nk (up to the next 16) come from kt's zero padding; softmax_step
  // masks them out and accumulate never reads them.
  TESSERA_AVX2 static void scores(const float* q, int64_t q_rs, int64_t nq, const float* kt,
                                  int64_t ld, int64_t hd, int64_t nk, float scale, float* s) {
    by_six_rows<Scores>(nq, q, q_rs, kt, ld, hd, round16(nk), scale, s);
  }
  TESSERA_AVX2 static void softmax_step(float* s, int64_t nq, int64_t nk, float* m, float* l,
                                        float* o, int64_t hdp) {
    const int64_t nk16 = round16(nk);
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < nq; ++r) {
      float* sr = s + r * kKeyBlock;
      __m256 mx = ninf;
      for (int64_t j = 0; j < nk16; j += 8)
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, _mm256_loadu_ps(sr + j), below8(j, nk)));
      alignas(32) float lanes8[8];
      _mm256_store_ps(lanes8, mx);
      float m_new = m[r];
      for (float v : lanes8) m_new = std::max(m_new, v);
      const float alpha = exp_approx(m[r] - m_new);
      const __m256 mb = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < nk16; j += 8) {
        const __m256 e = _mm256_and_ps(below8(j, nk), exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mb)));
        _mm256_storeu_ps(sr + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_store_ps(lanes8, sum);
      float total = 0.0f;
      for (float v : lanes8) total += v;
      m[r] = m_new;
      l[r] = l[r] * alpha + total;
      if (alpha != 1.0f) {
        const __m256 ab = _mm256_set1_ps(alpha);
        float* orow = o + r * hdp;
        for (int64_t d = 0; d < hdp; d += 8)
          _mm256_storeu_ps(orow + d, _mm256_mul_ps(_mm256_loadu_ps(orow + d), ab));
      }
    }
  }
  TESSERA_AVX2 static void accumulate(const float* p, int64_t nq, const float* v, int64_t v_rs,
                                      int64_t nk, float* o, int64_t hd, int64_t hdp) {
    by_six_rows<Accumulate>(nq, p, v, v_rs, nk, o, hd, hdp);
  }
};

// attention_grad_rows for one row of n: p = exp(scale·p − lse), ds = p·(ds − d)·scale.
TESSERA_AVX512 void attention_grad_row_avx512(float* p, float* ds, int64_t n, float lse, float d,
                                             float scale) {
  const __m512 sc = _mm512_set1_ps(scale), l = _mm512_set1_ps(lse), dd = _mm512_set1_ps(d);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    const __m512 e = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, p + j), sc, l));
    _mm512_mask_storeu_ps(p + j, m, e);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, ds + j), dd);
    _mm512_mask_storeu_ps(ds + j, m, _mm512_mul_ps(_mm512_mul_ps(e, g), sc));
  }
}

TESSERA_AVX2 void attention_grad_row_avx2(float* p, float* ds, int64_t n, float lse, float d,
                                          float scale) {
  const __m256 sc = _mm256_set1_ps(scale), l = _mm256_set1_ps(lse), dd = _mm256_set1_ps(d);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(p + j), sc, l));
    _mm256_storeu_ps(p + j, e);
    const __m256 g = _mm256_sub_ps(_mm256_loadu_ps(ds + j), dd);
    _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_mul_ps(e, g), sc));
  }
  attention_grad_row(p + j, ds + j, n - j, lse, d, scale);  // the tail, one lane at a time
}

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  return has;
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#pragma GCC diagnostic pop
#endif

}  // namespace

void attention(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
               StridedRows q, StridedRows k, StridedRows v, float* out, int64_t out_batch_stride,
               int64_t out_row_stride, float scale, AttentionPrecision precision, float* lse) {
  if (batch <= 0 || heads <= 0 || q_len <= 0 || head_dim <= 0) return;
  if (kv_len <= 0) {  // softmax over nothing: define the result as zeros rather than NaN
    if (lse) std::fill_n(lse, batch * heads * q_len, -std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < q_len; ++i)
        std::fill_n(out + b * out_batch_stride + i * out_row_stride, heads * head_dim, 0.0f);
    return;
  }
  // Chunks per head: one when there are at least 4 (batch, head) tasks per thread (splitting a
  // head repeats its key and value packing); otherwise enough to keep every thread busy (~8
  // waves), never under kQueryBlock rows, so the packing stays a small share of a task's work.
  const int64_t max_chunks = (q_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t want = batch * heads >= 4 * num_threads()
                           ? 1
                           : (8 * num_threads() + batch * heads - 1) / (batch * heads);
  const int64_t chunks = std::clamp<int64_t>(want, 1, max_chunks);
  const int64_t tasks = batch * heads * chunks;
  const bool bf16 = precision == AttentionPrecision::BF16;
  auto block = bf16 ? attention_chunk_bf16<PortableBf16Ops> : attention_chunk<PortableOps>;
#ifdef TESSERA_HAVE_AVX512_ATTENTION
  const IsaFamily family = isa_family();
  const bool portable = g_force_portable_attention.load() || family == IsaFamily::Generic;
  const bool avx512 = family == IsaFamily::Avx512 && cpu_has_avx512();
  if (!bf16 && avx512 && !portable) block = attention_chunk<Avx512Ops>;
  if (!bf16 && family == IsaFamily::Avx2 && !portable) block = attention_chunk<Avx2Ops>;
  if (bf16 && avx512 && cpu_has_avx512_bf16() && !portable) block = attention_chunk_bf16<Avx512Bf16Ops>;
#endif
  parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chunks;
      const int64_t h = (t / chunks) % heads;
      const int64_t b = t / (chunks * heads);
      const int64_t i0 = c * q_len / chunks, i1 = (c + 1) * q_len / chunks;
      const int64_t col = h * head_dim;
      block(q.ptr + b * q.batch_stride + i0 * q.row_stride + col, q.row_stride,
            k.ptr + b * k.batch_stride + col, k.row_stride, v.ptr + b * v.batch_stride + col,
            v.row_stride, out + b * out_batch_stride + i0 * out_row_stride + col, out_row_stride,
            i1 - i0, kv_len, head_dim, scale, lse ? lse + (b * heads + h) * q_len + i0 : nullptr);
    }
  });
}

void attention_grad_rows(float* p, float* ds, int64_t rows, int64_t cols, int64_t ld,
                         const float* lse, const float* d, float scale) {
  void (*fn)(float*, float*, int64_t, float, float, float) = attention_grad_row;
#ifdef TESSERA_HAVE_AVX512_ATTENTION
  const IsaFamily family = isa_family();
  if (!g_force_portable_attention.load() && family == IsaFamily::Avx512 && cpu_has_avx512())
    fn = attention_grad_row_avx512;
  if (!g_force_portable_attention.load() && family == IsaFamily::Avx2) fn = attention_grad_row_avx2;
#endif
  for (int64_t i = 0; i < rows; ++i) fn(p + i * ld, ds + i * ld, cols, lse[i], d[i], scale);
}

void force_portable_attention(bool on) { g_force_portable_attention = on; }

bool native_bf16_attention() {
#ifdef TESSERA_HAVE_AVX512_ATTENTION
  return cpu_has_avx512_bf16() && !g_force_portable_attention.load() &&
         isa_family() == IsaFamily::Avx512;
#else
  return false;
#endif
}

}  // namespace tessera
