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

// dst[c, r] = src[r, c] for a [rows, cols] matrix (blocked, so both sides stay in cache).
void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  constexpr int64_t kB = 32;
  parallel_for(0, (cols + kB - 1) / kB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t cb = b0; cb < b1; ++cb) {
      const int64_t c0 = cb * kB, c1 = std::min(cols, c0 + kB);
      for (int64_t r0 = 0; r0 < rows; r0 += kB) {
        const int64_t r1 = std::min(rows, r0 + kB);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
      }
    }
  });
}

}  // namespace

void linear_backward(const float* x, const float* weight, const float* dy, int64_t M, int64_t N,
                     int64_t K, float* dx, float* dweight, float* dbias) {
  check(M >= 0 && N > 0 && K > 0, "linear_backward: bad shape");
  if (M == 0) return;
  if (dx) {
    // dx[M,K] += dy[M,N]·W[N,K]: a linear layer whose weight (in [out, in] layout) is Wᵀ [K,N].
    std::vector<float> wt(static_cast<size_t>(N * K));
    transpose(weight, N, K, wt.data());
    const PackedLinear packed = pack_linear(wt.data(), nullptr, K, N);
    linear(dy, M, N, packed, dx, K, Activation::None, dx);
  }
  if (dweight) {
    // dW[N,K] += dyᵀ[N,M]·x[M,K]: rows dyᵀ, a linear layer whose weight is xᵀ [K,M].
    std::vector<float> dyt(static_cast<size_t>(N * M)), xt(static_cast<size_t>(K * M));
    transpose(dy, M, N, dyt.data());
    transpose(x, M, K, xt.data());
    const PackedLinear packed = pack_linear(xt.data(), nullptr, K, M);
    linear(dyt.data(), N, M, packed, dweight, K, Activation::None, dweight);
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
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      y[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * static_cast<float>(M_SQRT1_2)));
  });
}

void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  const float inv_sqrt_2pi = static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2);  // 1/√(2π)
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      const float cdf = 0.5f * (1.0f + std::erf(v * static_cast<float>(M_SQRT1_2)));
      const float pdf = inv_sqrt_2pi * std::exp(-0.5f * v * v);
      dx[i] += dy[i] * (cdf + v * pdf);
    }
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

// Attention: one task per (batch, head); each recomputes its rows of P, one query row at a time.
// Plain loops over head_dim-long rows (the compiler vectorises them); correctness first.
void attention_forward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                       int64_t head_dim, StridedRows q, StridedRows k, StridedRows v,
                       MutableRows out, float scale, float* lse) {
  parallel_for(0, batch * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(static_cast<size_t>(kv_len));
    std::vector<float> acc(static_cast<size_t>(head_dim));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / heads, h = t % heads, col = h * head_dim;
      for (int64_t i = 0; i < q_len; ++i) {
        const float* qi = q.ptr + b * q.batch_stride + i * q.row_stride + col;
        float mx = -INFINITY;
        for (int64_t j = 0; j < kv_len; ++j) {
          const float* kj = k.ptr + b * k.batch_stride + j * k.row_stride + col;
          float s = 0;
          for (int64_t e = 0; e < head_dim; ++e) s += qi[e] * kj[e];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        float sum = 0;
        for (int64_t j = 0; j < kv_len; ++j) sum += p[j] = std::exp(p[j] - mx);
        const float inv = 1.0f / sum;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < kv_len; ++j) {
          const float* vj = v.ptr + b * v.batch_stride + j * v.row_stride + col;
          const float pj = p[j] * inv;
          for (int64_t e = 0; e < head_dim; ++e) acc[e] += pj * vj[e];
        }
        float* oi = out.ptr + b * out.batch_stride + i * out.row_stride + col;
        std::copy(acc.begin(), acc.end(), oi);
        lse[(b * heads + h) * q_len + i] = mx + std::log(sum);
      }
    }
  });
}

void attention_backward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                        int64_t head_dim, StridedRows q, StridedRows k, StridedRows v,
                        StridedRows out, StridedRows dout, const float* lse, float scale,
                        MutableRows dq, MutableRows dk, MutableRows dv) {
  parallel_for(0, batch * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(static_cast<size_t>(kv_len));
    std::vector<float> dkv(static_cast<size_t>(2 * kv_len * head_dim));  // dk, dv of this head
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / heads, h = t % heads, col = h * head_dim;
      float* dk_acc = dkv.data();
      float* dv_acc = dkv.data() + kv_len * head_dim;
      std::fill(dkv.begin(), dkv.end(), 0.0f);
      for (int64_t i = 0; i < q_len; ++i) {
        const float* qi = q.ptr + b * q.batch_stride + i * q.row_stride + col;
        const float* oi = out.ptr + b * out.batch_stride + i * out.row_stride + col;
        const float* doi = dout.ptr + b * dout.batch_stride + i * dout.row_stride + col;
        const float l = lse[(b * heads + h) * q_len + i];
        float di = 0;  // D_i = dout_i · out_i
        for (int64_t e = 0; e < head_dim; ++e) di += doi[e] * oi[e];
        float* dqi = dq.ptr + b * dq.batch_stride + i * dq.row_stride + col;
        for (int64_t j = 0; j < kv_len; ++j) {
          const float* kj = k.ptr + b * k.batch_stride + j * k.row_stride + col;
          const float* vj = v.ptr + b * v.batch_stride + j * v.row_stride + col;
          float s = 0, dp = 0;
          for (int64_t e = 0; e < head_dim; ++e) {
            s += qi[e] * kj[e];
            dp += doi[e] * vj[e];
          }
          const float pij = std::exp(s * scale - l);
          const float ds = pij * (dp - di) * scale;
          float* dkj = dk_acc + j * head_dim;
          float* dvj = dv_acc + j * head_dim;
          for (int64_t e = 0; e < head_dim; ++e) {
            dqi[e] += ds * kj[e];
            dkj[e] += ds * qi[e];
            dvj[e] += pij * doi[e];
          }
        }
      }
      for (int64_t j = 0; j < kv_len; ++j) {
        float* dkj = dk.ptr + b * dk.batch_stride + j * dk.row_stride + col;
        float* dvj = dv.ptr + b * dv.batch_stride + j * dv.row_stride + col;
        for (int64_t e = 0; e < head_dim; ++e) {
          dkj[e] += dk_acc[j * head_dim + e];
          dvj[e] += dv_acc[j * head_dim + e];
        }
      }
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
