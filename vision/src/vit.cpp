#include "tessera/vit.hpp"

#include <atomic>

#include "tessera/limits.hpp"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/kernels.hpp"
#include "tessera/parallel.hpp"

namespace tessera {

uint64_t new_weights_id() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}


int64_t vit_num_tokens(const VitConfig& c, int64_t height, int64_t width) {
  return c.num_prefix_tokens() + (height / c.patch_size) * (width / c.patch_size) +
         c.num_detection_tokens;
}

void check_token_budget(int64_t p, int64_t height, int64_t width, const std::string& what) {
  if (p <= 0 || height <= 0 || width <= 0) return;  // nothing to run: the caller's own checks say so
  const int64_t limit = max_tokens();
  const int64_t tokens = (height / p) * (width / p);  // sides <= 2^31: no overflow
  if (tokens <= limit) return;
  // The largest multiple of p of the same aspect ratio whose tokens fit.
  const double f = std::sqrt(static_cast<double>(limit) / static_cast<double>(tokens));
  const int64_t h = std::max<int64_t>(p, static_cast<int64_t>(static_cast<double>(height / p) * f) * p);
  const int64_t w = std::max<int64_t>(p, static_cast<int64_t>(static_cast<double>(width / p) * f) * p);
  fail(what + ": a " + std::to_string(width) + "x" + std::to_string(height) + " (WxH) model input makes " +
       std::to_string(tokens) + " tokens of " + std::to_string(p) + "x" + std::to_string(p) +
       " pixels, more than the limit of " + std::to_string(limit) + "; resize it to at most " + std::to_string(w) +
       "x" + std::to_string(h) + ", or raise --max-tokens / TESSERA_MAX_TOKENS");
}

double vit_flops(const VitConfig& c, int64_t height, int64_t width) {
  const double p = static_cast<double>(c.patch_size);
  const double np = static_cast<double>((height / c.patch_size) * (width / c.patch_size));
  const double t = static_cast<double>(vit_num_tokens(c, height, width));
  const double d = static_cast<double>(c.hidden_size), f = static_cast<double>(c.intermediate_size);
  double per_layer = 2 * t * d * (3 * d + d + 2 * f)  // qkv, output projection, fc1, fc2
                     + 4 * t * t * d;                 // q·kᵀ and attention·v
  return 2 * np * d * c.num_channels * p * p + c.num_hidden_layers * per_layer;
}

namespace {

// Copies rows [first, first+count) of a [rows, D] tensor into dst.
void copy_rows(const Tensor& src, int64_t first, int64_t count, int64_t dim, float* dst) {
  if (count > 0) std::memcpy(dst, src.data() + first * dim, sizeof(float) * count * dim);
}

// Resamples a [gh*gw, D] grid of position embeddings to [nh*nw, D] with the upstream's rule.
void resample_grid(const VitConfig& c, const float* grid, int64_t pixel_h, int64_t pixel_w,
                   int64_t nh, int64_t nw, float* out) {
  const int64_t gh = c.grid_height(), gw = c.grid_width(), d = c.hidden_size;
  const bool same = (gh == nh && gw == nw);
  bool resample = false;
  switch (c.pos_resample) {
    case PosResample::None:
      check(same, "this model takes " + std::to_string(c.image_height) + "x" +
                      std::to_string(c.image_width) + " inputs only, got " +
                      std::to_string(pixel_h) + "x" + std::to_string(pixel_w));
      break;
    case PosResample::HfScaleBicubic:
      // transformers: no interpolation when num_patches == num_positions and height == width.
      resample = !(nh * nw == gh * gw && pixel_h == pixel_w);
      break;
    case PosResample::SizeBicubic:
    case PosResample::TimmAntialias:
      resample = !same;
      break;
    case PosResample::SizeBilinear:
      // Segmenter resizes only when the token count differs.
      resample = nh * nw != gh * gw;
      break;
  }
  if (!resample) {
    check(nh * nw == gh * gw, "position embedding grid mismatch");
    std::memcpy(out, grid, sizeof(float) * nh * nw * d);
    return;
  }
  // [N, D] → [D, gh, gw] → interpolate → [D, nh, nw] → [nh*nw, D]
  Tensor chw({d, gh, gw}), resized({d, nh, nw});
  for (int64_t i = 0; i < gh * gw; ++i)
    for (int64_t k = 0; k < d; ++k) chw[k * gh * gw + i] = grid[i * d + k];
  switch (c.pos_resample) {
    case PosResample::HfScaleBicubic: {
      // HF reshapes to a sqrt(N) square and passes scale_factor = (n + 0.1) / sqrt(N).
      check(gh == gw, "HF position-embedding interpolation needs a square training grid");
      const double side = std::sqrt(static_cast<double>(gh * gw));
      const double sh = (static_cast<double>(nh) + 0.1) / side;
      const double sw = (static_cast<double>(nw) + 0.1) / side;
      check(static_cast<int64_t>(std::floor(side * sh)) == nh &&
                static_cast<int64_t>(std::floor(side * sw)) == nw,
            "position-embedding interpolation size mismatch");
      interpolate_bicubic(chw.data(), d, gh, gw, resized.data(), nh, nw, false, sh, sw);
      break;
    }
    case PosResample::SizeBicubic:
      interpolate_bicubic(chw.data(), d, gh, gw, resized.data(), nh, nw, false);
      break;
    case PosResample::TimmAntialias:
      interpolate_bicubic_antialias(chw.data(), d, gh, gw, resized.data(), nh, nw);
      break;
    case PosResample::SizeBilinear:
      interpolate_bilinear(chw.data(), d, gh, gw, resized.data(), nh, nw, false);
      break;
    case PosResample::None:
      break;
  }
  for (int64_t i = 0; i < nh * nw; ++i)
    for (int64_t k = 0; k < d; ++k) out[i * d + k] = resized[k * nh * nw + i];
}

// x = x * sigmoid(1.702 x), CLIP's QuickGELU.
void quick_gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + std::exp(-1.702f * x[i]));
}

// Row r of [M, 2F] holds [a, b]; its first F entries become silu(a) * b.
void swiglu_rows(float* x, int64_t rows, int64_t f) {
  parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* a = x + r * 2 * f;
      const float* b = a + f;
      for (int64_t j = 0; j < f; ++j) a[j] = a[j] / (1.0f + std::exp(-a[j])) * b[j];
    }
  });
}

// probs[b, i, j] = mean over heads of softmax_j(scale · q[b,i,h] · k[b,j,h]), from the fused qkv rows.
void attention_probabilities(const float* qkv, int64_t B, int64_t T, int64_t heads, int64_t hd,
                             float scale, float* probs) {
  const int64_t d = heads * hd;
  parallel_for(0, B * T, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(T);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T;
      const float* q = qkv + r * 3 * d;
      float* out = probs + r * T;
      std::fill(out, out + T, 0.0f);
      for (int64_t h = 0; h < heads; ++h) {
        float mx = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          const float* k = qkv + (b * T + j) * 3 * d + d + h * hd;
          float s = 0;
          for (int64_t e = 0; e < hd; ++e) s += q[h * hd + e] * k[e];
          row[j] = s * scale;
          mx = std::max(mx, row[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < T; ++j) sum += row[j] = std::exp(row[j] - mx);
        for (int64_t j = 0; j < T; ++j) out[j] += static_cast<float>(row[j] / sum / heads);
      }
    }
  });
}

}  // namespace

Tensor vit_position_embedding(const VitWeights& w, int64_t height, int64_t width) {
  return vit_position_embedding(w, w.pos_embed, height, width);
}

Tensor vit_position_embedding(const VitWeights& w, const Tensor& table, int64_t height,
                              int64_t width) {
  const VitConfig& c = w.config;
  const int64_t d = c.hidden_size, p = c.patch_size;
  const int64_t nh = height / p, nw = width / p;
  const int64_t prefix = c.num_prefix_tokens(), det = c.num_detection_tokens;
  const int64_t prefix_pos = c.prefix_has_pos_embed ? prefix : 0;
  const int64_t grid = c.grid_height() * c.grid_width();
  Tensor pos({vit_num_tokens(c, height, width), d});  // zero rows where a token has none
  copy_rows(table, 0, prefix_pos, d, pos.data());
  resample_grid(c, table.data() + prefix_pos * d, height, width, nh, nw, pos.data() + prefix * d);
  copy_rows(table, prefix_pos + grid, det, d, pos.data() + (prefix + nh * nw) * d);
  return pos;
}

Tensor vit_forward(const VitWeights& w, const Tensor& pixel_values, VitWorkspace& ws) {
  const VitConfig& c = w.config;
  if (pixel_values.ndim() != 4 || pixel_values.dim(1) != c.num_channels)  // no message unless failing
    fail("pixel_values must be [batch, " + std::to_string(c.num_channels) +
         ", height, width], got " + shape_str(pixel_values.shape()));
  const int64_t B = pixel_values.dim(0), H = pixel_values.dim(2), W = pixel_values.dim(3);
  const int64_t p = c.patch_size, C = c.num_channels, d = c.hidden_size;
  const int64_t f = c.intermediate_size, heads = c.num_attention_heads, hd = c.head_dim();
  if (H < p || W < p)
    fail("input " + std::to_string(H) + "x" + std::to_string(W) + " is smaller than one " +
         std::to_string(p) + "-pixel patch");
  check_token_budget(p, H, W, "vit_forward");  // the last line of defence: callers check with a file name
  const int64_t nh = H / p, nw = W / p, np = nh * nw;
  const int64_t prefix = c.num_prefix_tokens();
  const int64_t T = vit_num_tokens(c, H, W);
  const int64_t M = B * T;

  if (ws.weights_id != w.id || ws.batch != B || ws.height != H || ws.width != W) {
    const bool record_attention = ws.record_attention;  // a setting, not a size: keep it
    ws = VitWorkspace{};
    ws.record_attention = record_attention;
    ws.weights_id = w.id;
    ws.batch = B, ws.height = H, ws.width = W, ws.tokens = T;
    ws.patches = Tensor({B * np, C * p * p});
    ws.hidden = Tensor({M, d});
    ws.embedded = Tensor({B * np, d});
    ws.qkv = Tensor({M, 3 * d});
    ws.context = Tensor({M, d});
    ws.mlp = Tensor({M, c.activation == MlpActivation::SwiGlu ? 2 * f : f});
    ws.pos = vit_position_embedding(w, H, W);
    for (const Tensor& table : w.mid_pos_embed)
      ws.mid_pos.push_back(vit_position_embedding(w, table, H, W));
  }

  // Patch embedding: im2col (rows = patches in raster order, columns = c, ky, kx as in the
  // convolution weight), then one GEMM.
  const float* px = pixel_values.data();
  float* patches = ws.patches.data();
  const int64_t kdim = C * p * p;
  parallel_for(0, B * nh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / nh, py = r % nh;
      for (int64_t pxi = 0; pxi < nw; ++pxi) {
        float* row = patches + ((b * np) + py * nw + pxi) * kdim;
        for (int64_t ch = 0; ch < C; ++ch)
          for (int64_t ky = 0; ky < p; ++ky)
            std::memcpy(row + (ch * p + ky) * p,
                        px + ((b * C + ch) * H + py * p + ky) * W + pxi * p, sizeof(float) * p);
      }
    }
  });
  float* x = ws.hidden.data();
  // One GEMM over all B*Np patches (one big GEMM splits across threads better than B small
  // ones), then each image's rows go in place.
  float* embedded = ws.embedded.data();
  linear(patches, B * np, kdim, w.patch_embed, embedded, d);
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x + b * T * d;
    copy_rows(w.prefix_tokens, 0, prefix, d, xb);
    std::memcpy(xb + prefix * d, embedded + b * np * d, sizeof(float) * np * d);
    copy_rows(w.detection_tokens, 0, c.num_detection_tokens, d, xb + (prefix + np) * d);
    const float* pos = ws.pos.data();
    for (int64_t i = 0; i < T * d; ++i) xb[i] += pos[i];
  }
  if (c.pre_norm)
    layer_norm(x, M, d, d, w.pre_norm_weight.data(), w.pre_norm_bias.data(), c.layer_norm_eps, x,
               d);

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // Reduced-precision models (bf16, int8) take bf16 attention where the CPU runs it natively;
  // elsewhere fp32 attention is both faster and more accurate than emulating bf16.
  const WeightType block_type = w.layers.empty() ? WeightType::F32 : w.layers[0].qkv.type;
  const AttentionPrecision attention_precision =
      block_type != WeightType::F32 && native_bf16_attention() ? AttentionPrecision::BF16
                                                               : AttentionPrecision::F32;
  ws.attention.clear();
  float* qkv = ws.qkv.data();
  float* context = ws.context.data();
  float* mlp = ws.mlp.data();
  for (size_t li = 0; li < w.layers.size(); ++li) {
    const VitLayer& layer = w.layers[li];
    if (li > 0 && !ws.mid_pos.empty()) {  // YOLOS: hidden += mid_pos[li - 1] after each layer but the last
      const float* mid = ws.mid_pos[li - 1].data();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < T * d; ++i) x[b * T * d + i] += mid[i];
    }
    // Both layer norms are fused into the next linear's packing of x.
    const RowNorm norm1{layer.norm1_weight.data(), layer.norm1_bias.data(), c.layer_norm_eps};
    const RowNorm norm2{layer.norm2_weight.data(), layer.norm2_bias.data(), c.layer_norm_eps};
    linear(x, M, d, layer.qkv, qkv, 3 * d, Activation::None, nullptr, &norm1);
    if (ws.record_attention) {
      ws.attention.emplace_back(Shape{B, T, T});
      attention_probabilities(qkv, B, T, heads, hd, scale, ws.attention.back().data());
    }
    attention(B, heads, T, T, hd, {qkv, T * 3 * d, 3 * d}, {qkv + d, T * 3 * d, 3 * d},
              {qkv + 2 * d, T * 3 * d, 3 * d}, context, T * d, d, scale, attention_precision);
    linear(context, M, d, layer.attn_out, x, d, Activation::None, x);
    int64_t ld_mlp = f;
    switch (c.activation) {
      case MlpActivation::Gelu:
        linear(x, M, d, layer.fc1, mlp, f, Activation::Gelu, nullptr, &norm2);
        break;
      case MlpActivation::QuickGelu:
        linear(x, M, d, layer.fc1, mlp, f, Activation::None, nullptr, &norm2);
        quick_gelu(mlp, M * f);
        break;
      case MlpActivation::SwiGlu:
        ld_mlp = 2 * f;
        linear(x, M, d, layer.fc1, mlp, 2 * f, Activation::None, nullptr, &norm2);
        swiglu_rows(mlp, M, f);
        break;
    }
    linear(mlp, M, ld_mlp, layer.fc2, x, d, Activation::None, x);
  }
  if (c.final_norm)
    layer_norm(x, M, d, d, w.final_norm_weight.data(), w.final_norm_bias.data(), c.layer_norm_eps,
               x, d);
  return ws.hidden.reshape({B, T, d});
}

}  // namespace tessera
