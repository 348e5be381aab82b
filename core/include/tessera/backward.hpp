#pragma once
// The training pass's kernels: each forward that saves what its backward needs, and the backward
// beside it. Shapes are row-major and contiguous unless a stride is given.
//
// One rule for gradients (llm.c's): every backward ADDS into its gradient outputs (dx, dW, db,
// dgamma ...), so a tensor used twice (the residual stream) sums its gradients without copies;
// the caller zeroes the gradient buffers once per step.
//
// Every result is the same bit for bit for any thread count: work is split by output element
// (or by fixed slices), and each sum runs in a fixed order. The naive double-precision versions
// the tests compare against are in tessera/backward_reference.hpp.
#include <cstdint>
#include <span>

#include "tessera/kernels.hpp"  // StridedRows

namespace tessera {

// Whether a backward kernel adds its input gradient into dx (the default: where paths meet, as at
// a residual, their gradients are summed there) or overwrites it (dx holds nothing yet: it need
// not be zeroed first and the zeros are not read back; the same values, but for the sign of a
// zero).
enum class GradInto { Add, Set };

// ---------------------------------------------------------------- linear
// Forward: y[M,N] = x[M,K]·W[N,K]ᵀ + b (gemm.hpp's linear). Backward, on the packed GEMM:
//   dx[M,K] += dy[M,N]·W[N,K];  dW[N,K] += dyᵀ[N,M]·x[M,K];  db[N] += Σ_m dy[m,:].
// dx, dW or db may be null (not wanted); `dx_into` Set writes dx instead of adding to it. W is
// packed transposed for each call (it changes every step), as is x for dW.
void linear_backward(const float* x, const float* weight, const float* dy, int64_t M, int64_t N,
                     int64_t K, float* dx, float* dweight, float* dbias, GradInto dx_into = GradInto::Add);

// ---------------------------------------------------------------- layer norm
// y[r,:] = (x[r,:] − mean_r)·rstd_r·gamma + beta, rstd_r = 1/sqrt(var_r + eps); saves mean, rstd [rows].
void layer_norm_forward(const float* x, int64_t rows, int64_t dim, const float* gamma,
                        const float* beta, float eps, float* y, float* mean, float* rstd);
// x̂ = (x − mean)·rstd, g = dy·gamma:  dx += rstd·(g − mean(g) − x̂·mean(g·x̂));
// dgamma[dim] += Σ_r dy·x̂;  dbeta[dim] += Σ_r dy.
void layer_norm_backward(const float* dy, const float* x, const float* mean, const float* rstd,
                         const float* gamma, int64_t rows, int64_t dim, float* dx, float* dgamma,
                         float* dbeta);

// ---------------------------------------------------------------- activations
// y = 0.5·x·(1 + erf(x/√2));  dx += dy·(Φ(x) + x·φ(x)), Φ/φ the standard normal cdf/pdf. n elements.
void gelu_forward(const float* x, float* y, int64_t n);
void gelu_backward(const float* x, const float* dy, float* dx, int64_t n, GradInto into = GradInto::Add);
// y = x·σ(1.702x) (CLIP's QuickGELU);  dx += dy·(σ + 1.702·x·σ·(1 − σ)), σ = σ(1.702x).
void quick_gelu_forward(const float* x, float* y, int64_t n);
void quick_gelu_backward(const float* x, const float* dy, float* dx, int64_t n);

// SwiGLU (DINOv2): row r of x [rows, 2F] is [a, b]; y[r, :F] = silu(a)·b, silu(a) = a·σ(a) (y rows F
// apart).  da += dy·b·σ(a)·(1 + a·(1 − σ(a)));  db += dy·silu(a)  (dx rows 2F apart, [da, db]).
void swiglu_forward(const float* x, float* y, int64_t rows, int64_t f);
void swiglu_backward(const float* x, const float* dy, float* dx, int64_t rows, int64_t f);

// y[r,:] = softmax(x[r,:]) over cols (kernels.hpp's softmax_rows);  dx[r,:] += y ⊙ (dy − Σ_j dy·y).
void softmax_rows_backward(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols);

// ---------------------------------------------------------------- attention
// Multi-head scaled dot-product attention as kernels.hpp's attention (same addressing: head h is
// columns [h·hd, (h+1)·hd) of each row, row t of batch b at ptr + b·batch_stride + t·row_stride):
//   out[b,i,h] = Σ_j P[b,h,i,j]·v[b,j,h],  P = softmax_j(scale·q[b,i,h]·k[b,j,h]).
// Saves lse[b,h,i] = log Σ_j exp(scale·q·k) [batch, heads, q_len], all the backward needs
// besides q, k, v and out: it recomputes P rather than keeping [T,T] per head between the passes.
// The forward is kernels.hpp's fused, tiled inference attention with its lse output. The
// backward makes each (batch, head) one task of a few packed GEMMs over a transient
// [q_len, kv_len] buffer (not tiled along kv_len yet: ~1.3 MB per task at 577 tokens).
struct MutableRows {
  float* ptr;
  int64_t batch_stride;
  int64_t row_stride;
};
void attention_forward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                       int64_t head_dim, StridedRows q, StridedRows k, StridedRows v,
                       MutableRows out, float scale, float* lse);
// D_i = dout_i·out_i;  dS = P ⊙ (dout·vᵀ − D);  dq += scale·dS·k;  dk += scale·dSᵀ·q;  dv += Pᵀ·dout.
// dq, dk, dv may share one buffer (the fused qkv gradient): heads and q/k/v write disjoint columns.
// `into` Set writes them instead of adding.
void attention_backward(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                        int64_t head_dim, StridedRows q, StridedRows k, StridedRows v,
                        StridedRows out, StridedRows dout, const float* lse, float scale,
                        MutableRows dq, MutableRows dk, MutableRows dv, GradInto into = GradInto::Add);

// ---------------------------------------------------------------- resampling
// kernels.hpp's interpolations of a [C, in_h, in_w] grid to [C, out_h, out_w] (position embeddings,
// upsampled logits) are linear and separable: out[c] = A·in[c]·Bᵀ, A [out_h, in_h] and
// B [out_w, in_w], every row summing to 1. The backward is din[c] += Aᵀ·dout[c]·B, with A and B
// read off the forward kernel itself (one probe per input row / column), so it is the exact
// adjoint of whatever the forward computes, for every mode it has.
enum class InterpolationMode { Bicubic, Bilinear, BicubicAntialias };
struct Interpolation {
  InterpolationMode mode = InterpolationMode::Bicubic;
  bool align_corners = false;      // not for BicubicAntialias
  double scale_h = 0, scale_w = 0;  // > 0: PyTorch's scale_factor was given (not for antialias)
};
void interpolate_forward(const Interpolation& how, const float* in, int64_t channels, int64_t in_h,
                         int64_t in_w, float* out, int64_t out_h, int64_t out_w);
void interpolate_backward(const Interpolation& how, const float* dout, int64_t channels,
                          int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, float* din);

// ---------------------------------------------------------------- loss
// Mean cross-entropy with label smoothing ε over rows (PyTorch's F.cross_entropy(label_smoothing=ε)):
//   q = (1−ε)·onehot(label) + ε/C,  loss = (1/rows)·Σ_r −Σ_c q_c·log softmax(logits_r)_c,
//   dlogits[r,:] += (softmax(logits_r) − q)/rows.  dlogits may be null. Returns the loss.
double cross_entropy_forward_backward(const float* logits, const int64_t* labels, int64_t rows,
                                      int64_t classes, float label_smoothing, float* dlogits);

}  // namespace tessera
