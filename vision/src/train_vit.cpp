// The trainable ViT: parameter layout, and each layer as a *_forward / *_backward pair of plain
// functions over raw arrays (row-major). Every *_backward ADDS into its d* outputs (llm.c's
// convention), so the caller zeroes a gradient buffer once and residual branches just add up.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "tessera/error.hpp"
#include "tessera/train.hpp"

namespace tessera {

void TrainVitConfig::validate() const {
  auto need = [](bool ok, const std::string& what) { check(ok, "train: " + what); };
  need(image_size > 0 && patch_size > 0 && image_size % patch_size == 0,
       "image_size " + std::to_string(image_size) + " must be a positive multiple of patch_size " +
           std::to_string(patch_size));
  need(num_channels > 0, "num_channels must be positive");
  need(hidden_size > 0 && num_attention_heads > 0 && hidden_size % num_attention_heads == 0,
       "hidden_size " + std::to_string(hidden_size) + " must be a positive multiple of num_attention_heads " +
           std::to_string(num_attention_heads));
  need(num_hidden_layers > 0, "num_hidden_layers must be positive");
  need(intermediate_size > 0, "intermediate_size must be positive");
  need(num_labels > 1, "num_labels must be at least 2");
  need(layer_norm_eps > 0, "layer_norm_eps must be positive");
}

namespace {

// The single source of the layout: visits every parameter in buffer order with its slot in p.
template <typename R, typename Fn>
void visit_params(const TrainVitConfig& c, VitParams<R>& p, Fn&& fn) {
  const int64_t D = c.hidden_size, F = c.intermediate_size, K = c.num_labels;
  fn("patch_embed.weight", Shape{D, c.patch_dim()}, true, p.patch_w);
  fn("patch_embed.bias", Shape{D}, false, p.patch_b);
  fn("cls_token", Shape{D}, false, p.cls_token);
  fn("position_embeddings", Shape{c.tokens(), D}, false, p.pos_embed);
  p.layers.resize(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string n = "layers." + std::to_string(l) + ".";
    VitLayerParams<R>& q = p.layers[l];
    fn(n + "norm1.weight", Shape{D}, false, q.norm1_w);
    fn(n + "norm1.bias", Shape{D}, false, q.norm1_b);
    fn(n + "qkv.weight", Shape{3 * D, D}, true, q.qkv_w);
    fn(n + "qkv.bias", Shape{3 * D}, false, q.qkv_b);
    fn(n + "attn_out.weight", Shape{D, D}, true, q.attn_out_w);
    fn(n + "attn_out.bias", Shape{D}, false, q.attn_out_b);
    fn(n + "norm2.weight", Shape{D}, false, q.norm2_w);
    fn(n + "norm2.bias", Shape{D}, false, q.norm2_b);
    fn(n + "fc1.weight", Shape{F, D}, true, q.fc1_w);
    fn(n + "fc1.bias", Shape{F}, false, q.fc1_b);
    fn(n + "fc2.weight", Shape{D, F}, true, q.fc2_w);
    fn(n + "fc2.bias", Shape{D}, false, q.fc2_b);
  }
  fn("norm.weight", Shape{D}, false, p.norm_w);
  fn("norm.bias", Shape{D}, false, p.norm_b);
  fn("classifier.weight", Shape{K, D}, true, p.head_w);
  fn("classifier.bias", Shape{K}, false, p.head_b);
}

}  // namespace

std::vector<ParamTensor> param_layout(const TrainVitConfig& c) {
  c.validate();
  std::vector<ParamTensor> out;
  int64_t offset = 0;
  VitParams<float> unused{};
  visit_params(c, unused, [&](const std::string& name, const Shape& shape, bool decay, float*&) {
    out.push_back({name, shape, offset, decay});
    offset += shape_numel(shape);
  });
  return out;
}

int64_t param_count(const TrainVitConfig& c) {
  const auto layout = param_layout(c);
  return layout.back().offset + shape_numel(layout.back().shape);
}

template <typename R>
VitParams<R> bind_params(const TrainVitConfig& c, R* buffer) {
  c.validate();
  VitParams<R> p{};
  int64_t offset = 0;
  visit_params(c, p, [&](const std::string&, const Shape& shape, bool, R*& slot) {
    slot = buffer + offset;
    offset += shape_numel(shape);
  });
  return p;
}

template <typename R>
void init_params(const TrainVitConfig& c, R* buffer, uint64_t seed) {
  TrainRng rng(mix_seed(seed, 0x1417, 0));
  for (const ParamTensor& t : param_layout(c)) {
    R* p = buffer + t.offset;
    const int64_t n = shape_numel(t.shape);
    const bool is_norm_weight = t.name.ends_with("norm1.weight") || t.name.ends_with("norm2.weight") ||
                                t.name == "norm.weight";
    // The original (JAX) ViT's scheme, which suits a narrow model far better than BERT's N(0, 0.02²)
    // (at width 64 that leaves GELU almost linear and training sits on a plateau for epochs):
    // linear weights Xavier-uniform, the patch projection LeCun-normal, class token and classifier
    // zero, biases zero, norms one. The position embedding starts as MAE's fixed 2-D sin-cos table
    // (then learned): at N(0, 0.02²) it is invisible next to unit-scale patch tokens, and a small
    // model spends epochs as a bag of patches before it learns where anything is.
    double uniform_limit = 0, normal_std = 0;
    if (t.name == "patch_embed.weight") {
      normal_std = 1.0 / std::sqrt(static_cast<double>(t.shape[1]));
    } else if (t.name == "position_embeddings" && c.hidden_size % 4 == 0) {
      // [sin(y ω_i), cos(y ω_i), sin(x ω_i), cos(x ω_i)], ω_i = 10000^(−i / (D/4)); class token 0.
      const int64_t D = c.hidden_size, q = D / 4, G = c.grid();
      std::fill(p, p + n, R(0));
      for (int64_t gy = 0; gy < G; ++gy)
        for (int64_t gx = 0; gx < G; ++gx)
          for (int64_t i = 0; i < q; ++i) {
            const double w = std::pow(10000.0, -static_cast<double>(i) / static_cast<double>(q));
            R* row = p + (1 + gy * G + gx) * D;
            row[i] = static_cast<R>(std::sin(gy * w)), row[q + i] = static_cast<R>(std::cos(gy * w));
            row[2 * q + i] = static_cast<R>(std::sin(gx * w)), row[3 * q + i] = static_cast<R>(std::cos(gx * w));
          }
      continue;
    } else if (t.name == "position_embeddings") {
      normal_std = 0.02;
    } else if (t.decay && t.name != "classifier.weight") {
      uniform_limit = std::sqrt(6.0 / static_cast<double>(t.shape[0] + t.shape[1]));
    }
    for (int64_t i = 0; i < n; ++i) {
      if (is_norm_weight) {
        p[i] = R(1);
      } else if (normal_std > 0) {
        double z;
        do z = rng.normal();
        while (std::abs(z) > 2.0);  // truncated at ±2σ
        p[i] = static_cast<R>(normal_std * z);
      } else if (uniform_limit > 0) {
        p[i] = static_cast<R>(rng.uniform(-uniform_limit, uniform_limit));
      } else {
        p[i] = R(0);
      }
    }
  }
}

namespace {

// Σ a[i]·b[i] with 8 independent partial sums: vectorises without -ffast-math, same order always.
template <typename R>
inline R dot(const R* a, const R* b, int64_t n) {
  R acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  R tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// y[i] += a · x[i]
template <typename R>
inline void axpy(R* y, R a, const R* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// patches[b·N + gy·G + gx, c·p·p + ky·p + kx] = pixels[b, c, gy·p + ky, gx·p + kx]
// pixels [n, C, S, S] → patches [n·N, C·p·p] (the order of a flattened conv weight [D, C, p, p]).
template <typename R>
void im2col_forward(R* patches, const R* pixels, int64_t n, int64_t C, int64_t S, int64_t p) {
  const int64_t G = S / p, P = C * p * p;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t gy = 0; gy < G; ++gy)
      for (int64_t gx = 0; gx < G; ++gx) {
        R* row = patches + ((b * G + gy) * G + gx) * P;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t ky = 0; ky < p; ++ky)
            for (int64_t kx = 0; kx < p; ++kx)
              row[(c * p + ky) * p + kx] = pixels[((b * C + c) * S + gy * p + ky) * S + gx * p + kx];
      }
}

// out[M, N] = in[M, K] · w[N, K]ᵀ + b[N]
template <typename R>
void linear_forward(R* out, const R* in, const R* w, const R* b, int64_t M, int64_t K, int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    const R* x = in + m * K;
    R* y = out + m * N;
    for (int64_t n = 0; n < N; ++n) y[n] = b[n] + dot(x, w + n * K, K);
  }
}

// out = in · wᵀ + b:   din[M, K] += dout · w;   dw[N, K] += doutᵀ · in;   db[N] += Σ_m dout[m, :]
// din may be null (the input needs no gradient, e.g. the image patches).
template <typename R>
void linear_backward(R* din, R* dw, R* db, const R* dout, const R* in, const R* w, int64_t M,
                     int64_t K, int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    const R* g = dout + m * N;
    const R* x = in + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const R gn = g[n];
      db[n] += gn;
      axpy(dw + n * K, gn, x, K);
      if (din) axpy(din + m * K, gn, w + n * K, K);
    }
  }
}

// x[b, 0, :] = cls + pos[0];   x[b, 1 + i, :] = patch_out[b·N + i, :] + pos[1 + i]
// patch_out [n·N, D], cls [D], pos [T, D] → x [n·T, D]
template <typename R>
void embed_forward(R* x, const R* patch_out, const R* cls, const R* pos, int64_t n, int64_t T, int64_t D) {
  for (int64_t b = 0; b < n; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const R* src = t == 0 ? cls : patch_out + (b * (T - 1) + t - 1) * D;
      R* dst = x + (b * T + t) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] + pos[t * D + d];
    }
}

// dcls += Σ_b dx[b, 0];   dpos[t] += Σ_b dx[b, t];   dpatch_out[b·N + i] += dx[b, 1 + i]
template <typename R>
void embed_backward(R* dpatch_out, R* dcls, R* dpos, const R* dx, int64_t n, int64_t T, int64_t D) {
  for (int64_t b = 0; b < n; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const R* g = dx + (b * T + t) * D;
      axpy(dpos + t * D, R(1), g, D);
      axpy(t == 0 ? dcls : dpatch_out + (b * (T - 1) + t - 1) * D, R(1), g, D);
    }
}

// out[r] = (in[r] − μ_r) · rstd_r · w + b,  μ_r = mean(in[r]), rstd_r = 1 / sqrt(var(in[r]) + eps)
// in, out [rows, D]; mean, rstd [rows] saved for the backward.
template <typename R>
void layer_norm_forward(R* out, R* mean, R* rstd, const R* in, const R* w, const R* b, int64_t rows,
                        int64_t D, R eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const R* x = in + r * D;
    R mu = 0;
    for (int64_t d = 0; d < D; ++d) mu += x[d];
    mu /= static_cast<R>(D);
    R var = 0;
    for (int64_t d = 0; d < D; ++d) var += (x[d] - mu) * (x[d] - mu);
    var /= static_cast<R>(D);
    const R s = R(1) / std::sqrt(var + eps);
    R* y = out + r * D;
    for (int64_t d = 0; d < D; ++d) y[d] = (x[d] - mu) * s * w[d] + b[d];
    mean[r] = mu;
    rstd[r] = s;
  }
}

// x̂ = (in − μ)·rstd, g = dout ⊙ w:   dw += Σ_r dout ⊙ x̂;   db += Σ_r dout;
// din += rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))
template <typename R>
void layer_norm_backward(R* din, R* dw, R* db, const R* dout, const R* in, const R* mean,
                         const R* rstd, const R* w, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const R* x = in + r * D;
    const R* dy = dout + r * D;
    const R mu = mean[r], s = rstd[r];
    R g_mean = 0, gx_mean = 0;
    for (int64_t d = 0; d < D; ++d) {
      const R xhat = (x[d] - mu) * s, g = dy[d] * w[d];
      g_mean += g;
      gx_mean += g * xhat;
      dw[d] += dy[d] * xhat;
      db[d] += dy[d];
    }
    g_mean /= static_cast<R>(D);
    gx_mean /= static_cast<R>(D);
    R* dx = din + r * D;
    for (int64_t d = 0; d < D; ++d) {
      const R xhat = (x[d] - mu) * s;
      dx[d] += s * (dy[d] * w[d] - g_mean - xhat * gx_mean);
    }
  }
}

// Multi-head attention of each sample over its T tokens; head h uses columns [h·hd, (h+1)·hd) of
// the query, key and value blocks of qkv [n·T, 3D]:
//   att[b, h, i, j] = softmax_j(q_i · k_j / sqrt(hd));   ctx[b·T + i, h·hd:] = Σ_j att[b, h, i, j] v_j
template <typename R>
void attention_forward(R* ctx, R* att, const R* qkv, int64_t n, int64_t T, int64_t D, int64_t H) {
  const int64_t hd = D / H, ld = 3 * D;
  const R scale = R(1) / std::sqrt(static_cast<R>(hd));
  for (int64_t b = 0; b < n; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const R* q = qkv + (b * T + i) * ld + h * hd;
        R* a = att + ((b * H + h) * T + i) * T;
        R mx = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          a[j] = scale * dot(q, qkv + (b * T + j) * ld + D + h * hd, hd);
          mx = std::max(mx, a[j]);
        }
        R sum = 0;
        for (int64_t j = 0; j < T; ++j) sum += a[j] = std::exp(a[j] - mx);
        const R inv = R(1) / sum;
        R* out = ctx + (b * T + i) * D + h * hd;
        std::fill(out, out + hd, R(0));
        for (int64_t j = 0; j < T; ++j) {
          a[j] *= inv;
          axpy(out, a[j], qkv + (b * T + j) * ld + 2 * D + h * hd, hd);
        }
      }
}

// With p = att[b, h, i, :] and g = dctx[b·T + i, h·hd:]:
//   dp_j = g · v_j;   dv_j += p_j g;   ds_j = p_j (dp_j − Σ_k p_k dp_k)   (softmax backward)
//   dq_i += scale Σ_j ds_j k_j;   dk_j += scale ds_j q_i          (scale = 1/sqrt(hd))
// dqkv [n·T, 3D] is laid out as qkv. row: scratch of T.
template <typename R>
void attention_backward(R* dqkv, R* row, const R* dctx, const R* att, const R* qkv, int64_t n,
                        int64_t T, int64_t D, int64_t H) {
  const int64_t hd = D / H, ld = 3 * D;
  const R scale = R(1) / std::sqrt(static_cast<R>(hd));
  for (int64_t b = 0; b < n; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const R* p = att + ((b * H + h) * T + i) * T;
        const R* g = dctx + (b * T + i) * D + h * hd;
        R pdp = 0;
        for (int64_t j = 0; j < T; ++j) {
          const int64_t rj = (b * T + j) * ld;
          row[j] = dot(g, qkv + rj + 2 * D + h * hd, hd);  // dp_j
          pdp += p[j] * row[j];
          axpy(dqkv + rj + 2 * D + h * hd, p[j], g, hd);  // dv_j
        }
        const R* q = qkv + (b * T + i) * ld + h * hd;
        R* dq = dqkv + (b * T + i) * ld + h * hd;
        for (int64_t j = 0; j < T; ++j) {
          const int64_t rj = (b * T + j) * ld;
          const R ds = scale * p[j] * (row[j] - pdp);
          axpy(dq, ds, qkv + rj + D + h * hd, hd);
          axpy(dqkv + rj + D + h * hd, ds, q, hd);
        }
      }
}

// out = in · Φ(in) = 0.5 in (1 + erf(in / √2))   (exact GELU), elementwise over n
template <typename R>
void gelu_forward(R* out, const R* in, int64_t n) {
  const R inv_sqrt2 = static_cast<R>(0.70710678118654752440);
  for (int64_t i = 0; i < n; ++i) out[i] = R(0.5) * in[i] * (R(1) + std::erf(in[i] * inv_sqrt2));
}

// din += dout · (Φ(in) + in φ(in)),  Φ the normal CDF, φ(x) = exp(−x²/2) / √(2π)
template <typename R>
void gelu_backward(R* din, const R* dout, const R* in, int64_t n) {
  const R inv_sqrt2 = static_cast<R>(0.70710678118654752440);
  const R inv_sqrt_2pi = static_cast<R>(0.39894228040143267794);
  for (int64_t i = 0; i < n; ++i) {
    const R x = in[i];
    const R cdf = R(0.5) * (R(1) + std::erf(x * inv_sqrt2));
    din[i] += dout[i] * (cdf + x * inv_sqrt_2pi * std::exp(R(-0.5) * x * x));
  }
}

// out += in  (a residual connection; its backward passes the gradient to both branches unchanged)
template <typename R>
void residual_forward(R* out, const R* in, int64_t n) {
  axpy(out, R(1), in, n);
}

// cls[b, :] = x[b·T, :]   (the class token of each sample);  backward: dx[b·T, :] += dcls[b, :]
template <typename R>
void gather_cls_forward(R* cls, const R* x, int64_t n, int64_t T, int64_t D) {
  for (int64_t b = 0; b < n; ++b) std::memcpy(cls + b * D, x + b * T * D, sizeof(R) * D);
}
template <typename R>
void gather_cls_backward(R* dx, const R* dcls, int64_t n, int64_t T, int64_t D) {
  for (int64_t b = 0; b < n; ++b) axpy(dx + b * T * D, R(1), dcls + b * D, D);
}

template <typename R>
void zero(std::vector<R>& v) {
  std::fill(v.begin(), v.end(), R(0));
}

}  // namespace

template <typename R>
void VitActivations<R>::resize(const TrainVitConfig& c, int64_t samples) {
  if (samples == n) return;
  n = samples;
  const int64_t L = c.num_hidden_layers, D = c.hidden_size, F = c.intermediate_size;
  const int64_t T = c.tokens(), N = c.num_patches(), H = c.num_attention_heads, K = c.num_labels;
  const int64_t nT = n * T;
  patches.assign(n * N * c.patch_dim(), 0);
  patch_out.assign(n * N * D, 0);
  x.assign((L + 1) * nT * D, 0);
  ln1.assign(L * nT * D, 0), ln1_mean.assign(L * nT, 0), ln1_rstd.assign(L * nT, 0);
  qkv.assign(L * nT * 3 * D, 0), att.assign(L * n * H * T * T, 0);
  ctx.assign(L * nT * D, 0), x_mid.assign(L * nT * D, 0);
  ln2.assign(L * nT * D, 0), ln2_mean.assign(L * nT, 0), ln2_rstd.assign(L * nT, 0);
  fc1.assign(L * nT * F, 0), gelu.assign(L * nT * F, 0);
  cls.assign(n * D, 0), norm_out.assign(n * D, 0), norm_mean.assign(n, 0), norm_rstd.assign(n, 0);
  logits.assign(n * K, 0);
  dx.assign(nT * D, 0), dln.assign(nT * D, 0), dqkv.assign(nT * 3 * D, 0), dctx.assign(nT * D, 0);
  dfc1.assign(nT * F, 0), dgelu.assign(nT * F, 0), dcls.assign(n * D, 0), dnorm_out.assign(n * D, 0);
  dpatch_out.assign(n * N * D, 0), dlogits.assign(n * K, 0), row.assign(T, 0);
}

template <typename R>
void vit_train_forward(const TrainVitConfig& c, const VitParams<R>& p, const R* pixels, int64_t n,
                       VitActivations<R>& a) {
  a.resize(c, n);
  const int64_t D = c.hidden_size, F = c.intermediate_size, T = c.tokens(), H = c.num_attention_heads;
  const int64_t N = c.num_patches(), P = c.patch_dim(), K = c.num_labels, nT = n * T;
  const R eps = static_cast<R>(c.layer_norm_eps);
  im2col_forward(a.patches.data(), pixels, n, c.num_channels, c.image_size, c.patch_size);
  linear_forward(a.patch_out.data(), a.patches.data(), p.patch_w, p.patch_b, n * N, P, D);
  embed_forward(a.x.data(), a.patch_out.data(), p.cls_token, p.pos_embed, n, T, D);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const VitLayerParams<R>& w = p.layers[l];
    const R* x = a.x.data() + l * nT * D;
    R* ln1 = a.ln1.data() + l * nT * D;
    R* qkv = a.qkv.data() + l * nT * 3 * D;
    R* ctx = a.ctx.data() + l * nT * D;
    R* x_mid = a.x_mid.data() + l * nT * D;
    R* ln2 = a.ln2.data() + l * nT * D;
    R* fc1 = a.fc1.data() + l * nT * F;
    R* gelu = a.gelu.data() + l * nT * F;
    R* x_next = a.x.data() + (l + 1) * nT * D;
    layer_norm_forward(ln1, a.ln1_mean.data() + l * nT, a.ln1_rstd.data() + l * nT, x, w.norm1_w,
                       w.norm1_b, nT, D, eps);
    linear_forward(qkv, ln1, w.qkv_w, w.qkv_b, nT, D, 3 * D);
    attention_forward(ctx, a.att.data() + l * n * H * T * T, qkv, n, T, D, H);
    linear_forward(x_mid, ctx, w.attn_out_w, w.attn_out_b, nT, D, D);
    residual_forward(x_mid, x, nT * D);
    layer_norm_forward(ln2, a.ln2_mean.data() + l * nT, a.ln2_rstd.data() + l * nT, x_mid,
                       w.norm2_w, w.norm2_b, nT, D, eps);
    linear_forward(fc1, ln2, w.fc1_w, w.fc1_b, nT, D, F);
    gelu_forward(gelu, fc1, nT * F);
    linear_forward(x_next, gelu, w.fc2_w, w.fc2_b, nT, F, D);
    residual_forward(x_next, x_mid, nT * D);
  }
  // Hugging Face normalises every token and classifies the class token; only the class token's
  // row reaches the logits, so only it is normalised here.
  gather_cls_forward(a.cls.data(), a.x.data() + c.num_hidden_layers * nT * D, n, T, D);
  layer_norm_forward(a.norm_out.data(), a.norm_mean.data(), a.norm_rstd.data(), a.cls.data(),
                     p.norm_w, p.norm_b, n, D, eps);
  linear_forward(a.logits.data(), a.norm_out.data(), p.head_w, p.head_b, n, D, K);
}

template <typename R>
void vit_train_backward(const TrainVitConfig& c, const VitParams<R>& p, const VitParams<R>& g,
                        VitActivations<R>& a, const R* dlogits) {
  const int64_t n = a.n;
  const int64_t D = c.hidden_size, F = c.intermediate_size, T = c.tokens(), H = c.num_attention_heads;
  const int64_t N = c.num_patches(), P = c.patch_dim(), K = c.num_labels, nT = n * T;
  zero(a.dnorm_out), zero(a.dcls), zero(a.dx);
  linear_backward(a.dnorm_out.data(), g.head_w, g.head_b, dlogits, a.norm_out.data(), p.head_w, n, D, K);
  layer_norm_backward(a.dcls.data(), g.norm_w, g.norm_b, a.dnorm_out.data(), a.cls.data(),
                      a.norm_mean.data(), a.norm_rstd.data(), p.norm_w, n, D);
  gather_cls_backward(a.dx.data(), a.dcls.data(), n, T, D);
  // a.dx holds dLoss/dx_{l+1}; each block adds its branches' gradients into it in reverse.
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    const VitLayerParams<R>& w = p.layers[l];
    const VitLayerParams<R>& gw = g.layers[l];
    const R* x = a.x.data() + l * nT * D;
    const R* ln1 = a.ln1.data() + l * nT * D;
    const R* qkv = a.qkv.data() + l * nT * 3 * D;
    const R* ctx = a.ctx.data() + l * nT * D;
    const R* x_mid = a.x_mid.data() + l * nT * D;
    const R* ln2 = a.ln2.data() + l * nT * D;
    const R* fc1 = a.fc1.data() + l * nT * F;
    const R* gelu = a.gelu.data() + l * nT * F;
    // x_next = x_mid + fc2(gelu(fc1(LN2(x_mid))))
    zero(a.dgelu), zero(a.dfc1), zero(a.dln);
    linear_backward(a.dgelu.data(), gw.fc2_w, gw.fc2_b, a.dx.data(), gelu, w.fc2_w, nT, F, D);
    gelu_backward(a.dfc1.data(), a.dgelu.data(), fc1, nT * F);
    linear_backward(a.dln.data(), gw.fc1_w, gw.fc1_b, a.dfc1.data(), ln2, w.fc1_w, nT, D, F);
    layer_norm_backward(a.dx.data(), gw.norm2_w, gw.norm2_b, a.dln.data(), x_mid,
                        a.ln2_mean.data() + l * nT, a.ln2_rstd.data() + l * nT, w.norm2_w, nT, D);
    // x_mid = x + attn_out(attention(qkv(LN1(x))))
    zero(a.dctx), zero(a.dqkv), zero(a.dln);
    linear_backward(a.dctx.data(), gw.attn_out_w, gw.attn_out_b, a.dx.data(), ctx, w.attn_out_w, nT, D, D);
    attention_backward(a.dqkv.data(), a.row.data(), a.dctx.data(), a.att.data() + l * n * H * T * T,
                       qkv, n, T, D, H);
    linear_backward(a.dln.data(), gw.qkv_w, gw.qkv_b, a.dqkv.data(), ln1, w.qkv_w, nT, D, 3 * D);
    layer_norm_backward(a.dx.data(), gw.norm1_w, gw.norm1_b, a.dln.data(), x,
                        a.ln1_mean.data() + l * nT, a.ln1_rstd.data() + l * nT, w.norm1_w, nT, D);
  }
  zero(a.dpatch_out);
  embed_backward(a.dpatch_out.data(), g.cls_token, g.pos_embed, a.dx.data(), n, T, D);
  linear_backward<R>(nullptr, g.patch_w, g.patch_b, a.dpatch_out.data(), a.patches.data(), p.patch_w,
                     n * N, P, D);
}

template <typename R>
double softmax_cross_entropy(const R* logits, const int64_t* labels, int64_t n, int64_t classes,
                             R scale, R* dlogits, int64_t* correct) {
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) {
    const R* z = logits + i * classes;
    const int64_t y = labels[i];
    check(y >= 0 && y < classes, "train: label " + std::to_string(y) + " is outside [0, " +
                                     std::to_string(classes) + ")");
    const int64_t best = std::max_element(z, z + classes) - z;
    if (correct && best == y) ++*correct;
    const R mx = z[best];
    R sum = 0;
    for (int64_t k = 0; k < classes; ++k) sum += std::exp(z[k] - mx);
    loss += static_cast<double>(std::log(sum) + mx - z[y]);
    if (dlogits)
      for (int64_t k = 0; k < classes; ++k)
        dlogits[i * classes + k] = scale * (std::exp(z[k] - mx) / sum - (k == y ? R(1) : R(0)));
  }
  return loss;
}

#define TESSERA_TRAIN_INSTANTIATE(R)                                                               \
  template VitParams<R> bind_params<R>(const TrainVitConfig&, R*);                                 \
  template void init_params<R>(const TrainVitConfig&, R*, uint64_t);                               \
  template struct VitActivations<R>;                                                               \
  template void vit_train_forward<R>(const TrainVitConfig&, const VitParams<R>&, const R*, int64_t, \
                                     VitActivations<R>&);                                          \
  template void vit_train_backward<R>(const TrainVitConfig&, const VitParams<R>&,                  \
                                      const VitParams<R>&, VitActivations<R>&, const R*);          \
  template double softmax_cross_entropy<R>(const R*, const int64_t*, int64_t, int64_t, R, R*, int64_t*);

TESSERA_TRAIN_INSTANTIATE(float)
TESSERA_TRAIN_INSTANTIATE(double)

}  // namespace tessera
