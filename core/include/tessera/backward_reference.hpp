#pragma once
// Naive double-precision references for tessera/backward.hpp's kernels, kept beside them for the
// tests: textbook loops, float inputs, double outputs that are OVERWRITTEN (not added to), so a
// test compares a kernel's gradient with the reference's gradient directly.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace tessera::reference {

// dx[M,K] = dy·W, dW[N,K] = dyᵀ·x, db[N] = Σ_m dy[m,:] (each may be null).
void linear_backward(const float* x, const float* weight, const float* dy, int64_t M, int64_t N,
                     int64_t K, double* dx, double* dweight, double* dbias);
// y, mean, rstd as layer_norm_forward (y may be null); dx, dgamma, dbeta of Σ dy·y.
void layer_norm_forward(const float* x, int64_t rows, int64_t dim, const float* gamma,
                        const float* beta, double eps, double* y, double* mean, double* rstd);
void layer_norm_backward(const float* dy, const float* x, const float* gamma, int64_t rows,
                         int64_t dim, double eps, double* dx, double* dgamma, double* dbeta);
void gelu_backward(const float* x, const float* dy, double* dx, int64_t n);
void quick_gelu_backward(const float* x, const float* dy, double* dx, int64_t n);
// SwiGLU on rows [a, b] of 2F: dx [rows, 2F] = [da, db].
void swiglu_backward(const float* x, const float* dy, double* dx, int64_t rows, int64_t f);
// The adjoint of a resampling by brute force: din[c, i, j] = Σ dout[c] ⊙ forward(e_ij), with
// forward(in, out) the [in_h, in_w] → [out_h, out_w] single-channel kernel under test.
template <class Forward>
void interpolate_backward(Forward forward, const float* dout, int64_t channels, int64_t in_h,
                          int64_t in_w, int64_t out_h, int64_t out_w, double* din) {
  std::vector<float> basis(static_cast<size_t>(in_h * in_w), 0.0f);
  std::vector<float> response(static_cast<size_t>(out_h * out_w));
  for (int64_t k = 0; k < in_h * in_w; ++k) {
    basis[k] = 1.0f;
    forward(basis.data(), response.data());
    basis[k] = 0.0f;
    for (int64_t c = 0; c < channels; ++c) {
      double s = 0;
      for (int64_t o = 0; o < out_h * out_w; ++o)
        s += static_cast<double>(dout[c * out_h * out_w + o]) * response[o];
      din[c * in_h * in_w + k] = s;
    }
  }
}
// y = softmax(x) row-wise is recomputed from x.
void softmax_rows_backward(const float* x, const float* dy, double* dx, int64_t rows, int64_t cols);
// q [B,Tq,H·hd], k, v [B,Tk,H·hd], contiguous: out [B,Tq,H·hd]; the backward of Σ dout·out.
void attention_forward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                       const float* q, const float* k, const float* v, double scale, double* out);
void attention_backward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                        int64_t head_dim, const float* q, const float* k, const float* v,
                        const float* dout, double scale, double* dq, double* dk, double* dv);
// Mean label-smoothed cross-entropy and its gradient (dlogits may be null).
double cross_entropy(const float* logits, const int64_t* labels, int64_t rows, int64_t classes,
                     double label_smoothing, double* dlogits);

}  // namespace tessera::reference
