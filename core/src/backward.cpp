// The training pass's kernels (tessera/backward.hpp). The GEMMs go through gemm.hpp's packed,
// runtime-dispatched linear(); the rest are plain loops, split by output element so that every
// sum keeps one order whatever the thread count.
#include "tessera/backward.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/parallel.hpp"

namespace tessera {
namespace {

// The backward GEMMs' operand buffers, kept by the calling thread from one call to the next
// (linear_backward is not called from inside a parallel region): packing into new memory every
// call was fresh pages, i.e. page faults and the kernel zeroing them, on every layer of every step.
enum ScratchSlot { kPackedW, kPackedX, kScratchSlots };
float* scratch(ScratchSlot slot, int64_t floats) {
  thread_local ScratchFloats bufs[kScratchSlots];
  return bufs[slot].get(floats);
}

// dW's sum over tokens, taken this many at a time (see linear_backward).
constexpr int64_t kTokenChunk = 512;

// Σ a[e]·b[e] with 16 partial sums in a fixed order: vectorises without -ffast-math (a single
// running sum would not, its order being part of the result) and gives the same bits every time.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[e + j] * b[e + j];
  for (int64_t j = 0; e < n; ++e, ++j) acc[j] += a[e] * b[e];
  float sum = 0;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  return sum;
}

}  // namespace

void linear_backward(const float* x, const float* weight, const float* dy, int64_t M, int64_t N,
                     int64_t K, float* dx, float* dweight, float* dbias, GradInto dx_into) {
  check(M >= 0 && N > 0 && K > 0, "linear_backward: bad shape");
  if (M == 0) return;
  if (dx) {
    // dx[M,K] += dy[M,N]·W[N,K]: a linear layer whose weight (in [out, in] layout) is Wᵀ [K,N],
    // packed straight from W (its transpose).
    const PackedLinear packed = pack_linear_transposed(weight, K, K, N, scratch(kPackedW, pack_linear_buffer_floats(K, N)),
                                                       training_gemm_type());
    linear(dy, M, N, packed, dx, K, Activation::None, dx_into == GradInto::Add ? dx : nullptr);
  }
  if (dweight) {
    // dW[N,K] += dyᵀ[N,M]·x[M,K]: rows dyᵀ, a linear layer whose weight is xᵀ [K,M], packed
    // straight from x. The sum over M (a batch's tokens: thousands) is taken in chunks of
    // kTokenChunk rows, each added into dW in turn: over all of M at once each micro-panel of
    // dyᵀ and each panel of xᵀ is M·4 bytes per row (ViT-S at batch 16: 400 KB panels, past what
    // the L2 holds beside the task's micro-panels), and dW ran at ~75% of the forward GEMMs' rate
    // (150-160 vs 205-215 GFLOP/s, 2 threads); in chunks ViT-S's whole backward is 3-5% faster.
    // The chunking depends only on M, so the result is the same for every thread count.
    // dyᵀ is read in place (linear_cols: its micro-panels are copies of dy's rows), not
    // transposed into a buffer first: one pass over dy less per GEMM.
    const int64_t chunk = std::min(M, kTokenChunk);
    float* xt = scratch(kPackedX, pack_linear_buffer_floats(K, chunk));
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
      const int64_t rows = std::min(chunk, M - m0);
      const PackedLinear packed = pack_linear_transposed(x + m0 * K, K, K, rows, xt, training_gemm_type());
      linear_cols(dy + m0 * N, N, N, packed, dweight, K, dweight);
    }
  }
  if (dbias) {
    parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; ++m) {
        const float* row = dy + m * N;
        for (int64_t n = n0; n < n1; ++n) dbias[n] += row[n];
      }
    });
  }
}

void layer_norm_forward(const float* x, int64_t rows, int64_t dim, const float* gamma,
                        const float* beta, float eps, float* y, float* mean, float* rstd) {
  parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * dim;
      float* yr = y + r * dim;
      // Double sums, as the inference kernel: a large mean over a small spread keeps its variance.
      double sum = 0;
      for (int64_t i = 0; i < dim; ++i) sum += xr[i];
      const double mu = sum / static_cast<double>(dim);
      double sq = 0;
      for (int64_t i = 0; i < dim; ++i) sq += (xr[i] - mu) * (xr[i] - mu);
      const double rs = 1.0 / std::sqrt(sq / static_cast<double>(dim) + static_cast<double>(eps));
      for (int64_t i = 0; i < dim; ++i)
        yr[i] = static_cast<float>((xr[i] - mu) * rs) * gamma[i] + beta[i];
      mean[r] = static_cast<float>(mu);
      rstd[r] = static_cast<float>(rs);
    }
  });
}

void layer_norm_backward(const float* dy, const float* x, const float* mean, const float* rstd,
                         const float* gamma, int64_t rows, int64_t dim, float* dx, float* dgamma,
                         float* dbeta) {
  if (dx) {
    parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* dyr = dy + r * dim;
        const float* xr = x + r * dim;
        const float mu = mean[r], rs = rstd[r];
        double sum_g = 0, sum_gx = 0;
        for (int64_t i = 0; i < dim; ++i) {
          const float g = dyr[i] * gamma[i];
          sum_g += g;
          sum_gx += static_cast<double>(g) * ((xr[i] - mu) * rs);
        }
        const float mean_g = static_cast<float>(sum_g / static_cast<double>(dim));
        const float mean_gx = static_cast<float>(sum_gx / static_cast<double>(dim));
        float* dxr = dx + r * dim;
        for (int64_t i = 0; i < dim; ++i) {
          const float xhat = (xr[i] - mu) * rs;
          dxr[i] += rs * (dyr[i] * gamma[i] - mean_g - xhat * mean_gx);
        }
      }
    });
  }
  if (dgamma || dbeta) {
    // Split by column; each column sums its rows in order.
    parallel_for(0, dim, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* dyr = dy + r * dim;
        const float* xr = x + r * dim;
        const float mu = mean[r], rs = rstd[r];
        for (int64_t i = i0; i < i1; ++i) {
          if (dgamma) dgamma[i] += dyr[i] * ((xr[i] - mu) * rs);
          if (dbeta) dbeta[i] += dyr[i];
        }
      }
    });
  }
}

void gelu_forward(const float* x, float* y, int64_t n) {
  // The inference epilogue's vectorised exact-erf GELU (gemm.hpp), so both passes agree.
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) { linear_gelu(x + i0, y + i0, i1 - i0); });
}

void gelu_backward(const float* x, const float* dy, float* dx, int64_t n, GradInto into) {
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    linear_gelu_backward(x + i0, dy + i0, dx + i0, i1 - i0, into == GradInto::Add);  // gemm.hpp's dispatched kernel
  });
}

void quick_gelu_forward(const float* x, float* y, int64_t n) {
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) y[i] = x[i] / (1.0f + std::exp(-1.702f * x[i]));
  });
}

void quick_gelu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float s = 1.0f / (1.0f + std::exp(-1.702f * x[i]));
      dx[i] += dy[i] * (s + 1.702f * x[i] * s * (1.0f - s));
    }
  });
}

void swiglu_forward(const float* x, float* y, int64_t rows, int64_t f) {
  parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = x + r * 2 * f;
      const float* b = a + f;
      for (int64_t j = 0; j < f; ++j) y[r * f + j] = a[j] / (1.0f + std::exp(-a[j])) * b[j];
    }
  });
}

void swiglu_backward(const float* x, const float* dy, float* dx, int64_t rows, int64_t f) {
  parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = x + r * 2 * f;
      const float* b = a + f;
      float* da = dx + r * 2 * f;
      float* db = da + f;
      for (int64_t j = 0; j < f; ++j) {
        const float s = 1.0f / (1.0f + std::exp(-a[j]));
        const float g = dy[r * f + j];
        da[j] += g * b[j] * s * (1.0f + a[j] * (1.0f - s));
        db[j] += g * a[j] * s;
      }
    }
  });
}

void interpolate_forward(const Interpolation& how, const float* in, int64_t channels, int64_t in_h,
                         int64_t in_w, float* out, int64_t out_h, int64_t out_w) {
  switch (how.mode) {
    case InterpolationMode::Bicubic:
      return interpolate_bicubic(in, channels, in_h, in_w, out, out_h, out_w, how.align_corners,
                                 how.scale_h, how.scale_w);
    case InterpolationMode::Bilinear:
      return interpolate_bilinear(in, channels, in_h, in_w, out, out_h, out_w, how.align_corners,
                                  how.scale_h, how.scale_w);
    case InterpolationMode::BicubicAntialias:
      check(!how.align_corners && how.scale_h == 0 && how.scale_w == 0,
            "antialiased bicubic interpolation takes sizes only, align_corners off");
      return interpolate_bicubic_antialias(in, channels, in_h, in_w, out, out_h, out_w);
  }
}

void interpolate_backward(const Interpolation& how, const float* dout, int64_t channels,
                          int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, float* din) {
  // A[:, i] is column 0 of the forward of a grid whose row i is ones (rows of A sum to 1, so the
  // constant direction passes through B unchanged); B[:, j] likewise from row 0 of column j's.
  std::vector<double> a(static_cast<size_t>(out_h * in_h)), bm(static_cast<size_t>(out_w * in_w));
  std::vector<float> probe(static_cast<size_t>(in_h * in_w)), response(static_cast<size_t>(out_h * out_w));
  for (int64_t i = 0; i < in_h; ++i) {
    std::fill(probe.begin(), probe.end(), 0.0f);
    std::fill(probe.begin() + i * in_w, probe.begin() + (i + 1) * in_w, 1.0f);
    interpolate_forward(how, probe.data(), 1, in_h, in_w, response.data(), out_h, out_w);
    for (int64_t y = 0; y < out_h; ++y) a[y * in_h + i] = response[y * out_w];
  }
  for (int64_t j = 0; j < in_w; ++j) {
    std::fill(probe.begin(), probe.end(), 0.0f);
    for (int64_t i = 0; i < in_h; ++i) probe[i * in_w + j] = 1.0f;
    interpolate_forward(how, probe.data(), 1, in_h, in_w, response.data(), out_h, out_w);
    for (int64_t x = 0; x < out_w; ++x) bm[x * in_w + j] = response[x];
  }
  // din[c] += Aᵀ·(dout[c]·B), one channel per task, sums in a fixed order.
  parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> t(static_cast<size_t>(out_h * in_w));
    for (int64_t c = c0; c < c1; ++c) {
      const float* g = dout + c * out_h * out_w;
      std::fill(t.begin(), t.end(), 0.0);
      for (int64_t y = 0; y < out_h; ++y)
        for (int64_t x = 0; x < out_w; ++x) {
          const double gx = g[y * out_w + x];
          if (gx == 0.0) continue;
          for (int64_t j = 0; j < in_w; ++j) t[y * in_w + j] += gx * bm[x * in_w + j];
        }
      float* d = din + c * in_h * in_w;
      for (int64_t i = 0; i < in_h; ++i)
        for (int64_t j = 0; j < in_w; ++j) {
          double s = 0;
          for (int64_t y = 0; y < out_h; ++y) s += a[y * in_h + i] * t[y * in_w + j];
          d[i * in_w + j] += static_cast<float>(s);
        }
    }
  });
}

void softmax_rows_backward(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) {
  parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* yr = y + r * cols;
      const float* dyr = dy + r * cols;
      double dot = 0;
      for (int64_t j = 0; j < cols; ++j) dot += static_cast<double>(dyr[j]) * yr[j];
      const float d = static_cast<float>(dot);
      float* dxr = dx + r * cols;
      for (int64_t j = 0; j < cols; ++j) dxr[j] += yr[j] * (dyr[j] - d);
    }
  });
}

// Attention: one task per (batch, head), each a handful of GEMMs on the packed kernels over that
// head's [T, T] scores (recomputed in the backward from q, k and the saved lse, never stored
// between the passes). The GEMMs sum in a fixed order, so results do not depend on the threads.
namespace {

// Rows [0, rows) of one head (hd columns at `col`) of strided rows, copied to a contiguous
// [rows, hd] matrix.
void gather_head(const float* base, int64_t row_stride, int64_t col, int64_t rows, int64_t hd, float* dst) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* src = base + t * row_stride + col;
    std::copy(src, src + hd, dst + t * hd);
  }
}

// s[Tq, Tk] = q_h·k_hᵀ (unscaled) for one (batch, head); k_h gathered into `gathered`, packed into `packed`.
void head_scores(const float* q, int64_t q_stride, const float* k, int64_t k_stride, int64_t col,
                 int64_t q_len, int64_t kv_len, int64_t hd, std::vector<float>& gathered, ScratchFloats& packed,
                 float* s) {
  gathered.resize(static_cast<size_t>(kv_len * hd));
  gather_head(k, k_stride, col, kv_len, hd, gathered.data());
  const PackedLinear kp = pack_linear(gathered.data(), nullptr, kv_len, hd, packed.get(pack_linear_buffer_floats(kv_len, hd)));
  linear(q + col, q_len, q_stride, kp, s, kv_len);
}

}  // namespace

void attention_forward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                       int64_t head_dim, StridedRows q, StridedRows k, StridedRows v,
                       MutableRows out, float scale, float* lse) {
  // The inference kernel (fused, tiled, vectorised for the CPU's family) with its running max and
  // sum kept as the log-sum-exp the backward needs.
  attention(batch, heads, q_len, kv_len, head_dim, q, k, v, out.ptr, out.batch_stride, out.row_stride, scale,
            AttentionPrecision::F32, lse);
}

void attention_backward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                        int64_t head_dim, StridedRows q, StridedRows k, StridedRows v,
                        StridedRows out, StridedRows dout, const float* lse, float scale,
                        MutableRows dq, MutableRows dk, MutableRows dv, GradInto into) {
  parallel_for(0, batch * heads, 1, [&](int64_t t0, int64_t t1) {
    // This call's own buffers (a thread-local one could be handed to another (batch, head) that
    // TBB runs on this thread while one of the GEMMs below waits for its parallel part).
    const size_t tt = static_cast<size_t>(q_len * kv_len);
    std::vector<float> p(tt), ds(tt), scratch, d(static_cast<size_t>(q_len));
    ScratchFloats packed;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / heads, h = t % heads, col = h * head_dim;
      const float* qb = q.ptr + b * q.batch_stride;
      const float* kb = k.ptr + b * k.batch_stride;
      const float* vb = v.ptr + b * v.batch_stride;
      const float* ob = out.ptr + b * out.batch_stride;
      const float* dob = dout.ptr + b * dout.batch_stride;
      // P = exp(scale·q·kᵀ − lse);  dP = dout·vᵀ
      head_scores(qb, q.row_stride, kb, k.row_stride, col, q_len, kv_len, head_dim, scratch, packed, p.data());
      head_scores(dob, dout.row_stride, vb, v.row_stride, col, q_len, kv_len, head_dim, scratch, packed, ds.data());
      for (int64_t i = 0; i < q_len; ++i)
        d[i] = dot(dob + i * dout.row_stride + col, ob + i * out.row_stride + col, head_dim);
      // P, and dS with the score scale folded in.
      attention_grad_rows(p.data(), ds.data(), q_len, kv_len, kv_len, lse + (b * heads + h) * q_len, d.data(), scale);
      // dst_h[rows, hd] (+)= a[rows, inner]·src_h[inner, hd]: a layer whose weight is src_hᵀ,
      // packed from src_h in place. a is row-major, or with a_cols the transpose of a stored
      // [inner, rows] matrix (read in place by linear_cols).
      auto add_product = [&](const float* a, bool a_cols, int64_t rows, int64_t inner, const float* src,
                             int64_t src_stride, MutableRows dst) {
        const PackedLinear w = pack_linear_transposed(src + col, src_stride, head_dim, inner,
                                                      packed.get(pack_linear_buffer_floats(head_dim, inner)));
        float* y = dst.ptr + b * dst.batch_stride + col;
        const float* residual = into == GradInto::Add ? y : nullptr;
        if (a_cols)
          linear_cols(a, rows, rows, w, y, dst.row_stride, residual);
        else
          linear(a, rows, inner, w, y, dst.row_stride, Activation::None, residual);
      };
      add_product(ds.data(), false, q_len, kv_len, kb, k.row_stride, dq);  // dq += dS·k
      add_product(ds.data(), true, kv_len, q_len, qb, q.row_stride, dk);    // dk += dSᵀ·q
      add_product(p.data(), true, kv_len, q_len, dob, dout.row_stride, dv);  // dv += Pᵀ·dout
    }
  });
}

double cross_entropy_forward_backward(const float* logits, const int64_t* labels, int64_t rows,
                                      int64_t classes, float label_smoothing, float* dlogits) {
  check(rows > 0 && classes > 0, "cross_entropy: no rows or no classes");
  for (int64_t r = 0; r < rows; ++r)
    check(labels[r] >= 0 && labels[r] < classes,
          "cross_entropy: label " + std::to_string(labels[r]) + " of row " + std::to_string(r) +
              " is outside [0, " + std::to_string(classes) + ")");
  std::vector<double> row_loss(static_cast<size_t>(rows));
  const double eps = label_smoothing;
  parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* z = logits + r * classes;
      double mx = -INFINITY;
      for (int64_t c = 0; c < classes; ++c) mx = std::max(mx, static_cast<double>(z[c]));
      double sum = 0, sum_z = 0;
      for (int64_t c = 0; c < classes; ++c) {
        sum += std::exp(z[c] - mx);
        sum_z += z[c];
      }
      const double lse = mx + std::log(sum);
      // −Σ q_c log p_c = (1−ε)(lse − z_y) + ε(lse − mean_c z_c)
      row_loss[r] = (1 - eps) * (lse - z[labels[r]]) + eps * (lse - sum_z / classes);
      if (dlogits) {
        float* dz = dlogits + r * classes;
        for (int64_t c = 0; c < classes; ++c) {
          const double q = (c == labels[r] ? 1 - eps : 0) + eps / classes;
          dz[c] += static_cast<float>((std::exp(z[c] - lse) - q) / rows);
        }
      }
    }
  });
  double total = 0;
  for (double l : row_loss) total += l;
  return total / static_cast<double>(rows);
}

}  // namespace tessera
