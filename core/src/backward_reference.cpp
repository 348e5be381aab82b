// Naive double-precision references (tessera/backward_reference.hpp): the math, nothing else.
#include "tessera/backward_reference.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tessera::reference {

void linear_backward(const float* x, const float* w, const float* dy, int64_t M, int64_t N,
                     int64_t K, double* dx, double* dw, double* db) {
  if (dx)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0;
        for (int64_t n = 0; n < N; ++n) s += static_cast<double>(dy[m * N + n]) * w[n * K + k];
        dx[m * K + k] = s;
      }
  if (dw)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0;
        for (int64_t m = 0; m < M; ++m) s += static_cast<double>(dy[m * N + n]) * x[m * K + k];
        dw[n * K + k] = s;
      }
  if (db)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t m = 0; m < M; ++m) s += dy[m * N + n];
      db[n] = s;
    }
}

void layer_norm_forward(const float* x, int64_t rows, int64_t dim, const float* gamma,
                        const float* beta, double eps, double* y, double* mean, double* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double mu = 0, var = 0;
    for (int64_t i = 0; i < dim; ++i) mu += xr[i];
    mu /= dim;
    for (int64_t i = 0; i < dim; ++i) var += (xr[i] - mu) * (xr[i] - mu);
    var /= dim;
    const double rs = 1.0 / std::sqrt(var + eps);
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = rs;
    if (y)
      for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = (xr[i] - mu) * rs * gamma[i] + beta[i];
  }
}

void layer_norm_backward(const float* dy, const float* x, const float* gamma, int64_t rows,
                         int64_t dim, double eps, double* dx, double* dgamma, double* dbeta) {
  if (dgamma) std::fill(dgamma, dgamma + dim, 0.0);
  if (dbeta) std::fill(dbeta, dbeta + dim, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double mu, rs;
    layer_norm_forward(x + r * dim, 1, dim, gamma, gamma, eps, nullptr, &mu, &rs);
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    // dx_i = Σ_j dy_j γ_j ∂x̂_j/∂x_i, with ∂x̂_j/∂x_i = rs·(δ_ij − 1/D − x̂_i x̂_j / D).
    for (int64_t i = 0; i < dim; ++i) {
      const double xi = (xr[i] - mu) * rs;
      double s = 0;
      for (int64_t j = 0; j < dim; ++j) {
        const double xj = (xr[j] - mu) * rs;
        s += dyr[j] * static_cast<double>(gamma[j]) * rs *
             ((i == j ? 1.0 : 0.0) - 1.0 / dim - xi * xj / dim);
      }
      if (dx) dx[r * dim + i] = s;
      if (dgamma) dgamma[i] += dyr[i] * xi;
      if (dbeta) dbeta[i] += dyr[i];
    }
  }
}

void gelu_backward(const float* x, const float* dy, double* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    const double cdf = 0.5 * (1.0 + std::erf(v / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * v * v) / std::sqrt(2.0 * M_PI);
    dx[i] = dy[i] * (cdf + v * pdf);
  }
}

void quick_gelu_backward(const float* x, const float* dy, double* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    const double s = 1.0 / (1.0 + std::exp(-1.702 * v));
    dx[i] = dy[i] * (s + 1.702 * v * s * (1.0 - s));
  }
}

void swiglu_backward(const float* x, const float* dy, double* dx, int64_t rows, int64_t f) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < f; ++j) {
      const double a = x[r * 2 * f + j], b = x[r * 2 * f + f + j], g = dy[r * f + j];
      const double s = 1.0 / (1.0 + std::exp(-a));
      dx[r * 2 * f + j] = g * b * (s + a * s * (1.0 - s));  // d(a·σ(a))/da = σ + a·σ·(1 − σ)
      dx[r * 2 * f + f + j] = g * a * s;
    }
}

void softmax_rows_backward(const float* x, const float* dy, double* dx, int64_t rows, int64_t cols) {
  std::vector<double> y(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, static_cast<double>(x[r * cols + j]));
    for (int64_t j = 0; j < cols; ++j) sum += y[j] = std::exp(x[r * cols + j] - mx);
    // dx_i = Σ_j dy_j ∂y_j/∂x_i = Σ_j dy_j y_j (δ_ij − y_i)
    for (int64_t i = 0; i < cols; ++i) {
      double s = 0;
      for (int64_t j = 0; j < cols; ++j)
        s += dy[r * cols + j] * (y[j] / sum) * ((i == j ? 1.0 : 0.0) - y[i] / sum);
      dx[r * cols + i] = s;
    }
  }
}

namespace {
// P[i, j] of batch b, head h, in double.
std::vector<double> attention_probs(int64_t b, int64_t h, int64_t H, int64_t Tq, int64_t Tk,
                                    int64_t hd, const float* q, const float* k, double scale) {
  const int64_t D = H * hd;
  std::vector<double> p(static_cast<size_t>(Tq * Tk));
  for (int64_t i = 0; i < Tq; ++i) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < Tk; ++j) {
      double s = 0;
      for (int64_t e = 0; e < hd; ++e)
        s += static_cast<double>(q[(b * Tq + i) * D + h * hd + e]) * k[(b * Tk + j) * D + h * hd + e];
      p[i * Tk + j] = s * scale;
      mx = std::max(mx, p[i * Tk + j]);
    }
    for (int64_t j = 0; j < Tk; ++j) sum += p[i * Tk + j] = std::exp(p[i * Tk + j] - mx);
    for (int64_t j = 0; j < Tk; ++j) p[i * Tk + j] /= sum;
  }
  return p;
}
}  // namespace

void attention_forward(int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t hd, const float* q,
                       const float* k, const float* v, double scale, double* out) {
  const int64_t D = H * hd;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const std::vector<double> p = attention_probs(b, h, H, Tq, Tk, hd, q, k, scale);
      for (int64_t i = 0; i < Tq; ++i)
        for (int64_t e = 0; e < hd; ++e) {
          double s = 0;
          for (int64_t j = 0; j < Tk; ++j) s += p[i * Tk + j] * v[(b * Tk + j) * D + h * hd + e];
          out[(b * Tq + i) * D + h * hd + e] = s;
        }
    }
}

void attention_backward(int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t hd, const float* q,
                        const float* k, const float* v, const float* dout, double scale,
                        double* dq, double* dk, double* dv) {
  const int64_t D = H * hd;
  std::fill(dq, dq + B * Tq * D, 0.0);
  std::fill(dk, dk + B * Tk * D, 0.0);
  std::fill(dv, dv + B * Tk * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const std::vector<double> p = attention_probs(b, h, H, Tq, Tk, hd, q, k, scale);
      auto at = [&](const float* t, int64_t T, int64_t row, int64_t e) {
        return static_cast<double>(t[(b * T + row) * D + h * hd + e]);
      };
      for (int64_t i = 0; i < Tq; ++i) {
        // dP_ij = dout_i · v_j; dS_ij = P_ij (dP_ij − Σ_l P_il dP_il)
        std::vector<double> dp(static_cast<size_t>(Tk));
        double row = 0;
        for (int64_t j = 0; j < Tk; ++j) {
          double s = 0;
          for (int64_t e = 0; e < hd; ++e) s += at(dout, Tq, i, e) * at(v, Tk, j, e);
          dp[j] = s;
          row += p[i * Tk + j] * s;
        }
        for (int64_t j = 0; j < Tk; ++j) {
          const double ds = p[i * Tk + j] * (dp[j] - row) * scale;
          for (int64_t e = 0; e < hd; ++e) {
            dq[(b * Tq + i) * D + h * hd + e] += ds * at(k, Tk, j, e);
            dk[(b * Tk + j) * D + h * hd + e] += ds * at(q, Tq, i, e);
            dv[(b * Tk + j) * D + h * hd + e] += p[i * Tk + j] * at(dout, Tq, i, e);
          }
        }
      }
    }
}

double cross_entropy(const float* logits, const int64_t* labels, int64_t rows, int64_t classes,
                     double eps, double* dlogits) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * classes;
    double mx = -INFINITY, sum = 0;
    for (int64_t c = 0; c < classes; ++c) mx = std::max(mx, static_cast<double>(z[c]));
    for (int64_t c = 0; c < classes; ++c) sum += std::exp(z[c] - mx);
    for (int64_t c = 0; c < classes; ++c) {
      const double logp = z[c] - mx - std::log(sum);
      const double q = (c == labels[r] ? 1.0 - eps : 0.0) + eps / classes;
      total -= q * logp;
      if (dlogits) dlogits[r * classes + c] = (std::exp(logp) - q) / rows;
    }
  }
  return total / rows;
}

}  // namespace tessera::reference
