#pragma once
// Element-wise, normalisation, attention and resampling kernels. Each takes raw pointers (or
// spans), never allocates in its hot loop, and is parallel inside where the work is large.
#include <cstdint>

namespace tessera {

// y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * gamma + beta for r < rows; y may equal x.
// Rows are ldx / ldy floats apart.
void layer_norm(const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* gamma,
                const float* beta, float eps, float* y, int64_t ldy);

// One row of layer_norm: the same arithmetic, on the calling thread (y may equal x).
void layer_norm_row(const float* x, int64_t dim, const float* gamma, const float* beta, float eps,
                    float* y);

// x = 0.5 x (1 + erf(x / sqrt 2)), in place, n elements.
void gelu_erf(float* x, int64_t n);

// Each of `rows` rows of `cols` floats (ld apart) becomes softmax(row), in place.
void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld);

// Multi-head scaled dot-product attention, fused and tiled (flash-attention style, so memory does
// not grow with Tq*Tk): for batch b, head h, query i:
//   out[b, i, h*hd:(h+1)*hd] = softmax_j(scale * q[b,i,h] · k[b,j,h]) · v[b,j,h]
// Head h occupies columns [h*head_dim, (h+1)*head_dim) of every row. Each of q, k, v, out is
// addressed as ptr + b*batch_stride + t*row_stride.
struct StridedRows {
  const float* ptr;
  int64_t batch_stride;
  int64_t row_stride;
};
// F32: every product and sum in fp32. BF16 (for bf16 models): q, k, v and the softmax weights
// are rounded to bf16 (nearest even) and their products summed in fp32, with vdpbf16ps where the
// CPU has AVX512-BF16 (else portable C++ with the same rounding); the running max, the softmax
// sums and the output stay fp32.
// lse, where given ([batch, heads, q_len]): lse[b, h, i] = log sum_j exp(scale * q . k), the
// running max plus the log of the running sum (what the training backward needs to recompute P).
enum class AttentionPrecision { F32, BF16 };
void attention(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
               StridedRows q, StridedRows k, StridedRows v, float* out, int64_t out_batch_stride,
               int64_t out_row_stride, float scale,
               AttentionPrecision precision = AttentionPrecision::F32, float* lse = nullptr);
// The training backward's element-wise attention step over rows [0, rows) of two [rows, cols]
// blocks (rows ld apart), s the raw scores q·kᵀ and dp = dout·vᵀ on entry:
//   p = exp(scale·s − lse[i])  (the forward's softmax weights),  ds = p·(dp − d[i])·scale.
// One thread (it runs inside a (batch, head) task); vectorised as attention is.
void attention_grad_rows(float* p, float* ds, int64_t rows, int64_t cols, int64_t ld,
                         const float* lse, const float* d, float scale);
// True where BF16 attention runs on vdpbf16ps (the CPU has AVX512-BF16 and neither the portable
// nor the generic kernels are forced); elsewhere it runs in portable C++, slower than F32.
bool native_bf16_attention();
// attention uses AVX-512 where the CPU has it (checked at run time), else portable C++.
// force_portable_attention(true) selects the portable path everywhere (tests compare the two).
void force_portable_attention(bool on);

// PyTorch F.interpolate on a [C, H, W] grid to [C, out_h, out_w]. scale_h/scale_w > 0 mean
// "scale_factor was given": source coordinates then use 1/scale, as PyTorch does; otherwise
// in/out sizes. Bicubic uses A = -0.75 with clamped borders.
void interpolate_bicubic(const float* in, int64_t channels, int64_t in_h, int64_t in_w, float* out,
                         int64_t out_h, int64_t out_w, bool align_corners, double scale_h = 0,
                         double scale_w = 0);
void interpolate_bilinear(const float* in, int64_t channels, int64_t in_h, int64_t in_w,
                          float* out, int64_t out_h, int64_t out_w, bool align_corners,
                          double scale_h = 0, double scale_w = 0);
// F.interpolate(mode='bicubic', antialias=True, align_corners=False) (timm's position-embedding
// resampling): separable, A = -0.5, support widened by the scale when downsampling.
void interpolate_bicubic_antialias(const float* in, int64_t channels, int64_t in_h, int64_t in_w,
                                   float* out, int64_t out_h, int64_t out_w);

}  // namespace tessera
