// The ViT classifier's training pass (tessera/vit_train.hpp): the forward of vit.cpp over unpacked
// weights, saving activations, and its backward, both on core's training kernels (backward.hpp).
#include "tessera/vit_train.hpp"

#include "model_internal.hpp"
#include "train_internal.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "tessera/backward.hpp"
#include "tessera/atomic_file.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;

namespace tessera {
namespace {

using detail::Config;

// The per-layer names of each family (DINOv2 has its own, and layer scale).
struct LayerNames {
  const char *norm1, *norm2, *fc1, *fc2;
};
LayerNames layer_names(const VitConfig& c) {
  if (c.activation == MlpActivation::SwiGlu) return {"norm1", "norm2", "mlp.weights_in", "mlp.weights_out"};
  if (c.layer_scale) return {"norm1", "norm2", "mlp.fc1", "mlp.fc2"};
  return {"layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"};
}

// The checkpoint names and shapes of the classifier, in buffer order: query, key, value weights
// adjacent (one [3D, D] GEMM weight), then their biases (one [3D] bias).
std::vector<TrainParam> vit_train_layout(const VitConfig& c, const std::string& base,
                                         int64_t num_labels, bool class_mean, bool mask_token,
                                         bool teacher = false, int64_t representation = 0) {
  const int64_t d = c.hidden_size, f = c.intermediate_size, p = c.patch_size;
  // The table's rows: the prefix tokens' (unless timm's no_embed_class), the grid, YOLOS's tokens.
  const int64_t t = (c.prefix_has_pos_embed ? c.num_prefix_tokens() : 0) + c.grid_height() * c.grid_width() +
                    c.num_detection_tokens;
  std::vector<TrainParam> out;
  int64_t offset = 0;
  auto add = [&](const std::string& name, Shape shape, bool decay) {
    TrainParam tp{name, std::move(shape), offset, decay};
    offset += tp.numel();
    out.push_back(std::move(tp));
  };
  const std::string e = base + "embeddings.";
  if (c.class_token) add(e + "cls_token", {1, 1, d}, false);
  if (c.num_register_tokens) add(e + "register_tokens", {1, c.num_register_tokens, d}, false);
  if (c.num_detection_tokens) add(e + "detection_tokens", {1, c.num_detection_tokens, d}, false);
  if (c.num_distillation_tokens) add(e + "distillation_token", {1, 1, d}, false);
  if (mask_token) add(e + "mask_token", {1, d}, false);  // DINOv2's, unused here; kept for export
  add(e + "position_embeddings", {1, t, d}, false);
  if (c.mid_position_embeddings)  // YOLOS: one table per block but the last
    add(base + "encoder.mid_position_embeddings", {c.num_hidden_layers - 1, 1, t, d}, false);
  add(e + "patch_embeddings.projection.weight", {d, c.num_channels, p, p}, true);
  if (c.patch_bias) add(e + "patch_embeddings.projection.bias", {d}, false);
  if (c.pre_norm) {  // timm's norm_pre (CLIP towers), after the position embedding
    add(base + "pre_layernorm.weight", {d}, false);
    add(base + "pre_layernorm.bias", {d}, false);
  }
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = base + "encoder.layer." + std::to_string(i) + ".";
    const std::string a = l + "attention.attention.";
    const LayerNames n = layer_names(c);
    add(l + n.norm1 + ".weight", {d}, false);
    add(l + n.norm1 + ".bias", {d}, false);
    for (const char* part : {"query", "key", "value"}) add(a + part + ".weight", {d, d}, true);
    if (c.qkv_bias)
      for (const char* part : {"query", "key", "value"}) add(a + part + ".bias", {d}, false);
    add(l + "attention.output.dense.weight", {d, d}, true);
    add(l + "attention.output.dense.bias", {d}, false);
    if (c.layer_scale) add(l + "layer_scale1.lambda1", {d}, false);
    add(l + n.norm2 + ".weight", {d}, false);
    add(l + n.norm2 + ".bias", {d}, false);
    const int64_t f1 = c.activation == MlpActivation::SwiGlu ? 2 * f : f;  // SwiGLU: [a, b] of F each
    add(l + n.fc1 + ".weight", {f1, d}, true);
    add(l + n.fc1 + ".bias", {f1}, false);
    add(l + n.fc2 + ".weight", {d, f}, true);
    add(l + n.fc2 + ".bias", {d}, false);
    if (c.layer_scale) add(l + "layer_scale2.lambda1", {d}, false);
  }
  add(base + "layernorm.weight", {d}, false);
  add(base + "layernorm.bias", {d}, false);
  if (c.num_detection_tokens) {  // YolosForObjectDetection: two 3-layer MLP heads
    for (const char* head : {"class_labels_classifier", "bbox_predictor"})
      for (int i = 0; i < 3; ++i) {
        const int64_t o = i < 2 ? d : std::string(head) == "bbox_predictor" ? 4 : num_labels + 1;
        const std::string l = std::string(head) + ".layers." + std::to_string(i) + ".";
        add(l + "weight", {o, d}, true);
        add(l + "bias", {o}, false);
      }
    return out;
  }
  if (teacher) {  // DeiTForImageClassificationWithTeacher
    add("cls_classifier.weight", {num_labels, d}, true);
    add("cls_classifier.bias", {num_labels}, false);
    add("distillation_classifier.weight", {num_labels, d}, true);
    add("distillation_classifier.bias", {num_labels}, false);
    return out;
  }
  if (representation > 0) {  // torchvision's heads.pre_logits (then tanh)
    add("pre_logits.weight", {representation, d}, true);
    add("pre_logits.bias", {representation}, false);
  }
  add("classifier.weight", {num_labels, representation > 0 ? representation : class_mean ? 2 * d : d}, true);
  add("classifier.bias", {num_labels}, false);
  return out;
}

}  // namespace

namespace detail {
double shortest(float x) {
  char buf[32];
  for (int digits = 1; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(x));
    if (std::strtof(buf, nullptr) == x) break;
  }
  return std::strtod(buf, nullptr);
}

nlohmann::ordered_json hf_train_config(const VitConfig& c, const std::string& architecture,
                                       const std::string& model_type, const nlohmann::ordered_json& image_size,
                                       const std::vector<std::string>& labels, const nlohmann::ordered_json& head,
                                       const nlohmann::ordered_json& tail) {
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object(), label2id = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) {
    id2label[std::to_string(i)] = labels[i];
    label2id[labels[i]] = i;
  }
  nlohmann::ordered_json j = {
      {"architectures", {architecture}},
      {"model_type", model_type},
      {"image_size", image_size},
      {"patch_size", c.patch_size},
      {"num_channels", c.num_channels},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"intermediate_size", c.intermediate_size},
      {"hidden_act", "gelu"},
      {"hidden_dropout_prob", 0.0},
      {"attention_probs_dropout_prob", 0.0},
      {"initializer_range", 0.02},
      {"layer_norm_eps", shortest(c.layer_norm_eps)},
      {"qkv_bias", c.qkv_bias},
  };
  for (const auto& [key, value] : head.items()) j[key] = value;
  j["id2label"] = id2label;
  j["label2id"] = label2id;
  for (const auto& [key, value] : tail.items()) j[key] = value;
  j["torch_dtype"] = "float32";
  return j;
}

std::vector<TrainParam> vit_train_params(const VitConfig& c, const std::string& base, int64_t num_labels,
                                         bool mask_token) {
  return vit_train_layout(c, base, num_labels, false, mask_token);
}
namespace {

// One fused-qkv checkpoint layout: each tensor's name (".weight" / ".bias" appended, except the
// qkv pair, spelled out); a block's names follow `block` + its index + ".".
struct FusedLayout {
  std::string patch, cls, pos, block, norm1, qkv_weight, qkv_bias, proj, norm2, fc1, fc2, final_norm, head;
  std::string pre_logits = "";  // torchvision's representation layer, when the model has one
  // timm only: register tokens, LayerScale (blocks.N.ls1.gamma / ls2.gamma), fc_norm, no class token
  bool timm = false;
  std::string reg = "reg_token";
  std::string dist = "dist_token";
};

std::vector<NameMap> fused_names(const VitTrainModel& m, const FusedLayout& n) {
  const VitConfig& c = m.config;
  // timm's distilled DeiT (VisionTransformerDistilled): dist_token and head_dist, trained as the
  // DeiT with teacher it is (cls_classifier = head, distillation_classifier = head_dist).
  const bool distilled = n.timm && m.teacher && c.num_distillation_tokens == 1 && c.class_token && !m.pool_avg;
  check((c.num_distillation_tokens == 0 || distilled) && c.num_detection_tokens == 0 && !m.class_mean &&
            (!m.teacher || distilled) &&
            (n.timm || (c.class_token && c.num_register_tokens == 0 && !c.layer_scale && !m.pool_avg && !m.fc_norm)),
        "fused_names: only an encoder with a classifier on its class token (or, for timm, on the mean of its "
        "patches, or timm's distilled DeiT) maps to timm / torchvision names");
  const int64_t d = c.hidden_size, f = c.intermediate_size, p = c.patch_size;
  const int64_t t = (c.prefix_has_pos_embed ? c.num_prefix_tokens() : 0) + c.grid_height() * c.grid_width();
  const std::string e = m.base + "embeddings.";
  std::vector<NameMap> out = {
      {n.patch + ".weight", {d, c.num_channels, p, p}, {e + "patch_embeddings.projection.weight"}},
  };
  if (c.patch_bias) out.push_back({n.patch + ".bias", {d}, {e + "patch_embeddings.projection.bias"}});
  if (c.class_token) out.push_back({n.cls, {1, 1, d}, {e + "cls_token"}});
  if (distilled) out.push_back({n.dist, {1, 1, d}, {e + "distillation_token"}});
  if (c.num_register_tokens) out.push_back({n.reg, {1, c.num_register_tokens, d}, {e + "register_tokens"}});
  out.push_back({n.pos, {1, t, d}, {e + "position_embeddings"}});
  if (c.pre_norm) {
    check(n.timm, "fused_names: norm_pre is timm's");
    out.push_back({"norm_pre.weight", {d}, {m.base + "pre_layernorm.weight"}});
    out.push_back({"norm_pre.bias", {d}, {m.base + "pre_layernorm.bias"}});
  }
  const LayerNames ln = layer_names(c);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string s = n.block + std::to_string(i) + ".";
    const std::string h = m.base + "encoder.layer." + std::to_string(i) + ".";
    const std::string a = h + "attention.attention.";
    out.push_back({s + n.norm1 + ".weight", {d}, {h + ln.norm1 + ".weight"}});
    out.push_back({s + n.norm1 + ".bias", {d}, {h + ln.norm1 + ".bias"}});
    out.push_back({s + n.qkv_weight, {3 * d, d}, {a + "query.weight", a + "key.weight", a + "value.weight"}});
    if (c.qkv_bias) out.push_back({s + n.qkv_bias, {3 * d}, {a + "query.bias", a + "key.bias", a + "value.bias"}});
    out.push_back({s + n.proj + ".weight", {d, d}, {h + "attention.output.dense.weight"}});
    out.push_back({s + n.proj + ".bias", {d}, {h + "attention.output.dense.bias"}});
    if (c.layer_scale) out.push_back({s + "ls1.gamma", {d}, {h + "layer_scale1.lambda1"}});
    out.push_back({s + n.norm2 + ".weight", {d}, {h + ln.norm2 + ".weight"}});
    out.push_back({s + n.norm2 + ".bias", {d}, {h + ln.norm2 + ".bias"}});
    out.push_back({s + n.fc1 + ".weight", {f, d}, {h + ln.fc1 + ".weight"}});
    out.push_back({s + n.fc1 + ".bias", {f}, {h + ln.fc1 + ".bias"}});
    out.push_back({s + n.fc2 + ".weight", {d, f}, {h + ln.fc2 + ".weight"}});
    out.push_back({s + n.fc2 + ".bias", {d}, {h + ln.fc2 + ".bias"}});
    if (c.layer_scale) out.push_back({s + "ls2.gamma", {d}, {h + "layer_scale2.lambda1"}});
  }
  // timm with fc_norm has no final norm; the one norm of the training pass is then fc_norm.
  const std::string norm = m.fc_norm ? "fc_norm" : n.final_norm;
  out.push_back({norm + ".weight", {d}, {m.base + "layernorm.weight"}});
  out.push_back({norm + ".bias", {d}, {m.base + "layernorm.bias"}});
  const int64_t rep = m.representation_size;
  if (rep > 0) {
    check(!n.pre_logits.empty(), "fused_names: this layout has no representation layer");
    out.push_back({n.pre_logits + ".weight", {rep, d}, {"pre_logits.weight"}});
    out.push_back({n.pre_logits + ".bias", {rep}, {"pre_logits.bias"}});
  }
  if (distilled) {
    out.push_back({n.head + ".weight", {m.num_labels, d}, {"cls_classifier.weight"}});
    out.push_back({n.head + ".bias", {m.num_labels}, {"cls_classifier.bias"}});
    out.push_back({n.head + "_dist.weight", {m.num_labels, d}, {"distillation_classifier.weight"}});
    out.push_back({n.head + "_dist.bias", {m.num_labels}, {"distillation_classifier.bias"}});
    return out;
  }
  out.push_back({n.head + ".weight", {m.num_labels, rep > 0 ? rep : d}, {"classifier.weight"}});
  out.push_back({n.head + ".bias", {m.num_labels}, {"classifier.bias"}});
  return out;
}

}  // namespace

std::vector<NameMap> timm_style_names(const VitTrainModel& m, const std::string& prefix, const std::string& head) {
  FusedLayout n{prefix + "patch_embed.proj", prefix + "cls_token", prefix + "pos_embed", prefix + "blocks.",
                "norm1", "attn.qkv.weight", "attn.qkv.bias", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2",
                prefix + "norm", head};
  n.timm = true;
  n.reg = prefix + "reg_token";
  n.dist = prefix + "dist_token";
  return fused_names(m, n);
}

std::vector<NameMap> torchvision_names(const VitTrainModel& m, const std::string& root, bool legacy_mlp) {
  return fused_names(m, {root + "conv_proj", root + "class_token", root + "encoder.pos_embedding",
                         root + "encoder.layers.encoder_layer_", "ln_1", "self_attention.in_proj_weight",
                         "self_attention.in_proj_bias", "self_attention.out_proj", "ln_2",
                         legacy_mlp ? "mlp.linear_1" : "mlp.0", legacy_mlp ? "mlp.linear_2" : "mlp.3",
                         root + "encoder.ln", root + "heads.head", root + "heads.pre_logits"});
}

int64_t mapped_offset(const VitTrainModel& m, const NameMap& n, const std::string& what) {
  int64_t offset = m.param(n.parts.front()).offset, next = offset, total = 0;
  for (const std::string& part : n.parts) {
    const TrainParam& p = m.param(part);
    check(p.offset == next, what + ": '" + part + "' is not adjacent to the rest of " + n.name);
    next += p.numel(), total += p.numel();
  }
  check(total == shape_numel(n.shape), what + ": " + n.name + " has another size than its parts");
  return offset;
}

}  // namespace detail

namespace {

// y[M,N] = x[M,K]·W[N,K]ᵀ + b on the packed GEMM. Weights change every step, so they are packed
// for each call (a fraction of the GEMM's own cost at training batch sizes).
const auto& linear_forward = detail::train_linear;

// Layer scale: z = x·Wᵀ + b [M, D] (kept for the backward), out = residual + λ ⊙ z.
void add_scaled(const float* residual, const PackedLinear& w, const float* x, int64_t M, int64_t K,
                const float* lambda, float* z, float* out) {
  const int64_t d = w.out_features;
  linear(x, M, K, w, z, d);
  parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < d; ++k) out[r * d + k] = residual[r * d + k] + lambda[k] * z[r * d + k];
  });
}

// Backward of out = residual + λ ⊙ z: dλ[D] += Σ_rows dy ⊙ z (rows in order), dz = λ ⊙ dy
// (written to dz, returned).
const float* scale_backward(const float* dy, const float* z, const float* lambda, int64_t M,
                            int64_t d, float* dz, float* dlambda) {
  parallel_for(0, d, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t r = 0; r < M; ++r)
      for (int64_t k = k0; k < k1; ++k) {
        dlambda[k] += dy[r * d + k] * z[r * d + k];
        dz[r * d + k] = lambda[k] * dy[r * d + k];
      }
  });
  return dz;
}

void zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }

// Hugging Face ViT's interpolate_pos_encoding (vit.cpp's PosResample::HfScaleBicubic, which
// model_forward applies whenever the input is not the training size): the patch grid of the
// table, bicubic with scale_factor (n + 0.1)/sqrt(N), unless the patch count matches and the
// input is square. Returns false when the table is used as it is.
bool hf_resample(const VitConfig& c, int64_t height, int64_t width, Interpolation& how) {
  const int64_t gh = c.grid_height(), gw = c.grid_width();
  const int64_t nh = height / c.patch_size, nw = width / c.patch_size;
  if (nh * nw == gh * gw && height == width) return false;
  check(gh == gw, "HF position-embedding interpolation needs a square training grid");
  const double side = std::sqrt(static_cast<double>(gh * gw));
  how.mode = InterpolationMode::Bicubic;
  how.align_corners = false;
  how.scale_h = (static_cast<double>(nh) + 0.1) / side;
  how.scale_w = (static_cast<double>(nw) + 0.1) / side;
  check(static_cast<int64_t>(std::floor(side * how.scale_h)) == nh &&
            static_cast<int64_t>(std::floor(side * how.scale_w)) == nw,
        "position-embedding interpolation size mismatch");
  return true;
}

// The position grid's resampling at height x width, as inference does it (vit.cpp resample_grid,
// by c.pos_resample), or false when the table is used as it is. YOLOS (model.detection) resizes
// by size always.
bool train_resample(const VitTrainModel& m, int64_t height, int64_t width, Interpolation& how) {
  const VitConfig& c = m.config;
  const int64_t gh = c.grid_height(), gw = c.grid_width();
  const int64_t nh = height / c.patch_size, nw = width / c.patch_size;
  if (m.detection) return true;  // Bicubic by size (how's defaults)
  switch (c.pos_resample) {
    case PosResample::None:
      check(gh == nh && gw == nw, "this model takes " + std::to_string(c.image_height) + "x" +
                                      std::to_string(c.image_width) + " inputs only, got " + std::to_string(height) +
                                      "x" + std::to_string(width));
      return false;
    case PosResample::HfScaleBicubic:
      return hf_resample(c, height, width, how);
    case PosResample::SizeBicubic:
      return !(gh == nh && gw == nw);
    case PosResample::TimmAntialias:
      how.mode = InterpolationMode::BicubicAntialias;
      return !(gh == nh && gw == nw);
    case PosResample::SizeBilinear:
      how.mode = InterpolationMode::Bilinear;
      return nh * nw != gh * gw;
  }
  return false;
}

// pos [T, D] for a height x width input: the prefix tokens' rows (zero when the table has none,
// timm's no_embed_class), then the (resampled) grid, then YOLOS's detection rows.
// `table` [prefix rows, grid, detection rows]: the position embeddings or one of YOLOS's mid tables.
void position_embedding_forward(const VitTrainModel& m, const float* table, int64_t height, int64_t width,
                                float* pos) {
  const VitConfig& c = m.config;
  const int64_t d = c.hidden_size, g = c.grid_height() * c.grid_width();
  const int64_t nh = height / c.patch_size, nw = width / c.patch_size;
  const int64_t pre = c.num_prefix_tokens(), pre_rows = c.prefix_has_pos_embed ? pre : 0;
  std::fill(pos, pos + pre * d, 0.0f);
  std::copy(table, table + pre_rows * d, pos);
  const float* grid = table + pre_rows * d;
  if (m.detection) {
    const int64_t det = c.num_detection_tokens;
    std::copy(grid + g * d, grid + (g + det) * d, pos + (pre + nh * nw) * d);
  }
  Interpolation how;
  if (!train_resample(m, height, width, how)) {
    std::copy(grid, grid + g * d, pos + pre * d);
    return;
  }
  // [N, D] → [D, gh, gw] → interpolate → [D, nh, nw] → [nh·nw, D]
  std::vector<float> chw(static_cast<size_t>(d * g)), resized(static_cast<size_t>(d * nh * nw));
  for (int64_t i = 0; i < g; ++i)
    for (int64_t k = 0; k < d; ++k) chw[k * g + i] = grid[i * d + k];
  interpolate_forward(how, chw.data(), d, c.grid_height(), c.grid_width(), resized.data(), nh, nw);
  for (int64_t i = 0; i < nh * nw; ++i)
    for (int64_t k = 0; k < d; ++k) pos[(pre + i) * d + k] = resized[k * nh * nw + i];
}

// dtable += the position table's share of dpos [T, D].
void position_embedding_backward(const VitTrainModel& m, int64_t height, int64_t width,
                                 const float* dpos, float* dtable) {
  const VitConfig& c = m.config;
  const int64_t d = c.hidden_size, g = c.grid_height() * c.grid_width();
  const int64_t nh = height / c.patch_size, nw = width / c.patch_size;
  const int64_t pre = c.num_prefix_tokens(), pre_rows = c.prefix_has_pos_embed ? pre : 0;
  for (int64_t k = 0; k < pre_rows * d; ++k) dtable[k] += dpos[k];
  float* dgrid_table = dtable + pre_rows * d;
  if (m.detection) {
    const int64_t det = c.num_detection_tokens;
    for (int64_t k = 0; k < det * d; ++k) dgrid_table[g * d + k] += dpos[(pre + nh * nw) * d + k];
  }
  Interpolation how;
  if (!train_resample(m, height, width, how)) {
    for (int64_t i = 0; i < g * d; ++i) dgrid_table[i] += dpos[pre * d + i];
    return;
  }
  std::vector<float> dchw(static_cast<size_t>(d * nh * nw)), dgrid(static_cast<size_t>(d * g), 0.0f);
  for (int64_t i = 0; i < nh * nw; ++i)
    for (int64_t k = 0; k < d; ++k) dchw[k * nh * nw + i] = dpos[(pre + i) * d + k];
  interpolate_backward(how, dchw.data(), d, c.grid_height(), c.grid_width(), nh, nw, dgrid.data());
  for (int64_t i = 0; i < g; ++i)
    for (int64_t k = 0; k < d; ++k) dgrid_table[i * d + k] += dgrid[k * g + i];
}

}  // namespace

namespace detail {

void vit_block_forward(const VitTrainLayerView& lw, const BlockDims& s, VitTrainActivations::Layer& a, float* next) {
  const int64_t B = s.batch, T = s.tokens, d = s.dim, f = s.mlp, heads = s.heads, hd = d / heads, M = B * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  layer_norm_forward(a.x.data(), M, d, lw.norm1_w, lw.norm1_b, s.eps, a.ln1.data(), a.mean1.data(), a.rstd1.data());
  linear_forward(a.ln1.data(), M, lw.qkv_w, lw.qkv_b, 3 * d, d, a.qkv.data());
  const float* qkv = a.qkv.data();
  attention_forward(B, heads, T, T, hd, {qkv, T * 3 * d, 3 * d}, {qkv + d, T * 3 * d, 3 * d},
                    {qkv + 2 * d, T * 3 * d, 3 * d}, {a.ctx.data(), T * d, d}, scale, a.lse.data());
  // x_mid = x + attn_out(ctx)  (DINOv2: x + λ₁ ⊙ attn_out(ctx))
  const PackedLinear out_proj = detail::train_pack(lw.attn_out_w, lw.attn_out_b, d, d);
  if (lw.ls1)
    add_scaled(a.x.data(), out_proj, a.ctx.data(), M, d, lw.ls1, a.z1.data(), a.x_mid.data());
  else
    linear(a.ctx.data(), M, d, out_proj, a.x_mid.data(), d, Activation::None, a.x.data());
  layer_norm_forward(a.x_mid.data(), M, d, lw.norm2_w, lw.norm2_b, s.eps, a.ln2.data(), a.mean2.data(),
                     a.rstd2.data());
  if (s.swiglu) {
    linear_forward(a.ln2.data(), M, lw.fc1_w, lw.fc1_b, 2 * f, d, a.h.data());
    swiglu_forward(a.h.data(), a.a.data(), M, f);
  } else {
    linear_forward(a.ln2.data(), M, lw.fc1_w, lw.fc1_b, f, d, a.h.data());
    if (s.quick_gelu)
      quick_gelu_forward(a.h.data(), a.a.data(), M * f);
    else
      gelu_forward(a.h.data(), a.a.data(), M * f);
  }
  const PackedLinear fc2 = detail::train_pack(lw.fc2_w, lw.fc2_b, d, f);
  if (lw.ls2)
    add_scaled(a.x_mid.data(), fc2, a.a.data(), M, f, lw.ls2, a.z2.data(), next);
  else
    linear(a.a.data(), M, f, fc2, next, d, Activation::None, a.x_mid.data());
}

void vit_block_backward(const VitTrainLayerView& lw, const VitTrainLayerView& lg, const BlockDims& s,
                        VitTrainActivations::Layer& a, VitTrainActivations& acts) {
  const int64_t B = s.batch, T = s.tokens, d = s.dim, f = s.mlp, heads = s.heads, hd = d / heads, M = B * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // dx holds dL/dx_{l+1}; x_{l+1} = x_mid + fc2(gelu(fc1(LN₂ x_mid))). da, dh, dln, dctx and
  // dqkv are written whole by the first kernel that reaches them (GradInto::Set), not zeroed.
  const float* dbranch = acts.dx.data();  // DINOv2: through λ₂ first
  if (lw.ls2) dbranch = scale_backward(acts.dx.data(), a.z2.data(), lw.ls2, M, d, acts.dz.data(), lg.ls2);
  linear_backward(a.a.data(), lw.fc2_w, dbranch, M, d, f, acts.da.data(), lg.fc2_w, lg.fc2_b, GradInto::Set);
  if (s.swiglu) {
    zero(acts.dh);
    swiglu_backward(a.h.data(), acts.da.data(), acts.dh.data(), M, f);
  } else if (s.quick_gelu) {
    zero(acts.dh);
    quick_gelu_backward(a.h.data(), acts.da.data(), acts.dh.data(), M * f);
  } else {
    gelu_backward(a.h.data(), acts.da.data(), acts.dh.data(), M * f, GradInto::Set);
  }
  linear_backward(a.ln2.data(), lw.fc1_w, acts.dh.data(), M, s.swiglu ? 2 * f : f, d, acts.dln.data(), lg.fc1_w,
                  lg.fc1_b, GradInto::Set);
  layer_norm_backward(acts.dln.data(), a.x_mid.data(), a.mean2.data(), a.rstd2.data(), lw.norm2_w, M, d,
                      acts.dx.data(), lg.norm2_w, lg.norm2_b);
  // dx holds dL/dx_mid; x_mid = x + attn_out(attention(qkv(LN₁ x))).
  dbranch = acts.dx.data();
  if (lw.ls1) dbranch = scale_backward(acts.dx.data(), a.z1.data(), lw.ls1, M, d, acts.dz.data(), lg.ls1);
  linear_backward(a.ctx.data(), lw.attn_out_w, dbranch, M, d, d, acts.dctx.data(), lg.attn_out_w, lg.attn_out_b,
                  GradInto::Set);
  const float* qkv = a.qkv.data();
  float* dqkv = acts.dqkv.data();
  attention_backward(B, heads, T, T, hd, {qkv, T * 3 * d, 3 * d}, {qkv + d, T * 3 * d, 3 * d},
                     {qkv + 2 * d, T * 3 * d, 3 * d}, {a.ctx.data(), T * d, d}, {acts.dctx.data(), T * d, d},
                     a.lse.data(), scale, {dqkv, T * 3 * d, 3 * d}, {dqkv + d, T * 3 * d, 3 * d},
                     {dqkv + 2 * d, T * 3 * d, 3 * d}, GradInto::Set);
  linear_backward(a.ln1.data(), lw.qkv_w, dqkv, M, 3 * d, d, acts.dln.data(), lg.qkv_w, lg.qkv_b, GradInto::Set);
  layer_norm_backward(acts.dln.data(), a.x.data(), a.mean1.data(), a.rstd1.data(), lw.norm1_w, M, d,
                      acts.dx.data(), lg.norm1_w, lg.norm1_b);
}

}  // namespace detail

const TrainParam& VitTrainModel::param(const std::string& name) const {
  for (const TrainParam& p : params)
    if (p.name == name) return p;
  fail("the model has no parameter '" + name + "'");
}

std::span<float> VitTrainModel::view(std::span<float> buffer, const std::string& name) const {
  const TrainParam& p = param(name);
  return buffer.subspan(static_cast<size_t>(p.offset), static_cast<size_t>(p.numel()));
}

std::span<const float> VitTrainModel::view(std::span<const float> buffer,
                                           const std::string& name) const {
  const TrainParam& p = param(name);
  return buffer.subspan(static_cast<size_t>(p.offset), static_cast<size_t>(p.numel()));
}

VitTrainView bind_view(const VitTrainModel& m, float* buffer) {
  auto at = [&](const std::string& name) { return buffer + m.param(name).offset; };
  VitTrainView v{};
  const std::string e = m.base + "embeddings.";
  v.cls_token = m.config.class_token ? at(e + "cls_token") : nullptr;
  v.dist_token = m.config.num_distillation_tokens ? at(e + "distillation_token") : nullptr;
  v.reg_tokens = m.config.num_register_tokens ? at(e + "register_tokens") : nullptr;
  v.pos_embed = at(e + "position_embeddings");
  v.patch_w = at(e + "patch_embeddings.projection.weight");
  v.patch_b = m.config.patch_bias ? at(e + "patch_embeddings.projection.bias") : nullptr;
  if (m.config.pre_norm) v.pre_norm_w = at(m.base + "pre_layernorm.weight"), v.pre_norm_b = at(m.base + "pre_layernorm.bias");
  for (int64_t i = 0; i < m.config.num_hidden_layers; ++i) {
    const std::string l = m.base + "encoder.layer." + std::to_string(i) + ".";
    const LayerNames n = layer_names(m.config);
    VitTrainLayerView lv{};
    lv.norm1_w = at(l + n.norm1 + ".weight");
    lv.norm1_b = at(l + n.norm1 + ".bias");
    lv.qkv_w = at(l + "attention.attention.query.weight");
    lv.qkv_b = m.config.qkv_bias ? at(l + "attention.attention.query.bias") : nullptr;
    lv.attn_out_w = at(l + "attention.output.dense.weight");
    lv.attn_out_b = at(l + "attention.output.dense.bias");
    lv.norm2_w = at(l + n.norm2 + ".weight");
    lv.norm2_b = at(l + n.norm2 + ".bias");
    lv.fc1_w = at(l + n.fc1 + ".weight");
    lv.fc1_b = at(l + n.fc1 + ".bias");
    lv.fc2_w = at(l + n.fc2 + ".weight");
    lv.fc2_b = at(l + n.fc2 + ".bias");
    lv.ls1 = m.config.layer_scale ? at(l + "layer_scale1.lambda1") : nullptr;
    lv.ls2 = m.config.layer_scale ? at(l + "layer_scale2.lambda1") : nullptr;
    v.layers.push_back(lv);
  }
  v.norm_w = at(m.base + "layernorm.weight");
  v.norm_b = at(m.base + "layernorm.bias");
  if (m.headless) {  // the head's own pass binds its parameters
    v.head_w = v.head_b = v.head2_w = v.head2_b = nullptr;
  } else if (m.detection) {
    v.det_tokens = at(e + "detection_tokens");
    v.head_w = v.head_b = v.head2_w = v.head2_b = nullptr;
    for (int i = 0; i < 3; ++i) {
      const std::string l = ".layers." + std::to_string(i) + ".";
      v.class_w.push_back(at("class_labels_classifier" + l + "weight"));
      v.class_b.push_back(at("class_labels_classifier" + l + "bias"));
      v.box_w.push_back(at("bbox_predictor" + l + "weight"));
      v.box_b.push_back(at("bbox_predictor" + l + "bias"));
    }
  } else if (m.teacher) {
    v.head_w = at("cls_classifier.weight");
    v.head_b = at("cls_classifier.bias");
    v.head2_w = at("distillation_classifier.weight");
    v.head2_b = at("distillation_classifier.bias");
  } else {
    v.head_w = at("classifier.weight");
    v.head_b = at("classifier.bias");
    v.head2_w = v.head2_b = nullptr;
    if (m.representation_size > 0) v.pre_w = at("pre_logits.weight"), v.pre_b = at("pre_logits.bias");
  }
  return v;
}

namespace {

SafeTensors open_single_checkpoint(const fs::path& dir) {
  const std::string file = (dir / "model.safetensors").string();
  check(fs::exists(file), dir.string() + ": no model.safetensors (training reads single-file checkpoints)");
  return SafeTensors::open(file);
}

// Every mapped tensor of the checkpoint into m's buffer, each checked by name and shape.
void read_mapped(VitTrainModel& m, const SafeTensors& st, const std::vector<detail::NameMap>& names) {
  for (const detail::NameMap& n : names) {
    check(st.contains(n.name), st.path() + ": missing tensor '" + n.name + "'");
    check(st.info(n.name).shape == n.shape, st.path() + ": tensor '" + n.name + "' has shape " +
                                                shape_str(st.info(n.name).shape) + ", expected " + shape_str(n.shape));
    st.read(n.name, 0, shape_numel(n.shape), m.weights.data() + detail::mapped_offset(m, n, st.path()));
  }
}

// A timm VisionTransformer folder: its description from the inference loader (which checks the
// config and every tensor), the weights through timm's names.
VitTrainModel load_timm_train_model(const fs::path& dir, const std::string& config_text) {
  const std::string config_file = (dir / "config.json").string();
  const auto inf = load_model(dir.string());
  const VitConfig& c = inf->encoder.config;
  const ClassifierWeights& h = inf->classifier;
  const std::string what = config_file + " (" + inf->architecture + ")";
  check(c.num_distillation_tokens <= 1 && (c.activation == MlpActivation::Gelu || c.activation == MlpActivation::QuickGelu),
        what + ": training supports timm ViTs with GELU or QuickGELU MLPs");
  check((h.timm_pool == "token" && c.class_token) || (h.timm_pool == "avg" && c.num_distillation_tokens == 0),
        what + ": training supports global_pool \"token\" (on a class token) or \"avg\"");
  check(h.num_labels > 0, what + ": the model has no classification head (num_classes 0) to train");
  check(c.final_norm == h.fc_norm_weight.empty(),
        what + ": a model with both a final norm and fc_norm, or neither, is not one timm makes");
  check(c.image_height % c.patch_size == 0 && c.image_width % c.patch_size == 0,
        what + ": the image size is not a multiple of the patch size");
  VitTrainModel m;
  m.architecture = inf->architecture;
  m.layout = "timm";
  m.config_json = config_text;
  m.config = c;
  m.base = "vit.";
  m.num_labels = h.num_labels;
  m.pool_avg = h.timm_pool == "avg";
  m.fc_norm = !h.fc_norm_weight.empty();
  // timm's distilled DeiT: its two heads are DeiT with teacher's (logits their mean, as timm's eval
  // forward), so it trains on the hard-distillation loss (a --teacher's labels, or the true ones).
  m.teacher = c.num_distillation_tokens == 1;
  check(!m.teacher || !m.fc_norm, what + ": a distilled DeiT with fc_norm is not one timm makes");
  const SafeTensors st = open_single_checkpoint(dir);
  m.config.patch_bias = st.contains("patch_embed.proj.bias");  // CLIP towers have none
  m.params = vit_train_layout(m.config, m.base, m.num_labels, false, false, m.teacher);
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  read_mapped(m, st, detail::timm_style_names(m, "", "head"));
  return m;
}

// A torchvision VisionTransformer folder, likewise (a "module." prefix and the legacy MLP names
// are read; the folder is written back with today's names, without the prefix).
VitTrainModel load_torchvision_train_model(const fs::path& dir, const std::string& config_text) {
  const std::string config_file = (dir / "config.json").string();
  const auto inf = load_model(dir.string());
  VitTrainModel m = make_vit_train_model(inf->encoder.config, inf->labels, 0);
  if (inf->classifier.has_pooler) {  // representation_size: heads.pre_logits, tanh, then the head
    m.representation_size = inf->classifier.pooler.out_features;
    m.params = vit_train_layout(m.config, m.base, m.num_labels, false, false, false, m.representation_size);
    m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  }
  m.architecture = inf->architecture;
  m.layout = "torchvision";
  m.config_json = config_text;
  const SafeTensors st = open_single_checkpoint(dir);
  const std::string root = st.contains("class_token") ? "" : "module.";
  const bool legacy = st.contains(root + "encoder.layers.encoder_layer_0.mlp.linear_1.weight");
  read_mapped(m, st, detail::torchvision_names(m, root, legacy));
  return m;
}

}  // namespace

VitTrainModel load_vit_train_model(const std::string& dir_string) {
  const fs::path dir(dir_string);
  const std::string config_file = (dir / "config.json").string();
  VitTrainModel m;
  m.config_json = detail::read_text(config_file);
  const Config cfg{detail::parse_json(m.config_json, config_file), config_file};
  if (cfg.has("architecture") && cfg.has("pretrained_cfg")) return load_timm_train_model(dir, m.config_json);
  if (cfg.has("architectures") && cfg.j["architectures"].is_array() && !cfg.j["architectures"].empty() &&
      cfg.j["architectures"][0] == "torchvision.VisionTransformer")
    return load_torchvision_train_model(dir, m.config_json);
  const std::string model_type = cfg.string("model_type", "");
  std::string arch;
  if (cfg.has("architectures") && cfg.j["architectures"].is_array() && !cfg.j["architectures"].empty() &&
      cfg.j["architectures"][0].is_string())
    arch = cfg.j["architectures"][0].get<std::string>();
  // A base model (features only: ViTModel, DeiTModel, Dinov2Model, e.g. facebook/dinov2-small)
  // trains as its ForImageClassification with no labels yet: replace_classifier gives it its head
  // (a linear probe with --freeze-encoder is the common case). ViTModel's pooler is not part of
  // ViTForImageClassification and is not read.
  const bool base_model = (model_type == "vit" && arch == "ViTModel") || (model_type == "deit" && arch == "DeiTModel") ||
                          (model_type == "dinov2" && arch == "Dinov2Model");
  check(base_model || (model_type == "vit" && arch == "ViTForImageClassification") ||
            (model_type == "deit" && arch == "DeiTForImageClassification") ||
            (model_type == "deit" && arch == "DeiTForImageClassificationWithTeacher") ||
            (model_type == "dinov2" && arch == "Dinov2ForImageClassification"),
        config_file + ": training supports Hugging Face ViT / DeiT / Dinov2 models (ViTModel, "
                      "ViTForImageClassification, DeiTModel, DeiTForImageClassification(WithTeacher), Dinov2Model, "
                      "Dinov2ForImageClassification) and timm / torchvision VisionTransformer folders so far, got "
                      "model_type \"" + model_type + "\", architecture \"" + arch + "\"");
  if (base_model) arch = arch.substr(0, arch.size() - 5) + "ForImageClassification";  // ...Model → ...ForImageClassification
  m.architecture = arch;
  m.base = model_type + ".";
  m.class_mean = arch == "Dinov2ForImageClassification";
  m.teacher = arch == "DeiTForImageClassificationWithTeacher";
  m.config = detail::hf_vit_config(cfg, model_type);
  check(m.config.activation == MlpActivation::Gelu || m.config.activation == MlpActivation::SwiGlu,
        config_file + ": training supports exact GELU and DINOv2's SwiGLU MLPs (hidden_act \"gelu\")");
  check(m.config.image_height % m.config.patch_size == 0 &&
            m.config.image_width % m.config.patch_size == 0,
        config_file + ": image_size is not a multiple of patch_size");

  const std::string file = (dir / "model.safetensors").string();
  check(fs::exists(file), dir.string() + ": no model.safetensors (training reads single-file checkpoints)");
  const SafeTensors st = SafeTensors::open(file);
  const std::string head_name = m.teacher ? "cls_classifier.weight" : "classifier.weight";
  const int64_t head_in = (m.class_mean ? 2 : 1) * m.config.hidden_size;
  if (base_model) {
    check(!st.contains(head_name), file + ": a base model (" + cfg.j["architectures"][0].get<std::string>() +
                                       ") with a '" + head_name + "' tensor: config.json and checkpoint disagree");
    m.num_labels = 0;  // no head yet
  } else {
    check(st.contains(head_name), file + ": missing tensor '" + head_name + "'");
    const Shape& head = st.info(head_name).shape;
    check(head.size() == 2 && head[1] == head_in,
          file + ": tensor '" + head_name + "' has shape " + shape_str(head) +
              ", expected [num_labels, " + std::to_string(head_in) + "]");
    m.num_labels = head[0];
  }
  // A base model's checkpoint names carry no "vit." / "dinov2." prefix (transformers saves the
  // bare model); its classifier's are the same names under the prefix.
  const std::string stored_base = base_model && !st.contains(m.base + "embeddings.patch_embeddings.projection.weight")
                                      ? ""
                                      : m.base;
  m.params = vit_train_layout(m.config, m.base, m.num_labels, m.class_mean,
                              m.config.layer_scale && st.contains(stored_base + "embeddings.mask_token"),
                              m.teacher);
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  for (const TrainParam& p : m.params) {
    if (p.numel() == 0) continue;  // a base model's empty head
    const std::string name = p.name.rfind(m.base, 0) == 0 ? stored_base + p.name.substr(m.base.size()) : p.name;
    check(st.contains(name), file + ": missing tensor '" + name + "' (expected shape " + shape_str(p.shape) + ")");
    const TensorInfo& info = st.info(name);
    check(info.shape == p.shape, file + ": tensor '" + name + "' has shape " +
                                     shape_str(info.shape) + ", expected " + shape_str(p.shape));
    st.read(name, 0, p.numel(), m.weights.data() + p.offset);
  }
  const std::string next = stored_base + "encoder.layer." + std::to_string(m.config.num_hidden_layers) + ".";
  check(!st.contains(next + layer_names(m.config).norm1 + ".weight"),
        file + ": has more layers than num_hidden_layers = " + std::to_string(m.config.num_hidden_layers));
  return m;
}

VitTrainModel make_vit_train_model(const VitConfig& c, const std::vector<std::string>& labels,
                                   uint64_t seed) {
  check(c.hidden_size % c.num_attention_heads == 0 && c.image_height % c.patch_size == 0 &&
            c.image_width % c.patch_size == 0 && !labels.empty(),
        "make_vit_train_model: hidden_size must be a multiple of the heads, the image size of the "
        "patch size, and there must be labels");
  VitTrainModel m;
  m.config = c;
  m.config.class_token = true;
  m.config.num_distillation_tokens = m.config.num_register_tokens = m.config.num_detection_tokens = 0;
  m.config.layer_scale = false;
  m.config.activation = MlpActivation::Gelu;
  m.num_labels = static_cast<int64_t>(labels.size());
  const nlohmann::ordered_json j = detail::hf_train_config(
      c, "ViTForImageClassification", "vit",
      c.image_height == c.image_width ? nlohmann::ordered_json(c.image_height)
                                      : nlohmann::ordered_json::array({c.image_height, c.image_width}),
      labels, {{"encoder_stride", c.patch_size}}, {{"problem_type", "single_label_classification"}});
  m.config_json = j.dump(2) + "\n";
  m.params = vit_train_layout(m.config, m.base, m.num_labels, false, false);
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);

  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const int64_t d = c.hidden_size, gh = c.grid_height(), gw = c.grid_width();
  for (const TrainParam& p : m.params) {
    float* w = m.weights.data() + p.offset;
    const int64_t n = p.numel();
    const std::string& name = p.name;
    if (name.ends_with("layernorm_before.weight") || name.ends_with("layernorm_after.weight") ||
        name == m.base + "layernorm.weight") {
      std::fill(w, w + n, 1.0f);
    } else if (name.ends_with("patch_embeddings.projection.weight")) {
      const double std_dev = 1.0 / std::sqrt(static_cast<double>(n / p.shape[0]));
      for (int64_t i = 0; i < n; ++i) {
        double z;
        do z = normal(rng);
        while (std::abs(z) > 2.0);
        w[i] = static_cast<float>(std_dev * z);
      }
    } else if (name.ends_with("position_embeddings") && d % 4 == 0) {
      // [sin(y ω_i), cos(y ω_i), sin(x ω_i), cos(x ω_i)], ω_i = 10000^(−i/(D/4)); class token 0.
      const int64_t q = d / 4;
      for (int64_t y = 0; y < gh; ++y)
        for (int64_t x = 0; x < gw; ++x)
          for (int64_t i = 0; i < q; ++i) {
            const double om = std::pow(10000.0, -static_cast<double>(i) / static_cast<double>(q));
            float* row = w + (1 + y * gw + x) * d;
            row[i] = static_cast<float>(std::sin(y * om)), row[q + i] = static_cast<float>(std::cos(y * om));
            row[2 * q + i] = static_cast<float>(std::sin(x * om));
            row[3 * q + i] = static_cast<float>(std::cos(x * om));
          }
    } else if (name.ends_with("position_embeddings")) {
      for (int64_t i = 0; i < n; ++i) w[i] = static_cast<float>(0.02 * normal(rng));
    } else if (p.decay && name != "classifier.weight") {
      const double limit = std::sqrt(6.0 / static_cast<double>(p.shape[0] + p.shape[1]));
      std::uniform_real_distribution<double> uniform(-limit, limit);
      for (int64_t i = 0; i < n; ++i) w[i] = static_cast<float>(uniform(rng));
    }  // else: biases, class token, classifier stay 0
  }
  return m;
}

void replace_classifier(VitTrainModel& m, const std::vector<std::string>& labels) {
  check(!labels.empty(), "replace_classifier: no labels");
  const int64_t k = static_cast<int64_t>(labels.size());
  std::vector<TrainParam> params = vit_train_layout(
      m.config, m.base, k, m.class_mean,
      m.config.layer_scale && std::any_of(m.params.begin(), m.params.end(), [&](const TrainParam& p) {
        return p.name == m.base + "embeddings.mask_token";
      }),
      m.teacher, m.representation_size);
  std::vector<float> weights(static_cast<size_t>(params.back().offset + params.back().numel()), 0.0f);
  for (const TrainParam& p : params) {
    const bool head = p.name.find("classifier.") != std::string::npos || p.name.starts_with("pre_logits.");
    if (head) continue;  // zero
    const TrainParam& old = m.param(p.name);
    std::copy_n(m.weights.data() + old.offset, old.numel(), weights.data() + p.offset);
  }
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(m.config_json);
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object(),
                         label2id = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) {
    id2label[std::to_string(i)] = labels[i];
    label2id[labels[i]] = i;
  }
  if (m.layout == "timm") {  // timm: num_classes (also in pretrained_cfg) and label_names
    cfg["num_classes"] = k;
    if (cfg.contains("pretrained_cfg") && cfg["pretrained_cfg"].is_object() &&
        cfg["pretrained_cfg"].contains("num_classes"))
      cfg["pretrained_cfg"]["num_classes"] = k;
    cfg.erase("id2label");
    cfg.erase("label2id");
    cfg["label_names"] = labels;
  } else {
    cfg["id2label"] = id2label;
    cfg["label2id"] = label2id;
  }
  if (cfg.contains("num_labels")) cfg["num_labels"] = k;
  if (m.layout == "hf") cfg["architectures"] = {m.architecture};  // a base model becomes its classifier
  if (m.layout == "torchvision") cfg["num_classes"] = k;
  m.config_json = cfg.dump(2) + "\n";
  m.params = std::move(params);
  m.weights = std::move(weights);
  m.num_labels = k;
}

void resize_position_table(VitTrainModel& m, int64_t height, int64_t width) {
  VitConfig& c = m.config;
  check(m.layout == "hf" && !m.detection && !m.is_detr() && c.num_register_tokens == 0 && c.prefix_has_pos_embed,
        "fine-tuning at another size resizes the position table of a Hugging Face ViT, DeiT or DINOv2 classifier; " +
            m.architecture + " (" + m.layout + " layout) trains at its own size");
  check(height > 0 && width > 0 && height % c.patch_size == 0 && width % c.patch_size == 0,
        "--image-size " + std::to_string(height) + "x" + std::to_string(width) + " is not a multiple of the patch size " +
            std::to_string(c.patch_size));
  if (height == c.image_height && width == c.image_width) return;
  const TrainParam& p = m.param(m.base + "embeddings.position_embeddings");
  const int64_t d = c.hidden_size, pre = c.num_prefix_tokens(), gh = c.grid_height(), gw = c.grid_width();
  const int64_t nh = height / c.patch_size, nw = width / c.patch_size;
  const float* src = m.weights.data() + p.offset;
  std::vector<float> table(static_cast<size_t>((pre + nh * nw) * d));
  std::copy_n(src, pre * d, table.data());
  std::vector<float> chw(static_cast<size_t>(d * gh * gw)), out(static_cast<size_t>(d * nh * nw));
  for (int64_t i = 0; i < gh * gw; ++i)
    for (int64_t k = 0; k < d; ++k) chw[static_cast<size_t>(k * gh * gw + i)] = src[(pre + i) * d + k];
  Interpolation how;
  how.mode = InterpolationMode::Bicubic;
  interpolate_forward(how, chw.data(), d, gh, gw, out.data(), nh, nw);
  for (int64_t i = 0; i < nh * nw; ++i)
    for (int64_t k = 0; k < d; ++k) table[static_cast<size_t>((pre + i) * d + k)] = out[static_cast<size_t>(k * nh * nw + i)];
  // The new layout: every tensor where it was, the table of its new length.
  c.image_height = height, c.image_width = width;
  const std::string name = p.name;  // p refers into the params being replaced
  detail::relayout_params(
      m,
      [&](TrainParam& q) {
        if (q.name != name) return false;
        q.shape = {1, pre + nh * nw, d};
        return true;
      },
      [&](const TrainParam&, float* w) { std::copy(table.begin(), table.end(), w); });
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(m.config_json);
  cfg["image_size"] = height == width ? nlohmann::ordered_json(height) : nlohmann::ordered_json::array({height, width});
  m.config_json = cfg.dump(2) + "\n";
}

std::vector<std::string> vit_train_presets() { return {"vit-ti16", "vit-s16", "vit-b16", "vit-digits"}; }

VitConfig vit_train_preset(const std::string& arch, int64_t image_size) {
  VitConfig c;
  c.image_height = c.image_width = image_size;
  c.num_channels = 3;
  c.qkv_bias = true;
  c.num_hidden_layers = 12;
  c.patch_size = 16;
  c.layer_norm_eps = 1e-12f;
  if (arch == "vit-ti16") {
    c.hidden_size = 192, c.num_attention_heads = 3;
  } else if (arch == "vit-s16") {
    c.hidden_size = 384, c.num_attention_heads = 6;
  } else if (arch == "vit-b16") {
    c.hidden_size = 768, c.num_attention_heads = 12;
  } else if (arch == "vit-digits") {
    c.patch_size = 4, c.hidden_size = 64, c.num_hidden_layers = 4, c.num_attention_heads = 4;
    c.layer_norm_eps = 1e-6f;
  } else {
    std::string known;
    for (const std::string& p : vit_train_presets()) known += (known.empty() ? "" : ", ") + p;
    fail("--arch " + arch + ": unknown preset (known: " + known + ")");
  }
  c.intermediate_size = 4 * c.hidden_size;
  check(image_size > 0 && image_size % c.patch_size == 0,
        "--arch " + arch + ": image size " + std::to_string(image_size) +
            " is not a positive multiple of the patch size " + std::to_string(c.patch_size));
  return c;
}

void save_vit_train_model(const VitTrainModel& m, const std::string& dir_string,
                          const std::string& preprocessor_json) {
  const fs::path dir(dir_string);
  std::error_code ec;
  fs::create_directories(dir, ec);
  check(!ec, dir.string() + ": cannot create (" + ec.message() + ")");
  std::vector<std::pair<std::string, Tensor>> tensors;
  if (m.layout == "timm" || m.layout == "torchvision") {
    for (const detail::NameMap& n : m.layout == "timm" ? detail::timm_style_names(m, "", "head")
                                                       : detail::torchvision_names(m)) {
      Tensor t(n.shape);
      std::copy_n(m.weights.data() + detail::mapped_offset(m, n, "save_vit_train_model"), t.numel(), t.data());
      tensors.emplace_back(n.name, std::move(t));
    }
  } else {
    for (const TrainParam& p : m.params) {
      Tensor t(p.shape);
      std::copy_n(m.weights.data() + p.offset, p.numel(), t.data());
      tensors.emplace_back(p.name, std::move(t));
    }
  }
  save_safetensors((dir / "model.safetensors").string(), tensors, {{"format", "pt"}});
  auto write_text = [&](const std::string& name, const std::string& text) {
    write_file_atomic((dir / name).string(), text.data(), text.size());
  };
  write_text("config.json", m.config_json);
  if (!preprocessor_json.empty()) write_text("preprocessor_config.json", preprocessor_json);
}

void VitTrainActivations::resize(const VitTrainModel& model, int64_t b, int64_t h, int64_t w) {
  const VitConfig& c = model.config;
  std::vector<int64_t> shape = {c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                                c.patch_size, c.num_channels, c.num_prefix_tokens(), c.num_detection_tokens,
                                model.num_labels, model.teacher, model.class_mean, model.detection,
                                model.representation_size, model.pool_avg, model.fc_norm,
                                c.num_register_tokens, c.class_token};
  if (batch == b && height == h && width == w && model_shape == shape) return;
  model_shape = std::move(shape);
  const int64_t np = (h / c.patch_size) * (w / c.patch_size);
  const int64_t t = c.num_prefix_tokens() + np + c.num_detection_tokens;
  const int64_t m = b * t;
  const int64_t d = c.hidden_size, f = c.intermediate_size, heads = c.num_attention_heads;
  const int64_t kp = c.num_channels * c.patch_size * c.patch_size;
  auto sized = [](std::vector<float>& v, int64_t n) { v.assign(static_cast<size_t>(n), 0.0f); };
  const int64_t f1 = c.activation == MlpActivation::SwiGlu ? 2 * f : f;  // the MLP's first layer's outputs
  batch = b, height = h, width = w;
  sized(patches, b * np * kp);
  sized(pos, t * d);
  layers.assign(static_cast<size_t>(c.num_hidden_layers), {});
  for (Layer& l : layers) {
    sized(l.x, m * d), sized(l.ln1, m * d), sized(l.mean1, m), sized(l.rstd1, m);
    sized(l.qkv, m * 3 * d), sized(l.ctx, m * d), sized(l.lse, b * heads * t);
    sized(l.x_mid, m * d), sized(l.ln2, m * d), sized(l.mean2, m), sized(l.rstd2, m);
    sized(l.h, m * f1), sized(l.a, m * f);
    if (c.layer_scale) sized(l.z1, m * d), sized(l.z2, m * d);
  }
  // Final-norm rows: the class tokens, or with a teacher head the class then the distillation
  // tokens ([2B, D]), or every token (class_mean).
  const int64_t det_rows = b * c.num_detection_tokens;
  const int64_t rows = model.detection                                    ? det_rows
                       : model.class_mean || (model.pool_avg && !model.fc_norm) ? m
                       : model.teacher                                        ? 2 * b
                                                                              : b;
  const int64_t head = (model.class_mean ? 2 : 1) * d;
  sized(x_out, m * d);
  sized(cls, rows * d), sized(cls_norm, rows * d), sized(mean_f, rows), sized(rstd_f, rows);
  sized(head_in, model.detection ? 0 : (model.teacher ? 2 : 1) * b * head);
  sized(logits, model.detection ? det_rows * (model.num_labels + 1) : b * model.num_labels);
  sized(head_logits, model.teacher ? 2 * b * model.num_labels : 0);
  sized(pre, b * model.representation_size), sized(dpre, b * model.representation_size);
  sized(dx, m * d), sized(dln, m * d), sized(dqkv, m * 3 * d), sized(dctx, m * d);
  sized(dh, m * f1), sized(da, m * f), sized(dcls, rows * d), sized(dcls_norm, rows * d);
  sized(dhead_in, model.detection ? 0 : (model.teacher ? 2 : 1) * b * head), sized(dembedded, b * np * d), sized(dz, c.layer_scale ? m * d : 0);
  const int64_t mlp = model.detection ? det_rows * d : 0;
  sized(class1, mlp), sized(class2, mlp), sized(box1, mlp), sized(box2, mlp);
  sized(dmlp1, mlp), sized(dmlp2, mlp), sized(dmlp_in, mlp), sized(boxes, model.detection ? det_rows * 4 : 0);
}

void vit_train_encoder_forward(const VitTrainModel& model, const Tensor& pixel_values,
                               VitTrainActivations& acts) {
  const VitConfig& c = model.config;
  if (pixel_values.ndim() != 4 || pixel_values.dim(1) != c.num_channels ||
      pixel_values.dim(2) < c.patch_size || pixel_values.dim(3) < c.patch_size)
    fail("training takes pixel_values [batch, " + std::to_string(c.num_channels) +
         ", height, width] of at least one " + std::to_string(c.patch_size) + "-pixel patch, got " +
         shape_str(pixel_values.shape()));
  const int64_t B = pixel_values.dim(0), H = pixel_values.dim(2), W = pixel_values.dim(3);
  const int64_t p = c.patch_size, C = c.num_channels, d = c.hidden_size, f = c.intermediate_size;
  const int64_t heads = c.num_attention_heads;
  const int64_t pre = c.num_prefix_tokens(), det = c.num_detection_tokens;
  const int64_t nh = H / p, nw = W / p, np = nh * nw, T = pre + np + det;
  const int64_t kp = C * p * p;
  acts.resize(model, B, H, W);
  position_embedding_forward(model, model.weights.data() + model.param(model.base + "embeddings.position_embeddings").offset,
                             H, W, acts.pos.data());
  // YOLOS's mid position embeddings (use_mid_position_embeddings): one table per block but the
  // last, resampled as the first, added to that block's output.
  const int64_t mids = model.config.mid_position_embeddings ? model.config.num_hidden_layers - 1 : 0;
  acts.mid_pos.resize(static_cast<size_t>(mids));
  if (mids > 0) {
    const TrainParam& mp = model.param(model.base + "encoder.mid_position_embeddings");
    const int64_t rows = mp.numel() / mids;
    for (int64_t i = 0; i < mids; ++i) {
      acts.mid_pos[static_cast<size_t>(i)].resize(acts.pos.size());
      position_embedding_forward(model, model.weights.data() + mp.offset + i * rows, H, W,
                                 acts.mid_pos[static_cast<size_t>(i)].data());
    }
  }
  VitTrainView w = bind_view(model, const_cast<float*>(model.weights.data()));

  // Patch embedding: im2col (columns c, ky, kx as the convolution weight), one GEMM.
  const float* px = pixel_values.data();
  parallel_for(0, B * nh, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / nh, py = r % nh;
      for (int64_t pxi = 0; pxi < nw; ++pxi) {
        float* row = acts.patches.data() + (b * np + py * nw + pxi) * kp;
        for (int64_t ch = 0; ch < C; ++ch)
          for (int64_t ky = 0; ky < p; ++ky)
            std::memcpy(row + (ch * p + ky) * p, px + ((b * C + ch) * H + py * p + ky) * W + pxi * p,
                        sizeof(float) * p);
      }
    }
  });
  // The embedded patches go straight to rows 1.. of each image in x₀ (via the scratch).
  std::vector<float>& embedded = acts.dembedded;  // free until the backward
  linear_forward(acts.patches.data(), B * np, w.patch_w, w.patch_b, d, kp, embedded.data());
  float* x0 = acts.layers.empty() ? acts.x_out.data() : acts.layers[0].x.data();
  if (c.pre_norm) {  // the embeddings go to x_pre; norm_pre of it is x₀
    acts.x_pre.resize(static_cast<size_t>(B * T * d));
    acts.mean_pre.resize(static_cast<size_t>(B * T)), acts.rstd_pre.resize(static_cast<size_t>(B * T));
  }
  float* emb = c.pre_norm ? acts.x_pre.data() : x0;
  for (int64_t b = 0; b < B; ++b) {
    float* xb = emb + b * T * d;
    // Prefix: [class token], [distillation token], [register tokens] (timm: cls, reg).
    int64_t row = 0;
    if (w.cls_token) std::memcpy(xb + d * row++, w.cls_token, sizeof(float) * d);
    if (w.dist_token) std::memcpy(xb + d * row++, w.dist_token, sizeof(float) * d);
    if (w.reg_tokens) std::memcpy(xb + d * row, w.reg_tokens, sizeof(float) * c.num_register_tokens * d);
    std::memcpy(xb + pre * d, embedded.data() + b * np * d, sizeof(float) * np * d);
    if (det) std::memcpy(xb + (pre + np) * d, w.det_tokens, sizeof(float) * det * d);
    for (int64_t i = 0; i < T * d; ++i) xb[i] += acts.pos[i];
  }
  if (c.pre_norm)
    layer_norm_forward(acts.x_pre.data(), B * T, d, w.pre_norm_w, w.pre_norm_b, c.layer_norm_eps, x0,
                       acts.mean_pre.data(), acts.rstd_pre.data());

  const detail::BlockDims dims{B, T, d, f, heads, c.layer_norm_eps, c.activation == MlpActivation::SwiGlu,
                               c.activation == MlpActivation::QuickGelu};
  for (size_t li = 0; li < acts.layers.size(); ++li) {
    float* next = li + 1 < acts.layers.size() ? acts.layers[li + 1].x.data() : acts.x_out.data();
    detail::vit_block_forward(w.layers[li], dims, acts.layers[li], next);
    if (li < acts.mid_pos.size()) {
      const float* mid = acts.mid_pos[li].data();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < T * d; ++i) next[b * T * d + i] += mid[i];
    }
  }
}

std::span<const float> vit_train_forward(const VitTrainModel& model, const Tensor& pixel_values,
                                         VitTrainActivations& acts) {
  check(!model.detection, "vit_train_forward: a YolosForObjectDetection model has no classifier "
                          "(yolos_train_forward runs its heads)");
  vit_train_encoder_forward(model, pixel_values, acts);
  const VitConfig& c = model.config;
  const int64_t B = acts.batch, d = c.hidden_size;
  const int64_t T = c.num_prefix_tokens() + (acts.height / c.patch_size) * (acts.width / c.patch_size);
  const int64_t M = B * T;
  VitTrainView w = bind_view(model, const_cast<float*>(model.weights.data()));
  const int64_t pre = c.num_prefix_tokens(), np = T - pre;
  if (model.pool_avg && model.fc_norm) {
    // timm "avg" + fc_norm: fc_norm(mean of the patch tokens).
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < d; ++k) {
        double sum = 0;
        for (int64_t t = pre; t < T; ++t) sum += acts.x_out[(b * T + t) * d + k];
        acts.cls[b * d + k] = static_cast<float>(sum / static_cast<double>(np));
      }
    layer_norm_forward(acts.cls.data(), B, d, w.norm_w, w.norm_b, c.layer_norm_eps, acts.cls_norm.data(),
                       acts.mean_f.data(), acts.rstd_f.data());
    std::copy(acts.cls_norm.begin(), acts.cls_norm.end(), acts.head_in.begin());
  } else if (model.pool_avg) {
    // timm "avg" without fc_norm: the mean of the normed patch tokens.
    std::copy(acts.x_out.begin(), acts.x_out.end(), acts.cls.begin());
    layer_norm_forward(acts.cls.data(), M, d, w.norm_w, w.norm_b, c.layer_norm_eps, acts.cls_norm.data(),
                       acts.mean_f.data(), acts.rstd_f.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < d; ++k) {
        double sum = 0;
        for (int64_t t = pre; t < T; ++t) sum += acts.cls_norm[(b * T + t) * d + k];
        acts.head_in[b * d + k] = static_cast<float>(sum / static_cast<double>(np));
      }
  } else if (!model.class_mean) {
    // Only the class (and distillation) tokens reach the heads: the final norm runs on those rows.
    const int64_t heads_n = model.teacher ? 2 : 1;
    for (int64_t j = 0; j < heads_n; ++j)
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(acts.cls.data() + (j * B + b) * d, acts.x_out.data() + (b * T + j) * d,
                    sizeof(float) * d);
    layer_norm_forward(acts.cls.data(), heads_n * B, d, w.norm_w, w.norm_b, c.layer_norm_eps,
                       acts.cls_norm.data(), acts.mean_f.data(), acts.rstd_f.data());
    std::copy(acts.cls_norm.begin(), acts.cls_norm.end(), acts.head_in.begin());
  } else {
    // DINOv2: [h[:, 0], mean over the patch tokens h[:, 1:]] of the normed sequence.
    std::copy(acts.x_out.begin(), acts.x_out.end(), acts.cls.begin());
    layer_norm_forward(acts.cls.data(), M, d, w.norm_w, w.norm_b, c.layer_norm_eps,
                       acts.cls_norm.data(), acts.mean_f.data(), acts.rstd_f.data());
    for (int64_t b = 0; b < B; ++b) {
      float* row = acts.head_in.data() + b * 2 * d;
      const float* hb = acts.cls_norm.data() + b * T * d;
      std::copy(hb, hb + d, row);
      for (int64_t k = 0; k < d; ++k) {
        double sum = 0;
        for (int64_t t = 1; t < T; ++t) sum += hb[t * d + k];
        row[d + k] = static_cast<float>(sum / static_cast<double>(T - 1));
      }
    }
  }
  const int64_t head = (model.class_mean ? 2 : 1) * d, K = model.num_labels;
  if (model.representation_size > 0) {  // torchvision: head(tanh(pre_logits(x)))
    const int64_t rep = model.representation_size;
    linear_forward(acts.head_in.data(), B, w.pre_w, w.pre_b, rep, d, acts.pre.data());
    for (float& x : acts.pre) x = std::tanh(x);
    linear_forward(acts.pre.data(), B, w.head_w, w.head_b, K, rep, acts.logits.data());
    return acts.logits;
  }
  if (!model.teacher) {
    linear_forward(acts.head_in.data(), B, w.head_w, w.head_b, K, head, acts.logits.data());
    return acts.logits;
  }
  // DeiT with teacher: logits = (cls_classifier(h0) + distillation_classifier(h1)) / 2.
  float* cls_logits = acts.head_logits.data();
  float* dist_logits = cls_logits + B * K;
  linear_forward(acts.head_in.data(), B, w.head_w, w.head_b, K, d, cls_logits);
  linear_forward(acts.head_in.data() + B * d, B, w.head2_w, w.head2_b, K, d, dist_logits);
  for (int64_t i = 0; i < B * K; ++i) acts.logits[i] = (cls_logits[i] + dist_logits[i]) / 2;
  return acts.logits;
}

void vit_train_backward(const VitTrainModel& model, VitTrainActivations& acts,
                        const float* dlogits, std::span<float> grads) {
  check(grads.size() == model.weights.size(), "vit_train_backward: gradient buffer size differs from the weights'");
  check(acts.batch > 0, "vit_train_backward: run vit_train_forward first");
  const VitConfig& c = model.config;
  const int64_t B = acts.batch, d = c.hidden_size;
  const int64_t T = c.num_prefix_tokens() + (acts.height / c.patch_size) * (acts.width / c.patch_size);
  const int64_t M = B * T, K = model.num_labels;
  VitTrainView w = bind_view(model, const_cast<float*>(model.weights.data()));
  VitTrainView g = bind_view(model, grads.data());

  // Classifier and final norm (class-token rows, or every row with class_mean).
  const int64_t head = (model.class_mean ? 2 : 1) * d;
  zero(acts.dhead_in), zero(acts.dcls_norm), zero(acts.dcls), zero(acts.dx);
  if (model.representation_size > 0) {
    const int64_t rep = model.representation_size;
    zero(acts.dpre);
    linear_backward(acts.pre.data(), w.head_w, dlogits, B, K, rep, acts.dpre.data(), g.head_w, g.head_b);
    for (size_t i = 0; i < acts.pre.size(); ++i) acts.dpre[i] *= 1.0f - acts.pre[i] * acts.pre[i];  // tanh'
    linear_backward(acts.head_in.data(), w.pre_w, acts.dpre.data(), B, rep, d, acts.dhead_in.data(), g.pre_w,
                    g.pre_b);
  } else {
    linear_backward(acts.head_in.data(), w.head_w, dlogits, B, K, head, acts.dhead_in.data(), g.head_w, g.head_b);
  }
  if (model.teacher)
    linear_backward(acts.head_in.data() + B * d, w.head2_w, dlogits + B * K, B, K, d,
                    acts.dhead_in.data() + B * d, g.head2_w, g.head2_b);
  const int64_t pre = c.num_prefix_tokens(), np = T - pre;
  if (model.pool_avg && model.fc_norm) {
    layer_norm_backward(acts.dhead_in.data(), acts.cls.data(), acts.mean_f.data(), acts.rstd_f.data(), w.norm_w, B, d,
                        acts.dcls.data(), g.norm_w, g.norm_b);
    const float inv = 1.0f / static_cast<float>(np);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = pre; t < T; ++t)
        for (int64_t k = 0; k < d; ++k) acts.dx[(b * T + t) * d + k] = acts.dcls[b * d + k] * inv;
  } else if (model.pool_avg) {
    const float inv = 1.0f / static_cast<float>(np);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = pre; t < T; ++t)
        for (int64_t k = 0; k < d; ++k) acts.dcls_norm[(b * T + t) * d + k] = acts.dhead_in[b * d + k] * inv;
    layer_norm_backward(acts.dcls_norm.data(), acts.cls.data(), acts.mean_f.data(), acts.rstd_f.data(), w.norm_w, M, d,
                        acts.dx.data(), g.norm_w, g.norm_b);
  } else if (!model.class_mean) {
    const int64_t heads_n = model.teacher ? 2 : 1;
    std::copy(acts.dhead_in.begin(), acts.dhead_in.end(), acts.dcls_norm.begin());
    layer_norm_backward(acts.dcls_norm.data(), acts.cls.data(), acts.mean_f.data(),
                        acts.rstd_f.data(), w.norm_w, heads_n * B, d, acts.dcls.data(), g.norm_w,
                        g.norm_b);
    for (int64_t j = 0; j < heads_n; ++j)
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(acts.dx.data() + (b * T + j) * d, acts.dcls.data() + (j * B + b) * d,
                    sizeof(float) * d);
  } else {
    const float inv = 1.0f / static_cast<float>(T - 1);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = acts.dhead_in.data() + b * 2 * d;
      float* db = acts.dcls_norm.data() + b * T * d;
      std::copy(row, row + d, db);
      for (int64_t t = 1; t < T; ++t)
        for (int64_t k = 0; k < d; ++k) db[t * d + k] = row[d + k] * inv;
    }
    layer_norm_backward(acts.dcls_norm.data(), acts.cls.data(), acts.mean_f.data(),
                        acts.rstd_f.data(), w.norm_w, M, d, acts.dx.data(), g.norm_w, g.norm_b);
  }

  vit_train_encoder_backward(model, acts, grads);
}

void vit_train_encoder_backward(const VitTrainModel& model, VitTrainActivations& acts,
                                std::span<float> grads) {
  check(grads.size() == model.weights.size(), "vit_train_encoder_backward: gradient buffer size differs from the weights'");
  check(acts.batch > 0, "vit_train_encoder_backward: run the forward first");
  const VitConfig& c = model.config;
  const int64_t B = acts.batch, d = c.hidden_size, f = c.intermediate_size;
  const int64_t heads = c.num_attention_heads;
  const int64_t pre = c.num_prefix_tokens(), det = c.num_detection_tokens;
  const int64_t np = (acts.height / c.patch_size) * (acts.width / c.patch_size), T = pre + np + det;
  const int64_t kp = c.num_channels * c.patch_size * c.patch_size;
  VitTrainView w = bind_view(model, const_cast<float*>(model.weights.data()));
  VitTrainView g = bind_view(model, grads.data());
  const detail::BlockDims dims{B, T, d, f, heads, c.layer_norm_eps, c.activation == MlpActivation::SwiGlu,
                               c.activation == MlpActivation::QuickGelu};
  const TrainParam* mid_param = acts.mid_pos.empty() ? nullptr : &model.param(model.base + "encoder.mid_position_embeddings");
  std::vector<float> dmid;
  for (size_t li = acts.layers.size(); li-- > 0;) {
    if (li < acts.mid_pos.size()) {
      // x_{l+1} = block(x_l) + mid_l: mid_l's gradient is Σ_b dx_{l+1}, back through its resampling.
      dmid.assign(static_cast<size_t>(T * d), 0.0f);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < T * d; ++i) dmid[i] += acts.dx[b * T * d + i];
      const int64_t rows = mid_param->numel() / static_cast<int64_t>(acts.mid_pos.size());
      position_embedding_backward(model, acts.height, acts.width, dmid.data(),
                                  grads.data() + mid_param->offset + static_cast<int64_t>(li) * rows);
    }
    detail::vit_block_backward(w.layers[li], g.layers[li], dims, acts.layers[li], acts);
  }

  if (c.pre_norm) {  // x₀ = norm_pre(embeddings): dx becomes the embeddings' gradient
    std::vector<float> demb(acts.dx.size(), 0.0f);
    layer_norm_backward(acts.dx.data(), acts.x_pre.data(), acts.mean_pre.data(), acts.rstd_pre.data(), w.pre_norm_w,
                        B * T, d, demb.data(), g.pre_norm_w, g.pre_norm_b);
    acts.dx = std::move(demb);
  }
  // Embeddings: x₀[b] = [cls, patch rows] + pos. Sums over the batch run in image order.
  const float* dx = acts.dx.data();
  std::vector<float> dpos(static_cast<size_t>(T * d), 0.0f);
  parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t k = 0; k < d; ++k) dpos[t * d + k] += dx[(b * T + t) * d + k];
  });
  position_embedding_backward(model, acts.height, acts.width, dpos.data(), g.pos_embed);
  const int64_t dist_row = g.cls_token ? 1 : 0, reg_row = dist_row + (g.dist_token ? 1 : 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < d; ++k) {
      if (g.cls_token) g.cls_token[k] += dx[b * T * d + k];
      if (g.dist_token) g.dist_token[k] += dx[(b * T + dist_row) * d + k];
    }
    if (g.reg_tokens)
      for (int64_t k = 0; k < c.num_register_tokens * d; ++k) g.reg_tokens[k] += dx[(b * T + reg_row) * d + k];
  }
  for (int64_t b = 0; b < B; ++b)  // YOLOS's detection tokens, images in order
    for (int64_t k = 0; k < det * d; ++k) g.det_tokens[k] += dx[(b * T + pre + np) * d + k];
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(acts.dembedded.data() + b * np * d, dx + (b * T + pre) * d, sizeof(float) * np * d);
  linear_backward(acts.patches.data(), w.patch_w, acts.dembedded.data(), B * np, d, kp, nullptr,
                  g.patch_w, g.patch_b);
}

double vit_train_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                               const std::vector<int64_t>& labels, float label_smoothing,
                               VitTrainActivations& acts, std::span<float> grads) {
  check(!model.teacher, "a DeiT with a distillation head trains on the hard-distillation loss: "
                        "vit_train_distillation_loss_and_grad, with the teacher's labels");
  const std::span<const float> logits = vit_train_forward(model, pixel_values, acts);
  const int64_t B = acts.batch;
  check(static_cast<int64_t>(labels.size()) == B,
        "vit_train_loss_and_grad: " + std::to_string(labels.size()) + " labels for a batch of " +
            std::to_string(B));
  std::vector<float> dlogits(static_cast<size_t>(B * model.num_labels), 0.0f);
  const double loss = cross_entropy_forward_backward(logits.data(), labels.data(), B,
                                                     model.num_labels, label_smoothing,
                                                     dlogits.data());
  vit_train_backward(model, acts, dlogits.data(), grads);
  return loss;
}

double vit_train_distillation_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                                            const std::vector<int64_t>& labels,
                                            const std::vector<int64_t>& teacher_labels,
                                            float label_smoothing, VitTrainActivations& acts,
                                            std::span<float> grads) {
  check(model.teacher, "the hard-distillation loss needs DeiTForImageClassificationWithTeacher");
  vit_train_forward(model, pixel_values, acts);
  const int64_t B = acts.batch, K = model.num_labels;
  check(static_cast<int64_t>(labels.size()) == B && static_cast<int64_t>(teacher_labels.size()) == B,
        "vit_train_distillation_loss_and_grad: labels and teacher labels must be one per image");
  // ½·CE_ε(cls_logits, y) + ½·CE(dist_logits, y_teacher): each half's gradient scaled by ½.
  std::vector<float> d_cls(static_cast<size_t>(2 * B * K), 0.0f);
  const double cls_loss = cross_entropy_forward_backward(acts.head_logits.data(), labels.data(), B,
                                                         K, label_smoothing, d_cls.data());
  const double dist_loss = cross_entropy_forward_backward(acts.head_logits.data() + B * K,
                                                          teacher_labels.data(), B, K, 0.0f,
                                                          d_cls.data() + B * K);
  for (float& v : d_cls) v *= 0.5f;
  vit_train_backward(model, acts, d_cls.data(), grads);
  return 0.5 * cls_loss + 0.5 * dist_loss;
}

int64_t vit_train_layer(const VitTrainModel& model, const TrainParam& param) {
  const std::string blocks = model.base + "encoder.layer.";
  if (param.name.rfind(model.base + "embeddings.", 0) == 0) return 0;
  if (param.name.rfind(blocks, 0) == 0)
    return 1 + std::stoll(param.name.substr(blocks.size(), param.name.find('.', blocks.size()) - blocks.size()));
  return model.config.num_hidden_layers + 1;  // final norm, classifier
}

double vit_train_lr_scale(const VitTrainModel& model, const TrainParam& param, double layer_decay) {
  if (layer_decay == 1.0) return 1.0;
  return std::pow(layer_decay, static_cast<double>(model.config.num_hidden_layers + 1 -
                                                   vit_train_layer(model, param)));
}

void vit_train_adamw_step(VitTrainModel& model, std::span<const float> grads, std::span<float> m,
                          std::span<float> v, int64_t step, const AdamWOptions& options,
                          double layer_decay) {
  check(grads.size() == model.weights.size() && m.size() == grads.size() && v.size() == grads.size(),
        "vit_train_adamw_step: gradients or moments differ in size from the weights");
  AdamWOptions no_decay = options;
  no_decay.weight_decay = 0.0f;
  // One pass over every trained tensor (each with its decay and layer-wise rate), split evenly.
  std::vector<AdamWSegment> segments;
  for (const TrainParam& p : model.params) {
    if (model.is_frozen(p)) continue;
    AdamWSegment sg{p.offset, p.numel(), p.decay ? options : no_decay};
    sg.options.lr = static_cast<float>(options.lr * vit_train_lr_scale(model, p, layer_decay));
    segments.push_back(sg);
  }
  adamw_step(model.weights, grads, m, v, step, segments);
}

TrainStepResult vit_train_step(VitTrainModel& model, VitTrainState& state, const Tensor& pixel_values,
                               const std::vector<int64_t>& labels, const TrainStepOptions& o,
                               const std::vector<int64_t>* teacher_labels) {
  check(model.teacher == (teacher_labels != nullptr),
        model.teacher ? "a DeiT with teacher steps on the hard-distillation loss: pass the teacher's labels"
                      : "teacher labels given for a model without a distillation head");
  const size_t n = model.weights.size();
  if (state.grads.size() != n) {
    state.grads.assign(n, 0.0f);
    state.m.assign(n, 0.0f);
    state.v.assign(o.optimizer == Optimizer::AdamW ? n : 0, 0.0f);
  }
  if (o.optimizer == Optimizer::AdamW && state.v.size() != n) state.v.assign(n, 0.0f);
  TrainStepResult r;
  const int64_t K = model.num_labels;
  check(pixel_values.ndim() == 4, "vit_train_step: pixel_values must be [B, C, H, W]");
  const int64_t B = pixel_values.shape()[0];
  const int64_t S = o.sub_batches > 0 ? o.sub_batches
                                      : vit_train_sub_batches(model, B, pixel_values.shape()[2], pixel_values.shape()[3]);
  check(S >= 1 && B % S == 0, "vit_train_step: a batch of " + std::to_string(B) + " does not split into " +
                                  std::to_string(S) + " equal sub-batches");
  check(static_cast<int64_t>(labels.size()) == B &&
            (!teacher_labels || static_cast<int64_t>(teacher_labels->size()) == B),
        "vit_train_step: " + std::to_string(labels.size()) + " labels" +
            (teacher_labels ? " and " + std::to_string(teacher_labels->size()) + " teacher labels" : "") +
            " for a batch of " + std::to_string(B) + ": one per image");
  // Images [b0, b0 + nb): their mean loss, its gradient added into grads, the correct rows counted.
  auto loss_and_grad = [&](int64_t b0, int64_t nb, VitTrainActivations& acts, std::vector<float>& grads) {
    const Tensor x = pixel_values.slice0(b0, b0 + nb);
    const std::vector<int64_t> y(labels.begin() + b0, labels.begin() + b0 + nb);
    double loss = 0;
    if (teacher_labels) {
      const std::vector<int64_t> t(teacher_labels->begin() + b0, teacher_labels->begin() + b0 + nb);
      loss = vit_train_distillation_loss_and_grad(model, x, y, t, o.label_smoothing, acts, grads);
    } else {
      loss = vit_train_loss_and_grad(model, x, y, o.label_smoothing, acts, grads);
    }
    int64_t correct = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const float* row = acts.logits.data() + b * K;
      correct += std::max_element(row, row + K) - row == y[static_cast<size_t>(b)];
    }
    return std::make_pair(loss, correct);
  };
  if (S == 1) {
    std::fill(state.grads.begin(), state.grads.end(), 0.0f);
    std::tie(r.loss, r.correct) = loss_and_grad(0, B, state.acts, state.grads);
  } else {
    // Each sub-batch's mean loss and its gradient, side by side; the batch's mean is their mean
    // (equal sub-batches), summed in sub-batch order.
    const int64_t nb = B / S;
    state.sub.resize(static_cast<size_t>(S));
    std::vector<std::pair<double, int64_t>> parts(static_cast<size_t>(S));
    parallel_tasks(S, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        VitTrainState::SubBatch& sb = state.sub[static_cast<size_t>(k)];
        sb.grads.assign(model.weights.size(), 0.0f);
        parts[static_cast<size_t>(k)] = loss_and_grad(k * nb, nb, sb.acts, sb.grads);
      }
    });
    const float inv = 1.0f / static_cast<float>(S);
    const int64_t n = static_cast<int64_t>(model.weights.size());
    parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float g = 0.0f;
        for (int64_t k = 0; k < S; ++k) g += state.sub[static_cast<size_t>(k)].grads[static_cast<size_t>(i)];
        state.grads[static_cast<size_t>(i)] = g * inv;
      }
    });
    for (const auto& [loss, correct] : parts) {
      r.loss += loss / static_cast<double>(S);
      r.correct += correct;
    }
  }
  r.grad_norm = vit_train_apply_gradients(model, state, o);
  return r;
}

int64_t vit_train_sub_batches(const VitTrainModel& model, int64_t batch, int64_t height, int64_t width) {
  const VitConfig& c = model.config;
  if (model.detection || c.patch_size <= 0) return 1;
  const int64_t tokens = c.num_prefix_tokens() + (height / c.patch_size) * (width / c.patch_size);
  if (batch * tokens * c.hidden_size > (int64_t{1} << 19)) return 1;
  // Two halves: on 2 threads they beat 4 and 8 quarters / eighths of the digits batch (larger GEMMs
  // each), and more threads still help inside each half.
  return batch % 2 == 0 && batch / 2 >= 16 ? 2 : 1;
}

double vit_train_apply_gradients(VitTrainModel& model, VitTrainState& state, const TrainStepOptions& o) {
  const size_t n = model.weights.size();
  check(state.grads.size() == n, "vit_train_apply_gradients: gradients of another size than the weights");
  if (state.m.size() != n) state.m.assign(n, 0.0f);
  if (o.optimizer == Optimizer::AdamW && state.v.size() != n) state.v.assign(n, 0.0f);
  allreduce_mean(o.comm, state.grads);  // data-parallel: the global batch's gradient on every rank
  const double grad_norm = clip_grad_norm(state.grads, o.clip_grad);
  ++state.step;
  if (o.optimizer == Optimizer::AdamW) {
    AdamWOptions a;
    a.lr = o.lr, a.beta1 = o.beta1, a.beta2 = o.beta2, a.eps = o.eps, a.weight_decay = o.weight_decay;
    vit_train_adamw_step(model, state.grads, state.m, state.v, state.step, a, o.layer_decay);
  } else {
    std::span<float> w(model.weights), g(state.grads), m(state.m);
    for (const TrainParam& p : model.params) {
      if (model.is_frozen(p)) continue;
      const size_t off = static_cast<size_t>(p.offset), len = static_cast<size_t>(p.numel());
      sgd_step(w.subspan(off, len), g.subspan(off, len),
               o.momentum != 0.0f ? m.subspan(off, len) : std::span<float>{},
               static_cast<float>(o.lr * vit_train_lr_scale(model, p, o.layer_decay)), o.momentum,
               p.decay ? o.weight_decay : 0.0f, state.step == 1);
    }
  }
  return grad_norm;
}

void save_train_checkpoint(const std::string& path, const VitTrainModel& model,
                           const VitTrainState& state,
                           const std::map<std::string, std::string>& metadata,
                           const CheckpointExtras& extra) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  auto add = [&](const std::string& prefix, const std::vector<float>& buffer) {
    if (buffer.empty()) return;
    check(buffer.size() == model.weights.size(), "save_train_checkpoint: optimiser state of another size");
    for (const TrainParam& p : model.params) {
      Tensor t(p.shape);
      std::copy_n(buffer.data() + p.offset, p.numel(), t.data());
      tensors.emplace_back(prefix + p.name, std::move(t));
    }
  };
  add("weight.", model.weights);
  add("m.", state.m);
  add("v.", state.v);
  for (const auto& [name, buffer] : extra) {
    check(buffer != nullptr && !buffer->empty(), "save_train_checkpoint: extra tensor '" + name + "' is empty");
    Tensor t({static_cast<int64_t>(buffer->size())});
    std::copy(buffer->begin(), buffer->end(), t.data());
    tensors.emplace_back(name, std::move(t));
  }
  std::map<std::string, std::string> meta = metadata;
  meta["step"] = std::to_string(state.step);
  meta["architecture"] = model.architecture;
  save_safetensors(path, tensors, meta);
}

std::map<std::string, std::string> load_train_checkpoint(const std::string& path,
                                                         VitTrainModel& model, VitTrainState& state,
                                                         const CheckpointExtras& extra) {
  const SafeTensors st = SafeTensors::open(path);
  auto read = [&](const std::string& prefix, std::vector<float>& buffer, bool required) {
    if (!required && !st.contains(prefix + model.params.front().name)) {
      buffer.clear();
      return;
    }
    buffer.assign(model.weights.size(), 0.0f);
    for (const TrainParam& p : model.params) {
      const std::string name = prefix + p.name;
      check(st.contains(name), path + ": missing tensor '" + name + "' (a checkpoint of another model?)");
      check(st.info(name).shape == p.shape, path + ": tensor '" + name + "' has shape " +
                                                shape_str(st.info(name).shape) + ", expected " +
                                                shape_str(p.shape));
      st.read(name, 0, p.numel(), buffer.data() + p.offset);
    }
  };
  std::vector<float> weights;
  read("weight.", weights, true);
  VitTrainState restored;
  read("m.", restored.m, false);
  read("v.", restored.v, false);
  std::map<std::string, std::string> meta = st.metadata();
  check(meta.count("step"), path + ": no \"step\" in its metadata (not a training checkpoint)");
  restored.step = std::stoll(meta["step"]);
  restored.grads.assign(model.weights.size(), 0.0f);
  if (restored.m.empty()) restored.m.assign(model.weights.size(), 0.0f);
  std::vector<std::vector<float>> extras(extra.size());
  for (size_t i = 0; i < extra.size(); ++i) {
    const std::string& name = extra[i].first;
    check(st.contains(name), path + ": missing tensor '" + name + "' (a checkpoint of a run without it?)");
    const int64_t n = shape_numel(st.info(name).shape);
    extras[i].resize(static_cast<size_t>(n));
    st.read(name, 0, n, extras[i].data());
  }
  for (size_t i = 0; i < extra.size(); ++i) *extra[i].second = std::move(extras[i]);
  model.weights = std::move(weights);
  state = std::move(restored);
  return meta;
}

}  // namespace tessera
