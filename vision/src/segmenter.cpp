// Segmenter (rstrudel/segmenter): config.json → SegmentationHead + encoder, and the forward pass
// of segm/model/segmenter.py, decoder.py and utils.py (padding, unpadding, sliding windows).
#include "tessera/segmentation.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "model_internal.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/kernels.hpp"
#include "tessera/parallel.hpp"

namespace tessera {
namespace detail {

namespace {

// timm-style pre-norm block weights under PREFIX (Segmenter's Block: norm1, attn.qkv, attn.proj,
// norm2, mlp.fc1, mlp.fc2), all with biases.
VitLayer load_block(Checkpoint& ck, const std::string& l, int64_t d, int64_t f, WeightType type) {
  VitLayer layer;
  layer.norm1_weight = ck.get(l + "norm1.weight", {d});
  layer.norm1_bias = ck.get(l + "norm1.bias", {d});
  layer.norm2_weight = ck.get(l + "norm2.weight", {d});
  layer.norm2_bias = ck.get(l + "norm2.bias", {d});
  layer.qkv = pack(ck, l + "attn.qkv.weight", l + "attn.qkv.bias", 3 * d, d, true, type);
  layer.attn_out = pack(ck, l + "attn.proj.weight", l + "attn.proj.bias", d, d, true, type);
  layer.fc1 = pack(ck, l + "mlp.fc1.weight", l + "mlp.fc1.bias", f, d, true, type);
  layer.fc2 = pack(ck, l + "mlp.fc2.weight", l + "mlp.fc2.bias", d, f, true, type);
  return layer;
}

// Segmenter's own VisionTransformer (segm/model/vit.py): keys encoder.patch_embed.proj,
// encoder.cls_token (+ encoder.dist_token), encoder.pos_embed [1, extra + grid, D],
// encoder.blocks.N, encoder.norm; encoder.head (+ head_dist) exist but are unused.
void load_segmenter_vit(VitWeights& w, const Config& enc, Checkpoint& ck, WeightType type) {
  VitConfig& c = w.config;
  auto [ih, iw] = enc.size2("image_size");
  c.image_height = ih, c.image_width = iw;
  c.patch_size = enc.positive("patch_size");
  check(ih % c.patch_size == 0 && iw % c.patch_size == 0,
        enc.file + ": image_size must be a multiple of patch_size");
  c.num_hidden_layers = enc.positive("n_layers");
  c.hidden_size = enc.positive("d_model");
  c.num_attention_heads = enc.positive("n_heads");
  c.intermediate_size = enc.integer("d_ff", 4 * c.hidden_size);
  check(c.hidden_size % c.num_attention_heads == 0,
        enc.file + ": d_model is not a multiple of n_heads");
  c.layer_norm_eps = static_cast<float>(enc.number("layer_norm_eps", 1e-5));
  c.num_channels = enc.integer("channels", 3);
  c.class_token = true;
  c.num_distillation_tokens = enc.boolean("distilled", false) ? 1 : 0;
  c.pos_resample = PosResample::SizeBilinear;  // resize_pos_embed, only when the count differs
  const int64_t d = c.hidden_size, p = c.patch_size, C = c.num_channels;
  const int64_t extra = c.num_prefix_tokens();
  w.pos_embed = tokens(ck, "encoder.pos_embed", extra + c.grid_height() * c.grid_width(), d);
  w.prefix_tokens = Tensor({extra, d});
  Tensor cls = tokens(ck, "encoder.cls_token", 1, d);
  std::memcpy(w.prefix_tokens.data(), cls.data(), sizeof(float) * d);
  if (c.num_distillation_tokens) {
    Tensor dist = tokens(ck, "encoder.dist_token", 1, d);
    std::memcpy(w.prefix_tokens.data() + d, dist.data(), sizeof(float) * d);
  }
  w.patch_embed = pack_weight(ck, "encoder.patch_embed.proj.weight", {d, C, p, p},
                              "encoder.patch_embed.proj.bias", edge_layer_type(type));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    w.layers.push_back(load_block(ck, "encoder.blocks." + std::to_string(i) + ".", d,
                                  c.intermediate_size, type));
  check(!ck.has("encoder.blocks." + std::to_string(c.num_hidden_layers) + ".norm1.weight"),
        ck.file + ": has more encoder blocks than n_layers = " + std::to_string(c.num_hidden_layers));
  w.final_norm_weight = ck.get("encoder.norm.weight", {d});
  w.final_norm_bias = ck.get("encoder.norm.bias", {d});
  // The ImageNet classifier of the pre-trained ViT: checked, not used for segmentation.
  for (const char* head : {"encoder.head", "encoder.head_dist"})
    if (ck.has(std::string(head) + ".weight")) {
      const int64_t n = ck.dim(std::string(head) + ".weight", 0, 2);
      ck.get(std::string(head) + ".weight", {n, d});
      ck.get(std::string(head) + ".bias", {n});
    }
}

}  // namespace

void load_segmenter(Model& m, const Config& cfg, Checkpoint& ck, WeightType type) {
  m.architecture = "Segmenter";
  auto head = std::make_shared<SegmentationHead>();
  SegmentationHead& h = *head;
  h.num_classes = cfg.positive("n_cls");
  if (cfg.has("inference")) {
    const Config inf = cfg.sub("inference");
    h.window_size = inf.positive("window_size");
    h.window_stride = inf.integer("window_stride", std::max<int64_t>(1, h.window_size * 2 / 3));
    check(h.window_stride > 0 && h.window_stride <= h.window_size,
          inf.file + ": inference.window_stride must be in 1..window_size, got " + std::to_string(h.window_stride));
  }
  const Config enc = cfg.sub("encoder");
  if (enc.has("backbone_config")) {
    // Another encoder Tessera loads, with its own key names under "encoder.".
    const Config bb = enc.sub("backbone_config");
    const std::string mt = bb.string("model_type", "");
    check(mt == "vit" || mt == "deit" || mt == "dinov2",
          bb.file + ": model_type \"" + mt + "\" is not supported as a Segmenter backbone "
          "(vit, deit, dinov2)");
    m.encoder.config = hf_vit_config(bb, mt);
    load_hf_encoder(m.encoder, ck, "encoder.", mt, type);
  } else {
    load_segmenter_vit(m.encoder, enc, ck, type);
  }
  const VitConfig& c = m.encoder.config;
  h.encoder_dim = c.hidden_size;
  h.num_extra_tokens = c.num_prefix_tokens();
  const int64_t n = h.num_classes, de = h.encoder_dim;
  // The decoder's transformer blocks take the dtype; its projections and the linear head are
  // edge layers (fp32 under int8), as the patch embedding and classifier heads everywhere.
  const WeightType edge = edge_layer_type(type);

  const Config dec = cfg.sub("decoder");
  const std::string name = dec.string("name", "");
  if (name == "linear") {
    h.decoder = SegmenterDecoder::Linear;
    h.head = pack(ck, "decoder.head.weight", "decoder.head.bias", n, de, true, edge);
  } else if (name == "mask_transformer") {
    h.decoder = SegmenterDecoder::MaskTransformer;
    h.d_model = dec.positive("d_model");
    h.n_heads = dec.positive("n_heads");
    h.d_ff = dec.positive("d_ff");
    h.layer_norm_eps = static_cast<float>(dec.number("layer_norm_eps", 1e-5));
    check(h.d_model % h.n_heads == 0, dec.file + ": d_model is not a multiple of n_heads");
    const int64_t layers = dec.positive("n_layers"), dm = h.d_model;
    h.proj_dec = pack(ck, "decoder.proj_dec.weight", "decoder.proj_dec.bias", dm, de, true, edge);
    h.cls_emb = tokens(ck, "decoder.cls_emb", n, dm);
    for (int64_t i = 0; i < layers; ++i)
      h.blocks.push_back(load_block(ck, "decoder.blocks." + std::to_string(i) + ".", dm, h.d_ff, type));
    check(!ck.has("decoder.blocks." + std::to_string(layers) + ".norm1.weight"),
          ck.file + ": has more decoder blocks than n_layers = " + std::to_string(layers));
    h.decoder_norm_weight = ck.get("decoder.decoder_norm.weight", {dm});
    h.decoder_norm_bias = ck.get("decoder.decoder_norm.bias", {dm});
    // x @ P is Linear with weight Pᵀ.
    for (auto [key, dst] : {std::pair{"decoder.proj_patch", &h.proj_patch},
                            std::pair{"decoder.proj_classes", &h.proj_classes}}) {
      Tensor p = ck.get(key, {dm, dm});
      Tensor t({dm, dm});
      for (int64_t i = 0; i < dm; ++i)
        for (int64_t j = 0; j < dm; ++j) t[j * dm + i] = p[i * dm + j];
      *dst = pack_linear(t.data(), nullptr, dm, dm, edge);
    }
    h.mask_norm_weight = ck.get("decoder.mask_norm.weight", {n});
    h.mask_norm_bias = ck.get("decoder.mask_norm.bias", {n});
  } else {
    fail(dec.file + ": decoder name \"" + name + "\" is not supported (linear, mask_transformer)");
  }
  // Strict: a tensor nobody reads means the config and the checkpoint disagree.
  for (const std::string& t : ck.st.names())
    check(ck.used.count(t) > 0, ck.file + ": unexpected tensor '" + t + "' for a Segmenter with " +
                                    name + " decoder (config and checkpoint disagree)");
  m.labels = labels_from(cfg.j, n, cfg.file);
  m.segmentation = std::move(head);
}

NamedTensors segmentation_forward(const Model& m, const Tensor& pixel_values, ModelWorkspace& ws) {
  return {{"logits", segmentation_logits(segmentation_masks(m, pixel_values, ws))}};
}

}  // namespace detail

namespace {

// Pre-norm transformer blocks over x [B*T, d] in place (the same computation as vit_forward's
// layers, for the mask transformer's patch + class tokens).
void run_blocks(const std::vector<VitLayer>& layers, float* x, int64_t B, int64_t T, int64_t d,
                int64_t heads, int64_t f, float eps) {
  const int64_t M = B * T, hd = d / heads;
  Tensor normed({M, d}), qkv({M, 3 * d}), context({M, d}), mlp({M, f});
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (const VitLayer& l : layers) {
    layer_norm(x, M, d, d, l.norm1_weight.data(), l.norm1_bias.data(), eps, normed.data(), d);
    linear(normed.data(), M, d, l.qkv, qkv.data(), 3 * d);
    const float* q = qkv.data();
    attention(B, heads, T, T, hd, {q, T * 3 * d, 3 * d}, {q + d, T * 3 * d, 3 * d},
              {q + 2 * d, T * 3 * d, 3 * d}, context.data(), T * d, d, scale);
    linear(context.data(), M, d, l.attn_out, x, d, Activation::None, x);
    layer_norm(x, M, d, d, l.norm2_weight.data(), l.norm2_bias.data(), eps, normed.data(), d);
    linear(normed.data(), M, d, l.fc1, mlp.data(), f, Activation::Gelu);
    linear(mlp.data(), M, f, l.fc2, x, d, Activation::None, x);
  }
}

// x[r] /= ||x[r]||₂ (torch: x / x.norm(dim=-1, keepdim=True), no epsilon).
void l2_normalize_rows(float* x, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * d;
    double s = 0;
    for (int64_t k = 0; k < d; ++k) s += static_cast<double>(v[k]) * v[k];
    const float norm = static_cast<float>(std::sqrt(s));
    for (int64_t k = 0; k < d; ++k) v[k] /= norm;
  }
}

// ATen upsample_bilinear2d taps along one axis (align_corners=False, sizes given): the same
// arithmetic as core's interpolate_bilinear.
struct LinearTaps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};
LinearTaps linear_taps(int64_t in, int64_t out) {
  LinearTaps t;
  t.i0.resize(out), t.i1.resize(out), t.w0.resize(out), t.w1.resize(out);
  const float scale = in == out ? 1.0f : static_cast<float>(in) / static_cast<float>(out);
  for (int64_t o = 0; o < out; ++o) {
    float real = static_cast<float>(static_cast<double>(scale) * (static_cast<double>(o) + 0.5) - 0.5);
    if (real < 0) real = 0;
    const int64_t i = std::min(static_cast<int64_t>(std::floor(real)), in - 1);
    const float frac = std::min(std::max(real - static_cast<float>(i), 0.0f), 1.0f);
    t.i0[o] = i, t.i1[o] = i + (i < in - 1 ? 1 : 0);
    t.w0[o] = 1.0f - frac, t.w1[o] = frac;
  }
  return t;
}

// dst[c][x] = src[c][i0[x]] w0[x] + src[c][i1[x]] w1[x] for `channels` rows src_stride apart.
void lerp_columns(const float* src, int64_t src_stride, int64_t channels, const LinearTaps& tx,
                  int64_t out_w, float* dst) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* s = src + c * src_stride;
    float* o = dst + c * out_w;
    for (int64_t x = 0; x < out_w; ++x) o[x] = s[tx.i0[x]] * tx.w0[x] + s[tx.i1[x]] * tx.w1[x];
  }
}

// Label map from a provider of the logits' rows at (H, W): row(r, out) fills out[c * W + x].
cv::Mat labels_from_rows(int64_t n_cls, int64_t H, int64_t W, int out_h, int out_w,
                         const std::function<void(int64_t, float*)>& row) {
  check(out_h > 0 && out_w > 0, "label map size must be positive");
  cv::Mat labels(out_h, out_w, n_cls <= 255 ? CV_8U : CV_16U);
  const LinearTaps ty = linear_taps(H, out_h), tx = linear_taps(W, out_w);
  const bool same = (H == out_h && W == out_w);
  std::vector<float> in_row(n_cls * W), a(n_cls * out_w), b(n_cls * out_w), mix(n_cls * out_w);
  int64_t have_a = -1, have_b = -1;
  auto resized_row = [&](int64_t r, std::vector<float>& dst) {
    row(r, in_row.data());
    lerp_columns(in_row.data(), W, n_cls, tx, out_w, dst.data());
  };
  for (int y = 0; y < out_h; ++y) {
    const float* v;
    if (same) {
      row(y, mix.data());
      v = mix.data();
    } else {
      const int64_t r0 = ty.i0[y], r1 = ty.i1[y];
      if (have_a != r0) {
        if (have_b == r0) std::swap(a, b), std::swap(have_a, have_b);
        else resized_row(r0, a), have_a = r0;
      }
      if (have_b != r1) resized_row(r1, b), have_b = r1;
      const float w0 = ty.w0[y], w1 = ty.w1[y];
      for (int64_t i = 0; i < n_cls * out_w; ++i) mix[i] = a[i] * w0 + b[i] * w1;
      v = mix.data();
    }
    for (int x = 0; x < out_w; ++x) {
      int best = 0;
      float best_v = v[x];
      for (int64_t c = 1; c < n_cls; ++c)
        if (v[c * out_w + x] > best_v) best_v = v[c * out_w + x], best = static_cast<int>(c);
      if (labels.depth() == CV_8U) labels.at<uint8_t>(y, x) = static_cast<uint8_t>(best);
      else labels.at<uint16_t>(y, x) = static_cast<uint16_t>(best);
    }
  }
  return labels;
}

}  // namespace

SegmentationMasks segmentation_masks(const Model& m, const Tensor& pixel_values, ModelWorkspace& ws) {
  check(m.segmentation != nullptr, m.dir + ": not a segmentation model");
  const SegmentationHead& h = *m.segmentation;
  const VitConfig& c = m.encoder.config;
  check(pixel_values.ndim() == 4 && pixel_values.dim(1) == c.num_channels,
        "pixel_values must be [batch, " + std::to_string(c.num_channels) + ", height, width], got " +
            shape_str(pixel_values.shape()));
  const int64_t B = pixel_values.dim(0), C = c.num_channels;
  const int64_t H = pixel_values.dim(2), W = pixel_values.dim(3), p = c.patch_size;
  // segm padding(): zeros bottom/right up to a multiple of the patch size.
  const int64_t Hp = (H + p - 1) / p * p, Wp = (W + p - 1) / p * p;
  Tensor padded = pixel_values;
  if (Hp != H || Wp != W) {
    padded = Tensor({B, C, Hp, Wp});
    for (int64_t bc = 0; bc < B * C; ++bc)
      for (int64_t y = 0; y < H; ++y)
        std::memcpy(padded.data() + (bc * Hp + y) * Wp, pixel_values.data() + (bc * H + y) * W,
                    sizeof(float) * W);
  }
  Tensor hidden = vit_forward(m.encoder, padded, ws.vit);
  const int64_t T = hidden.dim(1), de = hidden.dim(2), gh = Hp / p, gw = Wp / p, N = gh * gw;
  const int64_t n = h.num_classes, extra = h.num_extra_tokens;
  check(extra + N <= T, "encoder returned fewer tokens than patches");
  const float* x = hidden.data();

  // per-patch class scores [B, N, n_cls], then transposed to [B, n_cls, gh, gw]
  Tensor scores({B, N, n});
  if (h.decoder == SegmenterDecoder::Linear) {
    for (int64_t b = 0; b < B; ++b)
      linear(x + (b * T + extra) * de, N, de, h.head, scores.data() + b * N * n, n);
  } else {
    const int64_t dm = h.d_model, T2 = N + n;
    Tensor z({B * T2, dm});
    for (int64_t b = 0; b < B; ++b) {
      linear(x + (b * T + extra) * de, N, de, h.proj_dec, z.data() + b * T2 * dm, dm);
      std::memcpy(z.data() + (b * T2 + N) * dm, h.cls_emb.data(), sizeof(float) * n * dm);
    }
    run_blocks(h.blocks, z.data(), B, T2, dm, h.n_heads, h.d_ff, h.layer_norm_eps);
    layer_norm(z.data(), B * T2, dm, dm, h.decoder_norm_weight.data(), h.decoder_norm_bias.data(),
               h.layer_norm_eps, z.data(), dm);
    Tensor patches({N, dm}), classes({n, dm});
    for (int64_t b = 0; b < B; ++b) {
      const float* zb = z.data() + b * T2 * dm;
      linear(zb, N, dm, h.proj_patch, patches.data(), dm);
      linear(zb + N * dm, n, dm, h.proj_classes, classes.data(), dm);
      l2_normalize_rows(patches.data(), N, dm);
      l2_normalize_rows(classes.data(), n, dm);
      // masks = patches @ classesᵀ: a Linear whose weight is the class features.
      PackedLinear cls = pack_linear(classes.data(), nullptr, n, dm);
      linear(patches.data(), N, dm, cls, scores.data() + b * N * n, n);
    }
    layer_norm(scores.data(), B * N, n, n, h.mask_norm_weight.data(), h.mask_norm_bias.data(),
               h.layer_norm_eps, scores.data(), n);
  }
  SegmentationMasks out;
  out.masks = Tensor({B, n, gh, gw});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < n; ++k) out.masks[(b * n + k) * N + i] = scores[(b * N + i) * n + k];
  out.height = H, out.width = W, out.padded_height = Hp, out.padded_width = Wp;
  return out;
}

double segmentation_head_flops(const SegmentationHead& h, const VitConfig& encoder, int64_t height,
                               int64_t width) {
  auto linear_flops = [](const PackedLinear& l, double rows) {
    return 2.0 * rows * static_cast<double>(l.in_features) * static_cast<double>(l.out_features);
  };
  const int64_t p = encoder.patch_size;
  const double N = static_cast<double>(((height + p - 1) / p) * ((width + p - 1) / p));  // padded grid
  const double n = static_cast<double>(h.num_classes);
  if (h.decoder == SegmenterDecoder::Linear) return linear_flops(h.head, N);
  // MaskTransformer: proj_dec on the patches; blocks over patches + class embeddings; the two
  // projections; masks = patches · classesᵀ.
  const double T = N + n, dm = static_cast<double>(h.d_model);
  double flops = linear_flops(h.proj_dec, N);
  for (const VitLayer& l : h.blocks)
    flops += linear_flops(l.qkv, T) + 4 * T * T * dm + linear_flops(l.attn_out, T) +
             linear_flops(l.fc1, T) + linear_flops(l.fc2, T);
  flops += linear_flops(h.proj_patch, N) + linear_flops(h.proj_classes, n);
  return flops + 2 * N * n * dm;
}

Tensor segmentation_logits(const SegmentationMasks& s) {
  const int64_t B = s.masks.dim(0), n = s.masks.dim(1), gh = s.masks.dim(2), gw = s.masks.dim(3);
  const int64_t H = s.height, W = s.width, Hp = s.padded_height, Wp = s.padded_width;
  Tensor logits({B, n, H, W});
  Tensor full({n, Hp, Wp});
  for (int64_t b = 0; b < B; ++b) {
    interpolate_bilinear(s.masks.data() + b * n * gh * gw, n, gh, gw, full.data(), Hp, Wp, false);
    for (int64_t k = 0; k < n; ++k)  // segm unpadding(): crop bottom/right
      for (int64_t y = 0; y < H; ++y)
        std::memcpy(logits.data() + ((b * n + k) * H + y) * W, full.data() + (k * Hp + y) * Wp,
                    sizeof(float) * W);
  }
  return logits;
}

cv::Mat segmentation_labels(const SegmentationMasks& s, int64_t b, int out_h, int out_w) {
  const int64_t n = s.masks.dim(1), gh = s.masks.dim(2), gw = s.masks.dim(3);
  const int64_t H = s.height, W = s.width;
  check(b >= 0 && b < s.masks.dim(0), "segmentation_labels: image index out of range");
  // Columns first (patch grid → padded width, cropped to W) for every patch row, then rows.
  const LinearTaps tx = linear_taps(gw, s.padded_width), ty = linear_taps(gh, s.padded_height);
  std::vector<float> cols(n * gh * W);  // [n][gh][W]
  lerp_columns(s.masks.data() + b * n * gh * gw, gw, n * gh, tx, W, cols.data());
  return labels_from_rows(n, H, W, out_h, out_w, [&](int64_t r, float* out) {
    const int64_t r0 = ty.i0[r], r1 = ty.i1[r];
    const float w0 = ty.w0[r], w1 = ty.w1[r];
    for (int64_t k = 0; k < n; ++k) {
      const float* a = cols.data() + (k * gh + r0) * W;
      const float* c = cols.data() + (k * gh + r1) * W;
      float* o = out + k * W;
      for (int64_t x = 0; x < W; ++x) o[x] = a[x] * w0 + c[x] * w1;
    }
  });
}

cv::Mat segmentation_labels(const Tensor& logits, int64_t b, int out_h, int out_w) {
  check(logits.ndim() == 4, "logits must be [B, n_cls, H, W], got " + shape_str(logits.shape()));
  const int64_t n = logits.dim(1), H = logits.dim(2), W = logits.dim(3);
  const float* base = logits.data() + b * n * H * W;
  return labels_from_rows(n, H, W, out_h, out_w, [&](int64_t r, float* out) {
    for (int64_t k = 0; k < n; ++k) std::memcpy(out + k * W, base + (k * H + r) * W, sizeof(float) * W);
  });
}

Tensor segmentation_sliding_window(const Model& m, const Tensor& px, int64_t window, int64_t stride,
                                   ModelWorkspace& ws, int64_t batch) {
  check(px.ndim() == 4 && px.dim(0) == 1, "sliding-window inference takes one image [1, C, H, W]");
  check(window > 0 && stride > 0 && stride <= window,
        "sliding window: need 0 < stride <= window, got window " + std::to_string(window) +
            ", stride " + std::to_string(stride));
  check_token_budget(m.encoder.config.patch_size, window, window, "sliding window " + std::to_string(window));
  const int64_t C = px.dim(1), H0 = px.dim(2), W0 = px.dim(3);
  // segm resize(): enlarge so the short side is `window` (bilinear, int() of the long side).
  Tensor im = px;
  int64_t H = H0, W = W0;
  if (std::min(H0, W0) < window) {
    if (H0 < W0) H = window, W = static_cast<int64_t>(static_cast<double>(W0) / H0 * window);
    else W = window, H = static_cast<int64_t>(static_cast<double>(H0) / W0 * window);
    check(static_cast<double>(H) * static_cast<double>(W) <= static_cast<double>(kMaxImagePixels),
          "sliding window " + std::to_string(window) + ": enlarging a " + std::to_string(W0) + "x" + std::to_string(H0) +
              " input to " + std::to_string(W) + "x" + std::to_string(H) + " is more than the limit of " +
              std::to_string(kMaxImagePixels) + " pixels");
    im = Tensor({1, C, H, W});
    interpolate_bilinear(px.data(), C, H0, W0, im.data(), H, W, false);
  }
  auto anchors = [&](int64_t size) {
    std::vector<int64_t> a;
    for (int64_t v = 0; v < size; v += stride)
      if (v < size - window) a.push_back(v);
    a.push_back(size - window);
    return a;
  };
  std::vector<std::pair<int64_t, int64_t>> crops;
  for (int64_t ya : anchors(H))
    for (int64_t xa : anchors(W)) crops.emplace_back(ya, xa);
  const int64_t n = m.segmentation->num_classes;
  Tensor sum({1, n, H, W}), count({H, W});
  for (size_t first = 0; first < crops.size(); first += static_cast<size_t>(batch)) {
    const int64_t nb = std::min<int64_t>(batch, static_cast<int64_t>(crops.size() - first));
    Tensor x({nb, C, window, window});
    for (int64_t i = 0; i < nb; ++i) {
      auto [ya, xa] = crops[first + i];
      for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t y = 0; y < window; ++y)
          std::memcpy(x.data() + ((i * C + ch) * window + y) * window,
                      im.data() + (ch * H + ya + y) * W + xa, sizeof(float) * window);
    }
    Tensor logits = segmentation_logits(segmentation_masks(m, x, ws));
    for (int64_t i = 0; i < nb; ++i) {
      auto [ya, xa] = crops[first + i];
      for (int64_t k = 0; k < n; ++k)
        for (int64_t y = 0; y < window; ++y) {
          float* dst = sum.data() + (k * H + ya + y) * W + xa;
          const float* src = logits.data() + ((i * n + k) * window + y) * window;
          for (int64_t xx = 0; xx < window; ++xx) dst[xx] += src[xx];
        }
      for (int64_t y = 0; y < window; ++y)
        for (int64_t xx = 0; xx < window; ++xx) count[(ya + y) * W + xa + xx] += 1;
    }
  }
  for (int64_t k = 0; k < n; ++k)
    for (int64_t i = 0; i < H * W; ++i) sum[k * H * W + i] /= count[i];
  return sum;
}

cv::Mat segment_pixels(const Model& m, const Tensor& px, int out_height, int out_width, ModelWorkspace& ws) {
  check(m.segmentation != nullptr, m.dir + ": not a segmentation model");
  check(px.ndim() == 3, "segment_pixels takes one image [C, H, W], got " + shape_str(px.shape()));
  const Tensor x = px.reshape({1, px.dim(0), px.dim(1), px.dim(2)});
  const SegmentationHead& h = *m.segmentation;
  if (h.window_size > 0)
    return segmentation_labels(segmentation_sliding_window(m, x, h.window_size, h.window_stride, ws), 0,
                               out_height, out_width);
  return segmentation_labels(segmentation_masks(m, x, ws), 0, out_height, out_width);
}

}  // namespace tessera
