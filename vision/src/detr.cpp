// The DETR decoder head on a ViT (Tessera's "vit-detr" folders; Hugging Face DETR's config fields
// and weight names, transformers 4.36 DetrDecoder numerics): the encoder's patch tokens (class
// token dropped) → input_projection → memory; object queries start at zero and carry the learned
// query position embeddings; each decoder layer is post-norm self-attention, cross-attention to
// the memory (DETR's normalised 2D sine embedding of the patch grid added to the keys), ReLU FFN;
// a final layer norm; then class_labels_classifier (one linear) and the 3-layer sigmoid box MLP.
#include <cmath>
#include <cstring>

#include "detection_internal.hpp"
#include "model_internal.hpp"
#include "tessera/kernels.hpp"

namespace tessera {

Tensor detr_sine_position_embedding(int64_t gh, int64_t gw, int64_t d_model, float temperature) {
  check(d_model % 4 == 0, "DETR sine position embedding needs d_model divisible by 4, got " +
                              std::to_string(d_model));
  // float32 throughout, in the order transformers' DetrSinePositionEmbedding computes it.
  const int64_t half = d_model / 2;
  const float scale = static_cast<float>(2 * M_PI), eps = 1e-6f;
  std::vector<float> dim_t(half);
  for (int64_t i = 0; i < half; ++i)
    dim_t[i] = std::pow(temperature, static_cast<float>(2 * (i / 2)) / static_cast<float>(half));
  Tensor pos({gh * gw, d_model});
  for (int64_t y = 0; y < gh; ++y)
    for (int64_t x = 0; x < gw; ++x) {
      // cumsum of an all-ones mask, normalised by the last value: (i + 1) / (n + eps) * 2π
      const float ye = static_cast<float>(y + 1) / (static_cast<float>(gh) + eps) * scale;
      const float xe = static_cast<float>(x + 1) / (static_cast<float>(gw) + eps) * scale;
      float* row = pos.data() + (y * gw + x) * d_model;
      for (int64_t i = 0; i < half; ++i) {
        const float py = ye / dim_t[i], px = xe / dim_t[i];
        row[i] = (i % 2 == 0) ? std::sin(py) : std::cos(py);         // pos_y: sin, cos interleaved
        row[half + i] = (i % 2 == 0) ? std::sin(px) : std::cos(px);  // then pos_x
      }
    }
  return pos;
}

std::vector<int64_t> window_anchors(int64_t size, int64_t window, int64_t stride) {
  check(window > 0 && stride > 0 && stride <= window && size >= window,
        "windows: need 0 < stride <= window <= size, got window " + std::to_string(window) + ", stride " +
            std::to_string(stride) + ", size " + std::to_string(size));
  std::vector<int64_t> a;
  for (int64_t v = 0; v < size - window; v += stride) a.push_back(v);
  a.push_back(size - window);
  return a;
}

Tensor cut_windows(const Tensor& px, int64_t window, int64_t stride) {
  check(px.ndim() == 4, "cut_windows: pixel values must be [B, C, H, W]");
  const int64_t B = px.dim(0), C = px.dim(1), H = px.dim(2), W = px.dim(3);
  const std::vector<int64_t> ys = window_anchors(H, window, stride), xs = window_anchors(W, window, stride);
  const int64_t n = static_cast<int64_t>(ys.size() * xs.size());
  Tensor out({B * n, C, window, window});
  for (int64_t b = 0; b < B; ++b)
    for (size_t wy = 0; wy < ys.size(); ++wy)
      for (size_t wx = 0; wx < xs.size(); ++wx) {
        const int64_t i = b * n + static_cast<int64_t>(wy * xs.size() + wx);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t y = 0; y < window; ++y)
            std::memcpy(out.data() + ((i * C + c) * window + y) * window,
                        px.data() + ((b * C + c) * H + ys[wy] + y) * W + xs[wx], sizeof(float) * window);
      }
  return out;
}

void merge_windows(const float* rows, int64_t B, int64_t H, int64_t W, int64_t window, int64_t stride, int64_t patch,
                   int64_t tokens, int64_t first, int64_t d, float* out, bool centre) {
  check(patch > 0 && window % patch == 0 && stride % patch == 0 && H % patch == 0 && W % patch == 0,
        "merge_windows: window, stride and image size must be multiples of the patch");
  const std::vector<int64_t> ys = window_anchors(H, window, stride), xs = window_anchors(W, window, stride);
  const int64_t n = static_cast<int64_t>(ys.size() * xs.size()), g = window / patch;
  const int64_t gh = H / patch, gw = W / patch;
  check(tokens >= first + g * g, "merge_windows: a window has fewer rows than its patches");
  std::vector<float> count(static_cast<size_t>(gh * gw), 0.0f), tent(static_cast<size_t>(g));
  for (int64_t i = 0; i < g; ++i) tent[static_cast<size_t>(i)] = centre ? static_cast<float>(std::min(i, g - 1 - i) + 1) : 1.0f;
  std::fill_n(out, B * gh * gw * d, 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (size_t wy = 0; wy < ys.size(); ++wy)
      for (size_t wx = 0; wx < xs.size(); ++wx) {
        const float* src = rows + ((b * n + static_cast<int64_t>(wy * xs.size() + wx)) * tokens + first) * d;
        const int64_t py = ys[wy] / patch, px = xs[wx] / patch;
        for (int64_t y = 0; y < g; ++y)
          for (int64_t x = 0; x < g; ++x) {
            float* dst = out + ((b * gh + py + y) * gw + px + x) * d;
            const float* r = src + (y * g + x) * d;
            const float wgt = tent[static_cast<size_t>(y)] * tent[static_cast<size_t>(x)];
            for (int64_t k = 0; k < d; ++k) dst[k] += wgt * r[k];
            if (b == 0) count[static_cast<size_t>((py + y) * gw + px + x)] += wgt;
          }
      }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < gh * gw; ++i) {
      const float inv = 1.0f / count[static_cast<size_t>(i)];
      float* dst = out + (b * gh * gw + i) * d;
      for (int64_t k = 0; k < d; ++k) dst[k] *= inv;
    }
}

namespace detail {

bool window_merge_centre(const Config& win) {
  const std::string merge = win.string("merge", "mean");
  check(merge == "mean" || merge == "centre", win.file + ": merge \"" + brief_text(merge) + "\" is not one of mean, centre");
  return merge == "centre";
}

void load_vit_detr(Model& m, const Config& cfg, Checkpoint& ck, WeightType type) {
  Config bb = cfg.sub("backbone_config");
  const std::string bmt = bb.string("model_type", "vit");
  check(bmt == "vit" || bmt == "deit" || bmt == "dinov2",
        bb.file + ": model_type \"" + bmt + "\" is not supported as a DETR backbone (vit, deit, dinov2)");
  m.encoder.config = hf_vit_config(bb, bmt);
  load_hf_encoder(m.encoder, ck, bmt + ".", bmt, type);
  const int64_t denc = m.encoder.config.hidden_size;
  // The decoder layers take the dtype; the input projection and the heads are edge layers.
  const WeightType edge = edge_layer_type(type);

  auto head = std::make_shared<DetectionHead>();
  DetectionHead& h = *head;
  h.kind = DetectionKind::Detr;
  h.d_model = cfg.positive("d_model");
  h.num_slots = cfg.positive("num_queries");
  h.decoder_heads = cfg.positive("decoder_attention_heads");
  h.decoder_ffn = cfg.positive("decoder_ffn_dim");
  h.decoder_eps = static_cast<float>(cfg.number("decoder_layer_norm_eps", 1e-5));
  const int64_t D = h.d_model, L = cfg.positive("decoder_layers"), F = h.decoder_ffn;
  check(D % h.decoder_heads == 0, cfg.file + ": d_model " + std::to_string(D) +
                                      " is not a multiple of decoder_attention_heads " +
                                      std::to_string(h.decoder_heads));
  const std::string act = cfg.string("activation_function", "relu");
  check(act == "relu", cfg.file + ": activation_function \"" + brief_text(act) + "\" is not supported (relu)");
  const std::string pet = cfg.string("position_embedding_type", "sine");
  check(pet == "sine", cfg.file + ": position_embedding_type \"" + pet + "\" is not supported (sine)");

  // input_projection: a Linear [D, denc] or HF DETR's 1x1 convolution [D, denc, 1, 1].
  const Shape& ps = ck.shape("input_projection.weight");
  h.input_projection = pack_weight(ck, "input_projection.weight",
                                   ps.size() == 4 ? Shape{D, denc, 1, 1} : Shape{D, denc},
                                   "input_projection.bias", edge);
  h.query_pos = ck.get("model.query_position_embeddings.weight", {h.num_slots, D});

  for (int64_t i = 0; i < L; ++i) {
    const std::string l = "model.decoder.layers." + std::to_string(i) + ".";
    DetrDecoderLayer layer;
    layer.self_qk = pack_stacked(ck, {l + "self_attn.q_proj", l + "self_attn.k_proj"}, D, true, type);
    layer.self_v = pack(ck, l + "self_attn.v_proj.weight", l + "self_attn.v_proj.bias", D, D, true, type);
    layer.self_out = pack(ck, l + "self_attn.out_proj.weight", l + "self_attn.out_proj.bias", D, D, true, type);
    layer.self_norm_weight = ck.get(l + "self_attn_layer_norm.weight", {D});
    layer.self_norm_bias = ck.get(l + "self_attn_layer_norm.bias", {D});
    const std::string x = l + "encoder_attn.";
    layer.cross_q = pack(ck, x + "q_proj.weight", x + "q_proj.bias", D, D, true, type);
    layer.cross_k = pack(ck, x + "k_proj.weight", x + "k_proj.bias", D, D, true, type);
    layer.cross_v = pack(ck, x + "v_proj.weight", x + "v_proj.bias", D, D, true, type);
    layer.cross_out = pack(ck, x + "out_proj.weight", x + "out_proj.bias", D, D, true, type);
    layer.cross_norm_weight = ck.get(l + "encoder_attn_layer_norm.weight", {D});
    layer.cross_norm_bias = ck.get(l + "encoder_attn_layer_norm.bias", {D});
    layer.fc1 = pack(ck, l + "fc1.weight", l + "fc1.bias", F, D, true, type);
    layer.fc2 = pack(ck, l + "fc2.weight", l + "fc2.bias", D, F, true, type);
    layer.final_norm_weight = ck.get(l + "final_layer_norm.weight", {D});
    layer.final_norm_bias = ck.get(l + "final_layer_norm.bias", {D});
    h.layers.push_back(std::move(layer));
  }
  check(!ck.has("model.decoder.layers." + std::to_string(L) + ".fc1.weight"),
        ck.file + ": has more decoder layers than decoder_layers = " + std::to_string(L));
  h.decoder_norm_weight = ck.get("model.decoder.layernorm.weight", {D});
  h.decoder_norm_bias = ck.get("model.decoder.layernorm.bias", {D});
  h.norm_every_layer = cfg.boolean("auxiliary_loss", false);
  if (cfg.has("encoder_window")) {
    const Config win = cfg.sub("encoder_window");
    h.window = win.positive("size");
    h.window_stride = win.positive("stride");
    h.window_centre = window_merge_centre(win);
    const int64_t p = m.encoder.config.patch_size;
    check(h.window_stride <= h.window && h.window % p == 0 && h.window_stride % p == 0,
          win.file + ": encoder_window size " + std::to_string(h.window) + " and stride " +
              std::to_string(h.window_stride) + " must be multiples of the patch size " + std::to_string(p) +
              ", stride at most size");
    check(m.encoder.config.image_height == h.window && m.encoder.config.image_width == h.window,
          bb.file + ": image_size must be the encoder_window size " + std::to_string(h.window) + " (the encoder reads "
          "windows), got " + std::to_string(m.encoder.config.image_height) + "x" +
              std::to_string(m.encoder.config.image_width));
  }

  const Shape& cs = ck.shape("class_labels_classifier.weight");
  check(cs.size() == 2 && cs[0] >= 2 && cs[1] == D,
        ck.file + ": class_labels_classifier.weight must be [num_labels + 1, " + std::to_string(D) +
            "], got " + shape_str(cs));
  h.num_labels = cs[0] - 1;
  if (cfg.has("num_labels"))
    check(cfg.integer("num_labels") == h.num_labels,
          cfg.file + ": num_labels " + std::to_string(cfg.integer("num_labels")) +
              " but class_labels_classifier.weight has " + std::to_string(cs[0]) + " rows (num_labels + 1)");
  h.class_head.layers.push_back(
      pack(ck, "class_labels_classifier.weight", "class_labels_classifier.bias", h.num_labels + 1, D, true, edge));
  h.box_head = load_mlp_head(ck, "bbox_predictor.", 3, D, D, 4, type);
  m.labels = labels_from(cfg.j, h.num_labels, cfg.file);
  read_post_process(cfg, *head);
  m.detection = std::move(head);
}

}  // namespace detail

// memory rows [B*np, denc] → decoder output in ws.h [B*Q, D] (after the final layer norm).
void detr_decode(const DetectionHead& h, const float* encoder, int64_t B, int64_t T, int64_t denc,
                 int64_t first_patch, int64_t nh, int64_t nw, DetectionWorkspace& w) {
  const int64_t D = h.d_model, Q = h.num_slots, F = h.decoder_ffn, np = nh * nw;
  const int64_t heads = h.decoder_heads, hd = D / heads;
  if (w.head_id != h.id || w.batch != B || w.grid_h != nh || w.grid_w != nw) {
    w.head_id = h.id;
    w.batch = B, w.grid_h = nh, w.grid_w = nw;
    w.memory = Tensor({B * np, D});
    w.memory_pos = Tensor({B * np, D});
    w.cross_k = Tensor({B * np, D});
    w.cross_v = Tensor({B * np, D});
    w.pos = detr_sine_position_embedding(nh, nw, D, h.sine_temperature);
    w.h = Tensor({B * Q, D});
    w.a = Tensor({B * Q, D});
    w.qk = Tensor({B * Q, 2 * D});
    w.v = Tensor({B * Q, D});
    w.context = Tensor({B * Q, D});
    w.ffn = Tensor({B * Q, F});
  }
  float* mem = w.memory.data();
  float* mem_pos = w.memory_pos.data();
  for (int64_t b = 0; b < B; ++b)
    linear(encoder + (b * T + first_patch) * denc, np, denc, h.input_projection, mem + b * np * D, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < np * D; ++i) mem_pos[b * np * D + i] = mem[b * np * D + i] + w.pos[i];

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* x = w.h.data();
  float* a = w.a.data();
  float* qk = w.qk.data();
  float* v = w.v.data();
  float* ctx = w.context.data();
  const float* qpos = h.query_pos.data();
  const int64_t M = B * Q;
  std::fill(x, x + M * D, 0.0f);  // DetrDecoder: inputs_embeds = zeros_like(query_position_embeddings)
  auto add_query_pos = [&] {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Q * D; ++i) a[b * Q * D + i] = x[b * Q * D + i] + qpos[i];
  };
  for (const DetrDecoderLayer& l : h.layers) {
    // self-attention: q, k from h + qpos; v from h
    add_query_pos();
    linear(a, M, D, l.self_qk, qk, 2 * D);
    linear(x, M, D, l.self_v, v, D);
    attention(B, heads, Q, Q, hd, {qk, Q * 2 * D, 2 * D}, {qk + D, Q * 2 * D, 2 * D}, {v, Q * D, D},
              ctx, Q * D, D, scale);
    linear(ctx, M, D, l.self_out, x, D, Activation::None, x);
    layer_norm(x, M, D, D, l.self_norm_weight.data(), l.self_norm_bias.data(), h.decoder_eps, x, D);
    // cross-attention: q from h + qpos; k from memory + sine; v from memory
    add_query_pos();
    linear(a, M, D, l.cross_q, v, D);  // v holds the queries here
    linear(mem_pos, B * np, D, l.cross_k, w.cross_k.data(), D);
    // A windowed encoder's rows know only their place in their window: values carry the sine code too.
    linear(h.window > 0 ? mem_pos : mem, B * np, D, l.cross_v, w.cross_v.data(), D);
    attention(B, heads, Q, np, hd, {v, Q * D, D}, {w.cross_k.data(), np * D, D},
              {w.cross_v.data(), np * D, D}, ctx, Q * D, D, scale);
    linear(ctx, M, D, l.cross_out, x, D, Activation::None, x);
    layer_norm(x, M, D, D, l.cross_norm_weight.data(), l.cross_norm_bias.data(), h.decoder_eps, x, D);
    // feed-forward
    linear(x, M, D, l.fc1, w.ffn.data(), F, Activation::Relu);
    linear(w.ffn.data(), M, F, l.fc2, x, D, Activation::None, x);
    layer_norm(x, M, D, D, l.final_norm_weight.data(), l.final_norm_bias.data(), h.decoder_eps, x, D);
    if (h.norm_every_layer)  // DetrDecoder with auxiliary_loss: hidden_states = self.layernorm(hidden_states)
      layer_norm(x, M, D, D, h.decoder_norm_weight.data(), h.decoder_norm_bias.data(), h.decoder_eps, x, D);
  }
  layer_norm(x, M, D, D, h.decoder_norm_weight.data(), h.decoder_norm_bias.data(), h.decoder_eps, x, D);
}

}  // namespace tessera
