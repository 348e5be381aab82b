// The ViT + DETR decoder detector's training pass (tessera/detr_train.hpp): vit_train's encoder
// pass, the decoder's forward over unpacked weights (detr.cpp's numerics) with what its backward
// needs, the backward beside it, and the set loss over every supervised layer.
#include "tessera/detr_train.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "model_internal.hpp"
#include "tessera/backward.hpp"
#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/safetensors.hpp"
#include "train_internal.hpp"

namespace fs = std::filesystem;

namespace tessera {
namespace {

using detail::Config;

using detail::relu_backward;
const auto& linear_forward = detail::train_linear;
const auto& relu = detail::relu_inplace;
void sized(std::vector<float>& v, int64_t n) { v.assign(static_cast<size_t>(n), 0.0f); }
void zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }
// out[b·rows·D + i] = x[b·rows·D + i] + add[i] for each of B blocks of rows·D.
void add_rows(const float* x, const float* add, int64_t B, int64_t n, float* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) out[b * n + i] = x[b * n + i] + add[i];
}
// dadd[i] += Σ_b d[b·n + i].
void sum_rows(const float* d, int64_t B, int64_t n, float* dadd) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) dadd[i] += d[b * n + i];
}

// The head's parameters (or a gradient buffer laid out alike).
struct DetrLayerView {
  float *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *o_b, *n1_w, *n1_b;
  float *cq_w, *cq_b, *ck_w, *ck_b, *cv_w, *cv_b, *co_w, *co_b, *n2_w, *n2_b;
  float *fc1_w, *fc1_b, *fc2_w, *fc2_b, *n3_w, *n3_b;
};
struct DetrView {
  float *proj_w, *proj_b, *query_pos;
  std::vector<DetrLayerView> layers;
  float *norm_w, *norm_b, *class_w, *class_b;
  float *box_w[3], *box_b[3];
};
DetrView bind_detr(const VitTrainModel& m, float* buffer) {
  auto at = [&](const std::string& name) { return buffer + m.param(name).offset; };
  DetrView v{};
  v.proj_w = at("input_projection.weight"), v.proj_b = at("input_projection.bias");
  v.query_pos = at("model.query_position_embeddings.weight");
  for (int64_t i = 0; i < m.detr.layers; ++i) {
    const std::string l = "model.decoder.layers." + std::to_string(i) + ".";
    const std::string s = l + "self_attn.", x = l + "encoder_attn.";
    DetrLayerView lv{};
    lv.q_w = at(s + "q_proj.weight"), lv.q_b = at(s + "q_proj.bias");
    lv.k_w = at(s + "k_proj.weight"), lv.k_b = at(s + "k_proj.bias");
    lv.v_w = at(s + "v_proj.weight"), lv.v_b = at(s + "v_proj.bias");
    lv.o_w = at(s + "out_proj.weight"), lv.o_b = at(s + "out_proj.bias");
    lv.n1_w = at(l + "self_attn_layer_norm.weight"), lv.n1_b = at(l + "self_attn_layer_norm.bias");
    lv.cq_w = at(x + "q_proj.weight"), lv.cq_b = at(x + "q_proj.bias");
    lv.ck_w = at(x + "k_proj.weight"), lv.ck_b = at(x + "k_proj.bias");
    lv.cv_w = at(x + "v_proj.weight"), lv.cv_b = at(x + "v_proj.bias");
    lv.co_w = at(x + "out_proj.weight"), lv.co_b = at(x + "out_proj.bias");
    lv.n2_w = at(l + "encoder_attn_layer_norm.weight"), lv.n2_b = at(l + "encoder_attn_layer_norm.bias");
    lv.fc1_w = at(l + "fc1.weight"), lv.fc1_b = at(l + "fc1.bias");
    lv.fc2_w = at(l + "fc2.weight"), lv.fc2_b = at(l + "fc2.bias");
    lv.n3_w = at(l + "final_layer_norm.weight"), lv.n3_b = at(l + "final_layer_norm.bias");
    v.layers.push_back(lv);
  }
  v.norm_w = at("model.decoder.layernorm.weight"), v.norm_b = at("model.decoder.layernorm.bias");
  v.class_w = at("class_labels_classifier.weight"), v.class_b = at("class_labels_classifier.bias");
  for (int i = 0; i < 3; ++i) {
    const std::string l = "bbox_predictor.layers." + std::to_string(i) + ".";
    v.box_w[i] = at(l + "weight"), v.box_b[i] = at(l + "bias");
  }
  return v;
}

// The encoder's parameters (its classifier dropped), then the head's, in buffer order.
std::vector<TrainParam> detr_params(const VitConfig& c, const std::string& base, const DetrHeadShape& h,
                                    int64_t num_labels, bool mask_token = false) {
  std::vector<TrainParam> out = detail::vit_train_params(c, base, 1, mask_token);
  while (!out.empty() && out.back().name.starts_with("classifier.")) out.pop_back();
  int64_t offset = out.back().offset + out.back().numel();
  auto add = [&](const std::string& name, Shape shape, bool decay) {
    TrainParam tp{name, std::move(shape), offset, decay};
    offset += tp.numel();
    out.push_back(std::move(tp));
  };
  const int64_t D = h.d_model, F = h.ffn, denc = c.hidden_size;
  add("input_projection.weight", h.conv_projection ? Shape{D, denc, 1, 1} : Shape{D, denc}, true);
  add("input_projection.bias", {D}, false);
  add("model.query_position_embeddings.weight", {h.queries, D}, false);
  for (int64_t i = 0; i < h.layers; ++i) {
    const std::string l = "model.decoder.layers." + std::to_string(i) + ".";
    for (const char* att : {"self_attn.", "encoder_attn."}) {
      for (const char* p : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
        add(l + att + p + ".weight", {D, D}, true);
        add(l + att + p + ".bias", {D}, false);
      }
      const std::string norm = std::string(att) == "self_attn." ? "self_attn_layer_norm" : "encoder_attn_layer_norm";
      add(l + norm + ".weight", {D}, false);
      add(l + norm + ".bias", {D}, false);
    }
    add(l + "fc1.weight", {F, D}, true);
    add(l + "fc1.bias", {F}, false);
    add(l + "fc2.weight", {D, F}, true);
    add(l + "fc2.bias", {D}, false);
    add(l + "final_layer_norm.weight", {D}, false);
    add(l + "final_layer_norm.bias", {D}, false);
  }
  add("model.decoder.layernorm.weight", {D}, false);
  add("model.decoder.layernorm.bias", {D}, false);
  add("class_labels_classifier.weight", {num_labels + 1, D}, true);
  add("class_labels_classifier.bias", {num_labels + 1}, false);
  for (int i = 0; i < 3; ++i) {
    const std::string l = "bbox_predictor.layers." + std::to_string(i) + ".";
    add(l + "weight", {i < 2 ? D : 4, D}, true);
    add(l + "bias", {i < 2 ? D : 4}, false);
  }
  return out;
}

void check_head(const DetrHeadShape& h, const std::string& where) {
  check(h.d_model > 0 && h.queries > 0 && h.layers > 0 && h.heads > 0 && h.ffn > 0,
        where + ": d_model, num_queries, decoder_layers, decoder_attention_heads and decoder_ffn_dim must be positive");
  check(h.d_model % h.heads == 0, where + ": d_model " + std::to_string(h.d_model) +
                                      " is not a multiple of decoder_attention_heads " + std::to_string(h.heads));
  check(h.d_model % 4 == 0, where + ": DETR's sine position embedding needs d_model divisible by 4");
}

// backbone: the backbone_config to write (empty: a ViTModel's, from m.config).
nlohmann::ordered_json detr_config(const VitTrainModel& m, const std::vector<std::string>& labels,
                                   nlohmann::ordered_json bb = {}) {
  const VitConfig& c = m.config;
  const DetrHeadShape& h = m.detr;
  if (bb.is_null()) {
    bb = detail::hf_train_config(c, "ViTModel", "vit", c.image_height, labels, {});
    if (c.image_height != c.image_width) bb["image_size"] = {c.image_height, c.image_width};
  }
  for (const char* drop : {"architectures", "id2label", "label2id", "torch_dtype", "problem_type"}) bb.erase(drop);
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object(), label2id = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) {
    id2label[std::to_string(i)] = labels[i];
    label2id[labels[i]] = i;
  }
  nlohmann::ordered_json cfg = {{"architectures", {"VitDetrForObjectDetection"}},
          {"model_type", "vit-detr"},
          {"backbone_config", bb},
          {"d_model", h.d_model},
          {"num_queries", h.queries},
          {"decoder_layers", h.layers},
          {"decoder_attention_heads", h.heads},
          {"decoder_ffn_dim", h.ffn},
          {"activation_function", "relu"},
          {"decoder_layer_norm_eps", detail::shortest(h.eps)},
          {"position_embedding_type", "sine"},
          {"auxiliary_loss", h.auxiliary_loss},
          {"class_cost", 1},
          {"bbox_cost", 5},
          {"giou_cost", 2},
          {"bbox_loss_coefficient", 5},
          {"giou_loss_coefficient", 2},
          {"eos_coefficient", 0.1},
          {"num_labels", labels.size()},
          {"id2label", id2label},
          {"label2id", label2id},
          {"torch_dtype", "float32"}};
  if (h.window > 0) cfg["encoder_window"] = {{"size", h.window}, {"stride", h.window_stride}};
  if (h.window > 0 && h.window_centre) cfg["encoder_window"]["merge"] = "centre";
  return cfg;
}

// The head's weights of a new model (the encoder's are set by the caller).
void init_head(VitTrainModel& m, uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x44455452ull);  // "DETR"
  std::normal_distribution<double> normal(0.0, 1.0);
  bool in_head = false;
  for (const TrainParam& p : m.params) {
    in_head = in_head || p.name == "input_projection.weight";
    if (!in_head) continue;
    float* w = m.weights.data() + p.offset;
    if (p.name == "model.query_position_embeddings.weight") {
      for (int64_t i = 0; i < p.numel(); ++i) w[i] = static_cast<float>(normal(rng));
    } else if (p.decay) {
      const double fan_out = static_cast<double>(p.shape[0]), fan_in = static_cast<double>(p.numel() / p.shape[0]);
      const double limit = std::sqrt(6.0 / (fan_in + fan_out));
      std::uniform_real_distribution<double> uniform(-limit, limit);
      for (int64_t i = 0; i < p.numel(); ++i) w[i] = static_cast<float>(uniform(rng));
    } else {
      const bool norm_weight = p.name.ends_with("layer_norm.weight") || p.name.ends_with("layernorm.weight");
      std::fill_n(w, p.numel(), norm_weight ? 1.0f : 0.0f);
    }
  }
}

}  // namespace

VitTrainModel load_detr_train_model(const std::string& dir_string) {
  const fs::path dir(dir_string);
  const std::string config_file = (dir / "config.json").string();
  VitTrainModel m;
  m.config_json = detail::read_text(config_file);
  const Config cfg{detail::parse_json(m.config_json, config_file), config_file};
  check(cfg.string("model_type", "") == "vit-detr",
        config_file + ": DETR head training reads model_type \"vit-detr\", got \"" + cfg.string("model_type", "") + "\"");
  const Config bb = cfg.sub("backbone_config");
  const std::string bmt = bb.string("model_type", "vit");
  check(bmt == "vit" || bmt == "deit" || bmt == "dinov2",
        bb.file + ": training a DETR head supports ViT, DeiT and DINOv2 backbones, not \"" + bmt + "\"");
  check(cfg.string("activation_function", "relu") == "relu", config_file + ": activation_function must be relu");
  check(cfg.string("position_embedding_type", "sine") == "sine", config_file + ": position_embedding_type must be sine");
  m.architecture = "VitDetrForObjectDetection";
  m.headless = true;
  m.base = bmt + ".";
  m.config = detail::hf_vit_config(bb, bmt);
  check(m.config.activation == MlpActivation::Gelu || m.config.activation == MlpActivation::SwiGlu,
        config_file + ": training supports exact GELU and DINOv2's SwiGLU MLPs");
  check(m.config.num_distillation_tokens == 0 || bmt == "deit", config_file + ": unexpected distillation token");
  DetrHeadShape& h = m.detr;
  h.d_model = cfg.positive("d_model"), h.queries = cfg.positive("num_queries");
  h.layers = cfg.positive("decoder_layers"), h.heads = cfg.positive("decoder_attention_heads");
  h.ffn = cfg.positive("decoder_ffn_dim");
  h.eps = static_cast<float>(cfg.number("decoder_layer_norm_eps", 1e-5));
  h.auxiliary_loss = cfg.boolean("auxiliary_loss", false);
  if (cfg.has("encoder_window")) {
    const Config win = cfg.sub("encoder_window");
    h.window = win.positive("size"), h.window_stride = win.positive("stride");
    h.window_centre = detail::window_merge_centre(win);
  }
  check_head(h, config_file);
  check(h.window == 0 || (m.config.image_height == h.window && m.config.image_width == h.window &&
                          h.window % m.config.patch_size == 0 && h.window_stride % m.config.patch_size == 0 &&
                          h.window_stride <= h.window),
        config_file + ": encoder_window size " + std::to_string(h.window) + " / stride " + std::to_string(h.window_stride) +
            ": the backbone's image_size must be the window, both multiples of the patch, stride at most size");

  const std::string file = (dir / "model.safetensors").string();
  check(fs::exists(file), dir.string() + ": no model.safetensors (training reads single-file checkpoints)");
  const SafeTensors st = SafeTensors::open(file);
  for (const char* need : {"input_projection.weight", "class_labels_classifier.weight"})
    check(st.contains(need), file + ": missing tensor '" + std::string(need) + "'");
  h.conv_projection = st.info("input_projection.weight").shape.size() == 4;
  const Shape& cs = st.info("class_labels_classifier.weight").shape;
  check(cs.size() == 2 && cs[0] >= 2 && cs[1] == h.d_model,
        file + ": tensor 'class_labels_classifier.weight' has shape " + shape_str(cs) + ", expected [num_labels + 1, " +
            std::to_string(h.d_model) + "]");
  m.num_labels = cs[0] - 1;
  if (cfg.has("num_labels"))
    check(cfg.integer("num_labels") == m.num_labels,
          config_file + ": num_labels " + std::to_string(cfg.integer("num_labels")) +
              " but class_labels_classifier.weight has " + std::to_string(cs[0]) + " rows (num_labels + 1)");
  m.params = detr_params(m.config, m.base, h, m.num_labels,
                         m.config.layer_scale && st.contains(m.base + "embeddings.mask_token"));
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  for (const TrainParam& p : m.params) {
    check(st.contains(p.name), file + ": missing tensor '" + p.name + "' (expected shape " + shape_str(p.shape) + ")");
    const TensorInfo& info = st.info(p.name);
    check(info.shape == p.shape, file + ": tensor '" + p.name + "' has shape " + shape_str(info.shape) +
                                     ", expected " + shape_str(p.shape));
    st.read(p.name, 0, p.numel(), m.weights.data() + p.offset);
  }
  check(!st.contains("model.decoder.layers." + std::to_string(h.layers) + ".fc1.weight"),
        file + ": has more decoder layers than decoder_layers = " + std::to_string(h.layers));
  check(!st.contains(m.base + "encoder.layer." + std::to_string(m.config.num_hidden_layers) + ".attention.output.dense.weight"),
        file + ": has more encoder layers than num_hidden_layers = " + std::to_string(m.config.num_hidden_layers));
  return m;
}

VitTrainModel make_detr_train_model(const VitConfig& encoder, const DetrHeadConfig& head,
                                    const std::vector<std::string>& labels, uint64_t seed) {
  check(!labels.empty(), "make_detr_train_model: no labels");
  VitConfig c = encoder;
  c.num_detection_tokens = 0;
  const VitTrainModel vit = make_vit_train_model(c, labels, seed);
  return detr_from_vit(vit, head, labels, c.image_height, c.image_width, seed);
}

VitTrainModel detr_from_vit(const VitTrainModel& vit, const DetrHeadConfig& head,
                            const std::vector<std::string>& labels, int64_t height, int64_t width, uint64_t seed) {
  check(!labels.empty(), "detr_from_vit: no labels");
  const bool dinov2 = vit.base == "dinov2.";
  check(!vit.teacher && !vit.detection && !vit.is_detr() && vit.layout == "hf" &&
            vit.config.num_distillation_tokens == 0 && vit.config.num_register_tokens == 0 &&
            (dinov2 || (!vit.class_mean && !vit.config.layer_scale && (vit.base == "vit." || vit.base == "deit."))),
        "a DETR head on a " + vit.architecture + ": only a Hugging Face ViT, DeiT (without a distillation "
        "token) or DINOv2 classifier can be its encoder");
  check(height > 0 && width > 0 && height % vit.config.patch_size == 0 && width % vit.config.patch_size == 0,
        "a DETR head: image size " + std::to_string(height) + "x" + std::to_string(width) +
            " is not a positive multiple of the patch size " + std::to_string(vit.config.patch_size));
  check(height == width, "a DETR head: Hugging Face ViT backbones train at a square size, got " +
                             std::to_string(height) + "x" + std::to_string(width));
  const int64_t p = vit.config.patch_size;
  check(head.window == 0 || (!dinov2 && head.window <= height && head.window % p == 0 && head.window_stride > 0 &&
                             head.window_stride <= head.window && head.window_stride % p == 0),
        "a DETR head: encoder window " + std::to_string(head.window) + " / stride " + std::to_string(head.window_stride) +
            " must be multiples of the patch size " + std::to_string(p) + ", the window at most the image size " +
            std::to_string(height) + " and the stride at most the window (ViT / DeiT encoders)");
  VitTrainModel m;
  m.architecture = "VitDetrForObjectDetection";
  m.headless = true;
  m.base = dinov2 ? "dinov2." : "vit.";
  m.config = vit.config;
  // A ViT / DeiT table is resized to the new size below (the backbone's image_size becomes it); a
  // DINOv2 backbone keeps its table and image_size and interpolates at every size, as upstream.
  if (!dinov2) m.config.image_height = m.config.image_width = head.window > 0 ? head.window : height;
  m.detr.window = head.window, m.detr.window_stride = head.window_stride;
  m.detr.window_centre = head.window > 0 && head.window_centre;
  m.detr.d_model = head.d_model, m.detr.queries = head.queries, m.detr.layers = head.layers;
  m.detr.heads = head.heads, m.detr.ffn = head.ffn, m.detr.auxiliary_loss = head.auxiliary_loss;
  check_head(m.detr, "a DETR head");
  m.num_labels = static_cast<int64_t>(labels.size());
  const bool mask_token = std::any_of(vit.params.begin(), vit.params.end(), [&](const TrainParam& p) {
    return p.name == vit.base + "embeddings.mask_token";
  });
  m.params = detr_params(m.config, m.base, m.detr, m.num_labels, mask_token);
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  for (const TrainParam& p : m.params) {  // the encoder, by name (a DeiT's "deit." becomes "vit.")
    if (!p.name.starts_with(m.base)) continue;
    const std::string from = vit.base + p.name.substr(m.base.size());
    const auto src = vit.view(std::span<const float>(vit.weights), from);
    float* dst = m.weights.data() + p.offset;
    if (p.name == m.base + "embeddings.position_embeddings" && !dinov2) {
      // [prefix, grid] at the classifier's grid → the new grid: bicubic (align_corners False,
      // by size), the prefix rows kept; training at this size then uses the table as it is.
      const VitConfig& from_c = vit.config;
      const int64_t d = from_c.hidden_size, pre = from_c.num_prefix_tokens();
      const int64_t gh = from_c.grid_height(), gw = from_c.grid_width();
      const int64_t nh = m.config.grid_height(), nw = m.config.grid_width();
      std::copy_n(src.data(), pre * d, dst);
      std::vector<float> chw(static_cast<size_t>(d * gh * gw)), out(static_cast<size_t>(d * nh * nw));
      for (int64_t i = 0; i < gh * gw; ++i)
        for (int64_t k = 0; k < d; ++k) chw[k * gh * gw + i] = src[(pre + i) * d + k];
      Interpolation how;
      how.mode = InterpolationMode::Bicubic;
      interpolate_forward(how, chw.data(), d, gh, gw, out.data(), nh, nw);
      for (int64_t i = 0; i < nh * nw; ++i)
        for (int64_t k = 0; k < d; ++k) dst[(pre + i) * d + k] = out[k * nh * nw + i];
      continue;
    }
    check(static_cast<int64_t>(src.size()) == p.numel(), "detr_from_vit: " + from + " has another size");
    std::copy(src.begin(), src.end(), dst);
  }
  init_head(m, seed);
  nlohmann::ordered_json backbone;
  if (dinov2) {  // the classifier's own Dinov2Config (layer scale, SwiGLU, MLP ratio ...), head fields dropped
    backbone = nlohmann::ordered_json::parse(vit.config_json);
    for (const char* drop : {"id2label", "label2id", "apply_layernorm", "out_features", "out_indices", "stage_names"})
      backbone.erase(drop);
  }
  m.config_json = detr_config(m, labels, backbone).dump(2) + "\n";
  return m;
}

std::vector<std::string> detr_train_presets() { return {"detr-digits"}; }

VitConfig detr_train_preset(const std::string& arch, int64_t height, int64_t width, DetrHeadConfig* head) {
  check(arch == "detr-digits", "--arch " + arch + ": unknown DETR preset (known: detr-digits)");
  VitConfig c;
  c.image_height = height, c.image_width = width;
  c.num_channels = 3, c.qkv_bias = true;
  c.patch_size = 8, c.hidden_size = 128, c.num_hidden_layers = 6, c.num_attention_heads = 4;
  c.intermediate_size = 384, c.layer_norm_eps = 1e-6f;
  check(height > 0 && width > 0 && height % c.patch_size == 0 && width % c.patch_size == 0,
        "--arch " + arch + ": image size " + std::to_string(height) + "x" + std::to_string(width) +
            " is not a positive multiple of the patch size " + std::to_string(c.patch_size));
  if (head) *head = DetrHeadConfig{};
  return c;
}

std::string detr_preprocessor_json(int64_t height, int64_t width) {
  return detail::fixed_size_detection_processor_json("DetrImageProcessor", height, width);
}

SetLossConfig detr_set_loss_config(const VitTrainModel& model) { return detail::set_loss_config_from(model.config_json); }

namespace {

// Sizes the head's activations for a batch of B images on a gh x gw patch grid.
void size_head(const VitTrainModel& model, int64_t B, int64_t gh, int64_t gw, DetrTrainActivations& acts) {
  const VitConfig& c = model.config;
  const DetrHeadShape& hs = model.detr;
  const int64_t N = gh * gw, denc = c.hidden_size;
  const int64_t D = hs.d_model, Q = hs.queries, F = hs.ffn, H = hs.heads, M = B * Q, R = B * N;
  const int64_t K1 = model.num_labels + 1;
  const int64_t outputs = hs.auxiliary_loss ? hs.layers : 1;
  if (acts.batch != B || acts.grid_h != gh || acts.grid_w != gw ||
      acts.layers.size() != static_cast<size_t>(hs.layers) || acts.memory.size() != static_cast<size_t>(R * D) ||
      acts.heads.size() != static_cast<size_t>(outputs) ||
      acts.heads[0].logits.size() != static_cast<size_t>(M * K1) || acts.enc_rows.size() != static_cast<size_t>(R * denc)) {
    acts.batch = B, acts.grid_h = gh, acts.grid_w = gw;
    sized(acts.enc_rows, R * denc), sized(acts.enc_norm, R * denc), sized(acts.enc_mean, R), sized(acts.enc_rstd, R);
    sized(acts.memory, R * D), sized(acts.memory_pos, R * D);
    const Tensor pos = detr_sine_position_embedding(gh, gw, D);
    acts.pos.assign(pos.data(), pos.data() + N * D);
    acts.layers.assign(static_cast<size_t>(hs.layers), {});
    for (auto& l : acts.layers) {
      for (auto* v : {&l.x, &l.q, &l.k, &l.v, &l.ctx, &l.s1, &l.x1, &l.cq, &l.cctx, &l.s2, &l.x2, &l.s3, &l.x3, &l.out})
        sized(*v, M * D);
      for (auto* v : {&l.mean1, &l.rstd1, &l.mean2, &l.rstd2, &l.mean3, &l.rstd3, &l.mean_a, &l.rstd_a}) sized(*v, M);
      sized(l.lse, B * H * Q), sized(l.clse, B * H * Q), sized(l.ck, R * D), sized(l.cv, R * D), sized(l.hidden, M * F);
    }
    sized(acts.final_out, M * D), sized(acts.mean_f, M), sized(acts.rstd_f, M);
    acts.heads.assign(static_cast<size_t>(outputs), {});
    for (auto& h : acts.heads) sized(h.logits, M * K1), sized(h.box1, M * D), sized(h.box2, M * D), sized(h.boxes, M * 4);
    for (auto* v : {&acts.dx, &acts.dx_prev, &acts.ds, &acts.da, &acts.dq, &acts.dk, &acts.dv, &acts.dctx, &acts.dh1,
                    &acts.dh2, &acts.dhead, &acts.scratch})
      sized(*v, M * D);
    sized(acts.dhidden, M * F), sized(acts.dmem, R * D), sized(acts.dmem_pos, R * D), sized(acts.dck, R * D);
    sized(acts.dcv, R * D), sized(acts.denc_norm, R * denc), sized(acts.denc_rows, R * denc);
  }
}

// The head on acts.enc_norm (the encoder's normed patch rows, [B·N, denc]) → acts.heads.
void head_forward(const VitTrainModel& model, DetrTrainActivations& acts) {
  const DetrHeadShape& hs = model.detr;
  const int64_t B = acts.batch, N = acts.grid_h * acts.grid_w, denc = model.config.hidden_size;
  const int64_t D = hs.d_model, Q = hs.queries, F = hs.ffn, H = hs.heads, hd = D / H, M = B * Q, R = B * N;
  const int64_t K1 = model.num_labels + 1;
  const int64_t outputs = hs.auxiliary_loss ? hs.layers : 1;
  const DetrView w = bind_detr(model, const_cast<float*>(model.weights.data()));
  linear_forward(acts.enc_norm.data(), R, w.proj_w, w.proj_b, D, denc, acts.memory.data());
  add_rows(acts.memory.data(), acts.pos.data(), B, N * D, acts.memory_pos.data());

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* a = acts.scratch.data();
  std::vector<float> zeros(static_cast<size_t>(M * D), 0.0f);
  const float* x = zeros.data();  // DetrDecoder: inputs_embeds = zeros
  for (int64_t li = 0; li < hs.layers; ++li) {
    auto& L = acts.layers[static_cast<size_t>(li)];
    const DetrLayerView& lw = w.layers[static_cast<size_t>(li)];
    std::copy(x, x + M * D, L.x.begin());
    // self-attention: q, k from x + qpos, v from x
    add_rows(L.x.data(), w.query_pos, B, Q * D, a);
    linear_forward(a, M, lw.q_w, lw.q_b, D, D, L.q.data());
    linear_forward(a, M, lw.k_w, lw.k_b, D, D, L.k.data());
    linear_forward(L.x.data(), M, lw.v_w, lw.v_b, D, D, L.v.data());
    attention_forward(B, H, Q, Q, hd, {L.q.data(), Q * D, D}, {L.k.data(), Q * D, D}, {L.v.data(), Q * D, D},
                      {L.ctx.data(), Q * D, D}, scale, L.lse.data());
    linear_forward(L.ctx.data(), M, lw.o_w, lw.o_b, D, D, L.s1.data());
    for (int64_t i = 0; i < M * D; ++i) L.s1[i] += L.x[i];
    layer_norm_forward(L.s1.data(), M, D, lw.n1_w, lw.n1_b, hs.eps, L.x1.data(), L.mean1.data(), L.rstd1.data());
    // cross-attention: q from x1 + qpos, k from memory + sine, v from memory
    add_rows(L.x1.data(), w.query_pos, B, Q * D, a);
    linear_forward(a, M, lw.cq_w, lw.cq_b, D, D, L.cq.data());
    linear_forward(acts.memory_pos.data(), R, lw.ck_w, lw.ck_b, D, D, L.ck.data());
    // A windowed encoder's rows know only their place in their window: values carry the sine code too.
    linear_forward((hs.window > 0 ? acts.memory_pos : acts.memory).data(), R, lw.cv_w, lw.cv_b, D, D, L.cv.data());
    attention_forward(B, H, Q, N, hd, {L.cq.data(), Q * D, D}, {L.ck.data(), N * D, D}, {L.cv.data(), N * D, D},
                      {L.cctx.data(), Q * D, D}, scale, L.clse.data());
    linear_forward(L.cctx.data(), M, lw.co_w, lw.co_b, D, D, L.s2.data());
    for (int64_t i = 0; i < M * D; ++i) L.s2[i] += L.x1[i];
    layer_norm_forward(L.s2.data(), M, D, lw.n2_w, lw.n2_b, hs.eps, L.x2.data(), L.mean2.data(), L.rstd2.data());
    // feed-forward
    linear_forward(L.x2.data(), M, lw.fc1_w, lw.fc1_b, F, D, L.hidden.data());
    relu(L.hidden.data(), M * F);
    linear_forward(L.hidden.data(), M, lw.fc2_w, lw.fc2_b, D, F, L.s3.data());
    for (int64_t i = 0; i < M * D; ++i) L.s3[i] += L.x2[i];
    layer_norm_forward(L.s3.data(), M, D, lw.n3_w, lw.n3_b, hs.eps, L.x3.data(), L.mean3.data(), L.rstd3.data());
    x = L.x3.data();
    if (hs.auxiliary_loss) {
      layer_norm_forward(L.x3.data(), M, D, w.norm_w, w.norm_b, hs.eps, L.out.data(), L.mean_a.data(),
                         L.rstd_a.data());
      x = L.out.data();
    }
  }
  layer_norm_forward(x, M, D, w.norm_w, w.norm_b, hs.eps, acts.final_out.data(), acts.mean_f.data(), acts.rstd_f.data());
  for (int64_t o = 0; o < outputs; ++o) {
    auto& h = acts.heads[static_cast<size_t>(o)];
    h.input = o + 1 == outputs ? acts.final_out.data() : acts.layers[static_cast<size_t>(o)].out.data();
    linear_forward(h.input, M, w.class_w, w.class_b, K1, D, h.logits.data());
    linear_forward(h.input, M, w.box_w[0], w.box_b[0], D, D, h.box1.data());
    relu(h.box1.data(), M * D);
    linear_forward(h.box1.data(), M, w.box_w[1], w.box_b[1], D, D, h.box2.data());
    relu(h.box2.data(), M * D);
    linear_forward(h.box2.data(), M, w.box_w[2], w.box_b[2], 4, D, h.boxes.data());
    for (float& v : h.boxes) v = 1.0f / (1.0f + std::exp(-v));
  }
}

}  // namespace

void detr_train_forward(const VitTrainModel& model, const Tensor& pixel_values, DetrTrainActivations& acts) {
  check(model.is_detr(), "detr_train_forward: not a vit-detr model");
  const VitConfig& c = model.config;
  if (model.detr.window > 0) {
    // A windowed encoder trains frozen: its merged rows are the head's input, as from the cache.
    check(model.frozen_encoder, "detr_train_forward: a windowed DETR encoder trains frozen (--freeze-encoder)");
    check(pixel_values.ndim() == 4, "detr_train_forward: pixel values must be [B, C, H, W]");
    const int64_t B = pixel_values.dim(0), gh = pixel_values.dim(2) / c.patch_size, gw = pixel_values.dim(3) / c.patch_size;
    std::vector<float> features(static_cast<size_t>(B * gh * gw * c.hidden_size));
    detr_encode_features(model, pixel_values, acts, features.data());
    detr_train_forward_features(model, features.data(), B, gh, gw, acts);
    return;
  }
  vit_train_encoder_forward(model, pixel_values, acts.encoder);
  const VitTrainActivations& e = acts.encoder;
  const int64_t B = e.batch, gh = e.height / c.patch_size, gw = e.width / c.patch_size, N = gh * gw;
  const int64_t pre = c.num_prefix_tokens(), T = pre + N, denc = c.hidden_size, R = B * N;
  size_head(model, B, gh, gw, acts);
  const VitTrainView ev = bind_view(model, const_cast<float*>(model.weights.data()));
  // The encoder's final norm (HF ViTModel's layernorm) on the patch rows; the prefix is dropped.
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(acts.enc_rows.data() + b * N * denc, e.x_out.data() + (b * T + pre) * denc, sizeof(float) * N * denc);
  layer_norm_forward(acts.enc_rows.data(), R, denc, ev.norm_w, ev.norm_b, c.layer_norm_eps, acts.enc_norm.data(),
                     acts.enc_mean.data(), acts.enc_rstd.data());
  acts.from_features = false;
  head_forward(model, acts);
}

void detr_encode_features(const VitTrainModel& model, const Tensor& pixel_values, DetrTrainActivations& acts,
                          float* features) {
  check(model.is_detr(), "detr_encode_features: not a vit-detr model");
  const VitConfig& c = model.config;
  const int64_t win = model.detr.window;
  check(pixel_values.ndim() == 4 && (win == 0 || (pixel_values.dim(2) >= win && pixel_values.dim(3) >= win)),
        "detr_encode_features: pixel values must be [B, C, H, W]" +
            (win > 0 ? ", at least " + std::to_string(win) + " a side (the encoder's window)" : std::string()));
  // A windowed encoder runs on the windows, as a batch of images of the window's size.
  vit_train_encoder_forward(model, win > 0 ? cut_windows(pixel_values, win, model.detr.window_stride) : pixel_values,
                            acts.encoder);
  const VitTrainActivations& e = acts.encoder;
  const int64_t B = e.batch, N = (e.height / c.patch_size) * (e.width / c.patch_size);
  const int64_t pre = c.num_prefix_tokens(), T = pre + N, denc = c.hidden_size, R = B * N;
  std::vector<float> rows(static_cast<size_t>(R * denc)), mean(static_cast<size_t>(R)), rstd(static_cast<size_t>(R));
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(rows.data() + b * N * denc, e.x_out.data() + (b * T + pre) * denc, sizeof(float) * N * denc);
  const VitTrainView ev = bind_view(model, const_cast<float*>(model.weights.data()));
  if (win == 0) {
    layer_norm_forward(rows.data(), R, denc, ev.norm_w, ev.norm_b, c.layer_norm_eps, features, mean.data(), rstd.data());
    return;
  }
  std::vector<float> normed(rows.size());
  layer_norm_forward(rows.data(), R, denc, ev.norm_w, ev.norm_b, c.layer_norm_eps, normed.data(), mean.data(),
                     rstd.data());
  merge_windows(normed.data(), pixel_values.dim(0), pixel_values.dim(2), pixel_values.dim(3), win,
                model.detr.window_stride, c.patch_size, N, 0, denc, features, model.detr.window_centre);
}

void detr_train_forward_features(const VitTrainModel& model, const float* features, int64_t batch, int64_t grid_h,
                                 int64_t grid_w, DetrTrainActivations& acts) {
  check(model.is_detr() && model.frozen_encoder,
        "detr_train_forward_features: the head alone trains on cached features (a vit-detr model, frozen encoder)");
  check(batch > 0 && grid_h > 0 && grid_w > 0, "detr_train_forward_features: empty batch");
  size_head(model, batch, grid_h, grid_w, acts);
  std::copy_n(features, batch * grid_h * grid_w * model.config.hidden_size, acts.enc_norm.begin());
  acts.from_features = true;
  head_forward(model, acts);
}

void detr_train_backward(const VitTrainModel& model, DetrTrainActivations& acts,
                         const std::vector<const float*>& dlogits, const std::vector<const float*>& dboxes,
                         std::span<float> grads) {
  check(grads.size() == model.weights.size(), "detr_train_backward: gradient buffer size differs from the weights'");
  check(acts.batch > 0 && model.is_detr(), "detr_train_backward: run detr_train_forward first");
  check(!acts.from_features || model.frozen_encoder,
        "detr_train_backward: a forward from cached features has no encoder activations to go back through");
  const VitConfig& c = model.config;
  const DetrHeadShape& hs = model.detr;
  VitTrainActivations& e = acts.encoder;
  const int64_t B = acts.batch, N = acts.grid_h * acts.grid_w, pre = c.num_prefix_tokens(), T = pre + N;
  const int64_t denc = c.hidden_size, D = hs.d_model, Q = hs.queries, F = hs.ffn, H = hs.heads, hd = D / H;
  const int64_t M = B * Q, R = B * N, K1 = model.num_labels + 1;
  const int64_t outputs = static_cast<int64_t>(acts.heads.size());
  check(static_cast<int64_t>(dlogits.size()) == outputs && static_cast<int64_t>(dboxes.size()) == outputs,
        "detr_train_backward: one dlogits and one dboxes per supervised output");
  const VitTrainView ev = bind_view(model, const_cast<float*>(model.weights.data()));
  const VitTrainView eg = bind_view(model, grads.data());
  const DetrView w = bind_detr(model, const_cast<float*>(model.weights.data()));
  const DetrView g = bind_detr(model, grads.data());

  // The heads: dhead[o] = d loss / d (head input o). Output o < outputs − 1 is layer o's normed
  // output (auxiliary); the last is final_out.
  std::vector<std::vector<float>> dinput(static_cast<size_t>(outputs), std::vector<float>(static_cast<size_t>(M * D)));
  std::vector<float> dz(static_cast<size_t>(M * 4));
  for (int64_t o = 0; o < outputs; ++o) {
    auto& h = acts.heads[static_cast<size_t>(o)];
    float* din = dinput[static_cast<size_t>(o)].data();
    linear_backward(h.input, w.class_w, dlogits[static_cast<size_t>(o)], M, K1, D, din, g.class_w, g.class_b);
    for (int64_t i = 0; i < M * 4; ++i) dz[i] = dboxes[static_cast<size_t>(o)][i] * h.boxes[i] * (1.0f - h.boxes[i]);
    zero(acts.dh2), zero(acts.dh1);
    linear_backward(h.box2.data(), w.box_w[2], dz.data(), M, 4, D, acts.dh2.data(), g.box_w[2], g.box_b[2]);
    relu_backward(h.box2.data(), acts.dh2.data(), M * D);
    linear_backward(h.box1.data(), w.box_w[1], acts.dh2.data(), M, D, D, acts.dh1.data(), g.box_w[1], g.box_b[1]);
    relu_backward(h.box1.data(), acts.dh1.data(), M * D);
    linear_backward(h.input, w.box_w[0], acts.dh1.data(), M, D, D, din, g.box_w[0], g.box_b[0]);
  }
  // The final decoder norm: its input is the last layer's x3, or its normed output with auxiliary loss.
  const auto& last = acts.layers.back();
  const float* final_in = hs.auxiliary_loss ? last.out.data() : last.x3.data();
  zero(acts.dx);  // d loss / d (output of the current layer), as the next layer reads it
  layer_norm_backward(dinput.back().data(), final_in, acts.mean_f.data(), acts.rstd_f.data(), w.norm_w, M, D,
                      acts.dx.data(), g.norm_w, g.norm_b);
  zero(acts.dmem), zero(acts.dmem_pos);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* a = acts.scratch.data();
  for (int64_t li = hs.layers - 1; li >= 0; --li) {
    auto& L = acts.layers[static_cast<size_t>(li)];
    const DetrLayerView& lw = w.layers[static_cast<size_t>(li)];
    const DetrLayerView& lg = g.layers[static_cast<size_t>(li)];
    if (hs.auxiliary_loss) {
      // out = LN_dec(x3) feeds the next layer (gradient in dx) and, below the last layer, the
      // auxiliary heads.
      if (li + 1 < outputs)
        for (int64_t i = 0; i < M * D; ++i) acts.dx[i] += dinput[static_cast<size_t>(li)][i];
      zero(acts.ds);
      layer_norm_backward(acts.dx.data(), L.x3.data(), L.mean_a.data(), L.rstd_a.data(), w.norm_w, M, D,
                          acts.ds.data(), g.norm_w, g.norm_b);
      std::swap(acts.dx, acts.ds);
    }
    // x3 = LN3(x2 + fc2(relu(fc1 x2)))
    float* ds = acts.ds.data();
    zero(acts.ds);
    layer_norm_backward(acts.dx.data(), L.s3.data(), L.mean3.data(), L.rstd3.data(), lw.n3_w, M, D, ds, lg.n3_w, lg.n3_b);
    float* dx2 = acts.dx.data();  // reuse: d loss / d x2
    std::copy(ds, ds + M * D, dx2);
    zero(acts.dhidden);
    linear_backward(L.hidden.data(), lw.fc2_w, ds, M, D, F, acts.dhidden.data(), lg.fc2_w, lg.fc2_b);
    relu_backward(L.hidden.data(), acts.dhidden.data(), M * F);
    linear_backward(L.x2.data(), lw.fc1_w, acts.dhidden.data(), M, F, D, dx2, lg.fc1_w, lg.fc1_b);
    // x2 = LN2(x1 + out_c(cross_attn))
    zero(acts.ds);
    layer_norm_backward(dx2, L.s2.data(), L.mean2.data(), L.rstd2.data(), lw.n2_w, M, D, ds, lg.n2_w, lg.n2_b);
    float* dx1 = acts.dx.data();
    std::copy(ds, ds + M * D, dx1);
    zero(acts.dctx);
    linear_backward(L.cctx.data(), lw.co_w, ds, M, D, D, acts.dctx.data(), lg.co_w, lg.co_b);
    zero(acts.dq), zero(acts.dck), zero(acts.dcv);
    attention_backward(B, H, Q, N, hd, {L.cq.data(), Q * D, D}, {L.ck.data(), N * D, D}, {L.cv.data(), N * D, D},
                       {L.cctx.data(), Q * D, D}, {acts.dctx.data(), Q * D, D}, L.clse.data(), scale,
                       {acts.dq.data(), Q * D, D}, {acts.dck.data(), N * D, D}, {acts.dcv.data(), N * D, D});
    add_rows(L.x1.data(), w.query_pos, B, Q * D, a);
    zero(acts.da);
    linear_backward(a, lw.cq_w, acts.dq.data(), M, D, D, acts.da.data(), lg.cq_w, lg.cq_b);
    for (int64_t i = 0; i < M * D; ++i) dx1[i] += acts.da[i];
    sum_rows(acts.da.data(), B, Q * D, g.query_pos);
    linear_backward(acts.memory_pos.data(), lw.ck_w, acts.dck.data(), R, D, D, acts.dmem_pos.data(), lg.ck_w, lg.ck_b);
    if (hs.window > 0)
      linear_backward(acts.memory_pos.data(), lw.cv_w, acts.dcv.data(), R, D, D, acts.dmem_pos.data(), lg.cv_w, lg.cv_b);
    else
      linear_backward(acts.memory.data(), lw.cv_w, acts.dcv.data(), R, D, D, acts.dmem.data(), lg.cv_w, lg.cv_b);
    // x1 = LN1(x + out(self_attn))
    zero(acts.ds);
    layer_norm_backward(dx1, L.s1.data(), L.mean1.data(), L.rstd1.data(), lw.n1_w, M, D, ds, lg.n1_w, lg.n1_b);
    float* dxin = acts.dx.data();
    std::copy(ds, ds + M * D, dxin);
    zero(acts.dctx);
    linear_backward(L.ctx.data(), lw.o_w, ds, M, D, D, acts.dctx.data(), lg.o_w, lg.o_b);
    zero(acts.dq), zero(acts.dk), zero(acts.dv);
    attention_backward(B, H, Q, Q, hd, {L.q.data(), Q * D, D}, {L.k.data(), Q * D, D}, {L.v.data(), Q * D, D},
                       {L.ctx.data(), Q * D, D}, {acts.dctx.data(), Q * D, D}, L.lse.data(), scale,
                       {acts.dq.data(), Q * D, D}, {acts.dk.data(), Q * D, D}, {acts.dv.data(), Q * D, D});
    add_rows(L.x.data(), w.query_pos, B, Q * D, a);
    zero(acts.da);
    linear_backward(a, lw.q_w, acts.dq.data(), M, D, D, acts.da.data(), lg.q_w, lg.q_b);
    linear_backward(a, lw.k_w, acts.dk.data(), M, D, D, acts.da.data(), lg.k_w, lg.k_b);
    for (int64_t i = 0; i < M * D; ++i) dxin[i] += acts.da[i];
    sum_rows(acts.da.data(), B, Q * D, g.query_pos);
    linear_backward(L.x.data(), lw.v_w, acts.dv.data(), M, D, D, dxin, lg.v_w, lg.v_b);
    // dx now holds d loss / d (this layer's input) = the previous layer's output (layer 0's is zeros).
  }
  // memory = input_projection(LN_enc(patch rows)); memory_pos = memory + sine.
  for (int64_t i = 0; i < R * D; ++i) acts.dmem[i] += acts.dmem_pos[i];
  zero(acts.denc_norm);
  linear_backward(acts.enc_norm.data(), w.proj_w, acts.dmem.data(), R, D, denc,
                  model.frozen_encoder ? nullptr : acts.denc_norm.data(), g.proj_w, g.proj_b);
  if (model.frozen_encoder) return;  // --freeze-encoder: the head's gradients only
  zero(acts.denc_rows);
  layer_norm_backward(acts.denc_norm.data(), acts.enc_rows.data(), acts.enc_mean.data(), acts.enc_rstd.data(),
                      ev.norm_w, R, denc, acts.denc_rows.data(), eg.norm_w, eg.norm_b);
  std::fill(e.dx.begin(), e.dx.end(), 0.0f);
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(e.dx.data() + (b * T + pre) * denc, acts.denc_rows.data() + b * N * denc, sizeof(float) * N * denc);
  vit_train_encoder_backward(model, e, grads);
}

namespace {

// The set loss on the heads of a forward already run, and the backward into grads.
double loss_and_grad_after_forward(const VitTrainModel& model, const std::vector<DetectionTarget>& targets,
                                   DetrTrainActivations& acts, std::span<float> grads, SetLossResult* detail,
                                   double num_boxes = 0) {
  const int64_t B = acts.batch, Q = model.detr.queries, K1 = model.num_labels + 1;
  check(static_cast<int64_t>(targets.size()) == B, "detr_train_loss_and_grad: " + std::to_string(targets.size()) +
                                                       " targets for a batch of " + std::to_string(B));
  const size_t outputs = acts.heads.size();
  std::vector<Tensor> logits, boxes, dlogits, dboxes;
  for (size_t o = 0; o < outputs; ++o) {
    logits.emplace_back(Shape{B, Q, K1}), boxes.emplace_back(Shape{B, Q, 4});
    dlogits.emplace_back(Shape{B, Q, K1}), dboxes.emplace_back(Shape{B, Q, 4});
    std::copy(acts.heads[o].logits.begin(), acts.heads[o].logits.end(), logits.back().data());
    std::copy(acts.heads[o].boxes.begin(), acts.heads[o].boxes.end(), boxes.back().data());
  }
  std::vector<const Tensor*> lp, bp;
  std::vector<Tensor*> dlp, dbp;
  for (size_t o = 0; o < outputs; ++o) lp.push_back(&logits[o]), bp.push_back(&boxes[o]), dlp.push_back(&dlogits[o]),
                                       dbp.push_back(&dboxes[o]);
  SetLossConfig cfg = detr_set_loss_config(model);
  cfg.num_boxes = num_boxes;
  SetLossResult r = set_loss(lp, bp, targets, cfg, dlp, dbp);
  std::vector<const float*> dl, db;
  for (size_t o = 0; o < outputs; ++o) dl.push_back(dlogits[o].data()), db.push_back(dboxes[o].data());
  detr_train_backward(model, acts, dl, db, grads);
  const double loss = r.loss;
  if (detail) *detail = std::move(r);
  return loss;
}

TrainStepResult step_after_forward(VitTrainModel& model, VitTrainState& state, const std::vector<DetectionTarget>& targets,
                                   const TrainStepOptions& o, SetLossResult* detail) {
  SetLossResult r;
  TrainStepResult out;
  out.loss = loss_and_grad_after_forward(model, targets, *state.detr_acts, state.grads, &r, o.box_normaliser);
  out.correct = detail::matched_correct(r, state.detr_acts->heads.back().logits.data(), model.detr.queries,
                                        model.num_labels + 1, targets);
  out.grad_norm = vit_train_apply_gradients(model, state, o);
  if (detail) *detail = std::move(r);
  return out;
}

void prepare_step(const VitTrainModel& model, VitTrainState& state) {
  const size_t n = model.weights.size();
  if (state.grads.size() != n) state.grads.assign(n, 0.0f);
  std::fill(state.grads.begin(), state.grads.end(), 0.0f);
  if (!state.detr_acts) state.detr_acts = std::make_shared<DetrTrainActivations>();
}

}  // namespace

double detr_train_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                                const std::vector<DetectionTarget>& targets, DetrTrainActivations& acts,
                                std::span<float> grads, SetLossResult* detail) {
  detr_train_forward(model, pixel_values, acts);
  return loss_and_grad_after_forward(model, targets, acts, grads, detail);
}

TrainStepResult detr_train_step(VitTrainModel& model, VitTrainState& state, const Tensor& pixel_values,
                                const std::vector<DetectionTarget>& targets, const TrainStepOptions& o,
                                SetLossResult* detail) {
  prepare_step(model, state);
  detr_train_forward(model, pixel_values, *state.detr_acts);
  return step_after_forward(model, state, targets, o, detail);
}

TrainStepResult detr_train_step_features(VitTrainModel& model, VitTrainState& state, const float* features,
                                         int64_t batch, int64_t grid_h, int64_t grid_w,
                                         const std::vector<DetectionTarget>& targets, const TrainStepOptions& o,
                                         SetLossResult* detail) {
  prepare_step(model, state);
  detr_train_forward_features(model, features, batch, grid_h, grid_w, *state.detr_acts);
  return step_after_forward(model, state, targets, o, detail);
}

}  // namespace tessera
