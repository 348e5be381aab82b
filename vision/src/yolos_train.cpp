// YolosForObjectDetection's training pass (tessera/yolos_train.hpp): vit_train.cpp's encoder pass
// with detection tokens, the final norm on those tokens, the two MLP heads, their backward, and the
// set loss.
#include "tessera/yolos_train.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "model_internal.hpp"
#include "tessera/backward.hpp"
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

void zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }

int64_t num_tokens(const VitTrainModel& m, const VitTrainActivations& acts) {
  const VitConfig& c = m.config;
  return c.num_prefix_tokens() + (acts.height / c.patch_size) * (acts.width / c.patch_size) +
         c.num_detection_tokens;
}

}  // namespace

VitTrainModel load_yolos_train_model(const std::string& dir_string) {
  const fs::path dir(dir_string);
  const std::string config_file = (dir / "config.json").string();
  VitTrainModel m;
  m.config_json = detail::read_text(config_file);
  const Config cfg{detail::parse_json(m.config_json, config_file), config_file};
  std::string arch;
  if (cfg.has("architectures") && cfg.j["architectures"].is_array() && !cfg.j["architectures"].empty() &&
      cfg.j["architectures"][0].is_string())
    arch = cfg.j["architectures"][0].get<std::string>();
  check(cfg.string("model_type", "") == "yolos" && arch == "YolosForObjectDetection",
        config_file + ": YOLOS training reads model_type \"yolos\", YolosForObjectDetection, got model_type \"" +
            cfg.string("model_type", "") + "\", architecture \"" + arch + "\"");
  check(!cfg.boolean("auxiliary_loss", false),
        config_file + ": auxiliary_loss does not apply to YOLOS (it has no decoder layers); set it false");
  m.architecture = arch;
  m.base = "vit.";
  m.detection = true;
  m.config = detail::hf_vit_config(cfg, "yolos");
  m.config.num_detection_tokens = cfg.positive("num_detection_tokens");
  m.config.pos_resample = PosResample::SizeBicubic;
  m.config.mid_position_embeddings = cfg.boolean("use_mid_position_embeddings", false);
  check(!m.config.mid_position_embeddings || m.config.num_hidden_layers >= 2,
        config_file + ": use_mid_position_embeddings needs at least 2 layers");
  check(m.config.activation == MlpActivation::Gelu, config_file + ": training supports hidden_act gelu only");

  const std::string file = (dir / "model.safetensors").string();
  check(fs::exists(file), dir.string() + ": no model.safetensors (training reads single-file checkpoints)");
  const SafeTensors st = SafeTensors::open(file);
  const std::string last = "class_labels_classifier.layers.2.weight";
  check(st.contains(last), file + ": missing tensor '" + last + "'");
  const Shape& shape = st.info(last).shape;
  check(shape.size() == 2 && shape[0] >= 2 && shape[1] == m.config.hidden_size,
        file + ": tensor '" + last + "' has shape " + shape_str(shape) + ", expected [num_labels + 1, " +
            std::to_string(m.config.hidden_size) + "]");
  m.num_labels = shape[0] - 1;
  m.params = detail::vit_train_params(m.config, m.base, m.num_labels);
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  for (const TrainParam& p : m.params) {
    check(st.contains(p.name), file + ": missing tensor '" + p.name + "' (expected shape " + shape_str(p.shape) + ")");
    const TensorInfo& info = st.info(p.name);
    check(info.shape == p.shape, file + ": tensor '" + p.name + "' has shape " + shape_str(info.shape) +
                                     ", expected " + shape_str(p.shape));
    st.read(p.name, 0, p.numel(), m.weights.data() + p.offset);
  }
  check(!st.contains("vit.encoder.layer." + std::to_string(m.config.num_hidden_layers) + ".layernorm_before.weight"),
        file + ": has more layers than num_hidden_layers = " + std::to_string(m.config.num_hidden_layers));
  return m;
}

VitTrainModel make_yolos_train_model(const VitConfig& c, const std::vector<std::string>& labels, uint64_t seed) {
  check(c.num_detection_tokens > 0, "make_yolos_train_model: num_detection_tokens must be positive");
  check(labels.size() >= 1, "make_yolos_train_model: no labels");
  // The encoder as make_vit_train_model initialises it (same seed), then the YOLOS parts.
  VitConfig enc = c;
  enc.num_detection_tokens = 0;
  const VitTrainModel vit = make_vit_train_model(enc, labels, seed);
  VitTrainModel m;
  m.architecture = "YolosForObjectDetection";
  m.base = "vit.";
  m.detection = true;
  m.config = vit.config;
  m.config.num_detection_tokens = c.num_detection_tokens;
  m.config.pos_resample = PosResample::SizeBicubic;
  m.num_labels = static_cast<int64_t>(labels.size());
  m.params = detail::vit_train_params(m.config, m.base, m.num_labels);
  m.weights.assign(static_cast<size_t>(m.params.back().offset + m.params.back().numel()), 0.0f);
  std::mt19937_64 rng(seed ^ 0x594f4c4f53ull);  // "YOLOS"
  std::normal_distribution<double> normal(0.0, 1.0);
  auto trunc_normal = [&](float* w, int64_t n, double std_dev) {
    for (int64_t i = 0; i < n; ++i) {
      double z;
      do z = normal(rng);
      while (std::abs(z) > 2.0);
      w[i] = static_cast<float>(std_dev * z);
    }
  };
  const int64_t d = c.hidden_size, det = c.num_detection_tokens;
  const int64_t grid_rows = m.config.num_prefix_tokens() + m.config.grid_height() * m.config.grid_width();
  for (const TrainParam& p : m.params) {
    float* w = m.weights.data() + p.offset;
    if (p.name == "vit.embeddings.position_embeddings") {
      const TrainParam& src = vit.param(p.name);  // [cls, grid]; then the detection rows
      std::copy_n(vit.weights.data() + src.offset, grid_rows * d, w);
      if (d % 4 == 0) {
        // Each detection token's row: the grid table's sin-cos code of its own point on a
        // rows x cols lattice over the image (4 x 5 for 20 tokens), so the queries start apart
        // and each can learn its own region first, as anchors do.
        const int64_t rows = std::max<int64_t>(1, static_cast<int64_t>(std::floor(std::sqrt(static_cast<double>(det)))));
        const int64_t cols = (det + rows - 1) / rows, q = d / 4;
        const double gh = static_cast<double>(m.config.grid_height()), gw = static_cast<double>(m.config.grid_width());
        for (int64_t i = 0; i < det; ++i) {
          const double y = (static_cast<double>(i / cols) + 0.5) * gh / static_cast<double>(rows) - 0.5;
          const double x = (static_cast<double>(i % cols) + 0.5) * gw / static_cast<double>(cols) - 0.5;
          float* row = w + (grid_rows + i) * d;
          for (int64_t k = 0; k < q; ++k) {
            const double om = std::pow(10000.0, -static_cast<double>(k) / static_cast<double>(q));
            row[k] = static_cast<float>(std::sin(y * om)), row[q + k] = static_cast<float>(std::cos(y * om));
            row[2 * q + k] = static_cast<float>(std::sin(x * om)), row[3 * q + k] = static_cast<float>(std::cos(x * om));
          }
        }
      } else {
        trunc_normal(w + grid_rows * d, det * d, 0.02);
      }
    } else if (p.name == "vit.embeddings.detection_tokens") {
      trunc_normal(w, p.numel(), 0.02);
    } else if (p.name.starts_with("class_labels_classifier.") || p.name.starts_with("bbox_predictor.")) {
      if (p.decay) {
        const double limit = std::sqrt(6.0 / static_cast<double>(p.shape[0] + p.shape[1]));
        std::uniform_real_distribution<double> uniform(-limit, limit);
        for (int64_t i = 0; i < p.numel(); ++i) w[i] = static_cast<float>(uniform(rng));
      }
    } else {
      const TrainParam& src = vit.param(p.name);
      std::copy_n(vit.weights.data() + src.offset, p.numel(), w);
    }
  }
  const nlohmann::ordered_json j = detail::hf_train_config(
      c, "YolosForObjectDetection", "yolos", nlohmann::ordered_json::array({c.image_height, c.image_width}), labels,
      {{"num_detection_tokens", det},
       {"use_mid_position_embeddings", false},
       {"auxiliary_loss", false},
       {"class_cost", 1},
       {"bbox_cost", 5},
       {"giou_cost", 2},
       {"bbox_loss_coefficient", 5},
       {"giou_loss_coefficient", 2},
       {"eos_coefficient", 0.1}});
  m.config_json = j.dump(2) + "\n";
  return m;
}

std::vector<std::string> yolos_train_presets() { return {"yolos-ti", "yolos-digits"}; }

VitConfig yolos_train_preset(const std::string& arch, int64_t height, int64_t width) {
  VitConfig c;
  c.image_height = height, c.image_width = width;
  c.num_channels = 3;
  c.qkv_bias = true;
  if (arch == "yolos-ti") {
    c.patch_size = 16, c.hidden_size = 192, c.num_hidden_layers = 12, c.num_attention_heads = 3;
    c.intermediate_size = 768, c.num_detection_tokens = 100, c.layer_norm_eps = 1e-12f;
  } else if (arch == "yolos-digits") {
    c.patch_size = 8, c.hidden_size = 128, c.num_hidden_layers = 6, c.num_attention_heads = 4;
    c.intermediate_size = 384, c.num_detection_tokens = 20, c.layer_norm_eps = 1e-6f;
  } else {
    std::string known;
    for (const std::string& p : yolos_train_presets()) known += (known.empty() ? "" : ", ") + p;
    fail("--arch " + arch + ": unknown detection preset (known: " + known + ")");
  }
  check(height > 0 && width > 0 && height % c.patch_size == 0 && width % c.patch_size == 0,
        "--arch " + arch + ": image size " + std::to_string(height) + "x" + std::to_string(width) +
            " is not a positive multiple of the patch size " + std::to_string(c.patch_size));
  c.pos_resample = PosResample::SizeBicubic;
  return c;
}

namespace detail {

std::string fixed_size_detection_processor_json(const std::string& type, int64_t height, int64_t width) {
  const nlohmann::ordered_json j = {
      {"image_processor_type", type},
      {"do_resize", true},
      {"size", {{"height", height}, {"width", width}}},
      {"resample", 2},
      {"do_rescale", true},
      {"rescale_factor", 1.0 / 255.0},
      {"do_normalize", true},
      {"image_mean", {0.485, 0.456, 0.406}},
      {"image_std", {0.229, 0.224, 0.225}},
      {"do_pad", false},
      {"format", "coco_detection"},
  };
  return j.dump(2) + "\n";
}

SetLossConfig set_loss_config_from(const std::string& config_json) {
  const auto j = nlohmann::json::parse(config_json);
  auto get = [&](const char* key, double fallback) {
    return j.contains(key) && j[key].is_number() ? j[key].get<double>() : fallback;
  };
  SetLossConfig s;
  s.class_cost = get("class_cost", 1), s.bbox_cost = get("bbox_cost", 5), s.giou_cost = get("giou_cost", 2);
  s.eos_coefficient = get("eos_coefficient", 0.1);
  s.class_loss_coefficient = 1;  // Yolos/DetrForObjectDetection: weight_dict["loss_ce"] = 1
  s.bbox_loss_coefficient = get("bbox_loss_coefficient", 5);
  s.giou_loss_coefficient = get("giou_loss_coefficient", 2);
  return s;
}

}  // namespace detail

std::string yolos_preprocessor_json(int64_t height, int64_t width) {
  return detail::fixed_size_detection_processor_json("YolosImageProcessor", height, width);
}

SetLossConfig yolos_set_loss_config(const VitTrainModel& model) { return detail::set_loss_config_from(model.config_json); }

void yolos_train_forward(const VitTrainModel& model, const Tensor& pixel_values, VitTrainActivations& acts) {
  check(model.detection, "yolos_train_forward: not a YolosForObjectDetection model");
  const VitConfig& c = model.config;
  vit_train_encoder_forward(model, pixel_values, acts);
  const int64_t B = acts.batch, d = c.hidden_size, S = c.num_detection_tokens, R = B * S;
  const int64_t T = num_tokens(model, acts), K1 = model.num_labels + 1;
  VitTrainView w = bind_view(model, const_cast<float*>(model.weights.data()));
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(acts.cls.data() + b * S * d, acts.x_out.data() + (b * T + T - S) * d, sizeof(float) * S * d);
  layer_norm_forward(acts.cls.data(), R, d, w.norm_w, w.norm_b, c.layer_norm_eps, acts.cls_norm.data(),
                     acts.mean_f.data(), acts.rstd_f.data());
  const float* h = acts.cls_norm.data();
  linear_forward(h, R, w.class_w[0], w.class_b[0], d, d, acts.class1.data());
  relu(acts.class1.data(), R * d);
  linear_forward(acts.class1.data(), R, w.class_w[1], w.class_b[1], d, d, acts.class2.data());
  relu(acts.class2.data(), R * d);
  linear_forward(acts.class2.data(), R, w.class_w[2], w.class_b[2], K1, d, acts.logits.data());
  linear_forward(h, R, w.box_w[0], w.box_b[0], d, d, acts.box1.data());
  relu(acts.box1.data(), R * d);
  linear_forward(acts.box1.data(), R, w.box_w[1], w.box_b[1], d, d, acts.box2.data());
  relu(acts.box2.data(), R * d);
  linear_forward(acts.box2.data(), R, w.box_w[2], w.box_b[2], 4, d, acts.boxes.data());
  for (float& v : acts.boxes) v = 1.0f / (1.0f + std::exp(-v));
}

void yolos_train_backward(const VitTrainModel& model, VitTrainActivations& acts, const float* dlogits,
                          const float* dboxes, std::span<float> grads) {
  check(grads.size() == model.weights.size(), "yolos_train_backward: gradient buffer size differs from the weights'");
  check(acts.batch > 0 && model.detection, "yolos_train_backward: run yolos_train_forward first");
  const VitConfig& c = model.config;
  const int64_t B = acts.batch, d = c.hidden_size, S = c.num_detection_tokens, R = B * S;
  const int64_t T = num_tokens(model, acts), K1 = model.num_labels + 1;
  VitTrainView w = bind_view(model, const_cast<float*>(model.weights.data()));
  VitTrainView g = bind_view(model, grads.data());
  zero(acts.dmlp_in);
  // Box head: boxes = σ(z): dz = dboxes · σ(1 − σ).
  std::vector<float> dz(static_cast<size_t>(R * 4));
  for (int64_t i = 0; i < R * 4; ++i) dz[i] = dboxes[i] * acts.boxes[i] * (1.0f - acts.boxes[i]);
  const float* h = acts.cls_norm.data();
  auto mlp_backward = [&](const float* dout, int64_t out, const std::vector<float>& a1, const std::vector<float>& a2,
                          const std::vector<float*>& W, const std::vector<float*>& gW, const std::vector<float*>& gB) {
    zero(acts.dmlp2), zero(acts.dmlp1);
    linear_backward(a2.data(), W[2], dout, R, out, d, acts.dmlp2.data(), gW[2], gB[2]);
    relu_backward(a2.data(), acts.dmlp2.data(), R * d);
    linear_backward(a1.data(), W[1], acts.dmlp2.data(), R, d, d, acts.dmlp1.data(), gW[1], gB[1]);
    relu_backward(a1.data(), acts.dmlp1.data(), R * d);
    linear_backward(h, W[0], acts.dmlp1.data(), R, d, d, acts.dmlp_in.data(), gW[0], gB[0]);
  };
  mlp_backward(dlogits, K1, acts.class1, acts.class2, w.class_w, g.class_w, g.class_b);
  mlp_backward(dz.data(), 4, acts.box1, acts.box2, w.box_w, g.box_w, g.box_b);
  zero(acts.dcls), zero(acts.dx);
  layer_norm_backward(acts.dmlp_in.data(), acts.cls.data(), acts.mean_f.data(), acts.rstd_f.data(), w.norm_w, R, d,
                      acts.dcls.data(), g.norm_w, g.norm_b);
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(acts.dx.data() + (b * T + T - S) * d, acts.dcls.data() + b * S * d, sizeof(float) * S * d);
  vit_train_encoder_backward(model, acts, grads);
}

double yolos_train_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                                 const std::vector<DetectionTarget>& targets, VitTrainActivations& acts,
                                 std::span<float> grads, SetLossResult* detail, double num_boxes) {
  yolos_train_forward(model, pixel_values, acts);
  const int64_t B = acts.batch, S = model.config.num_detection_tokens, K1 = model.num_labels + 1;
  check(static_cast<int64_t>(targets.size()) == B, "yolos_train_loss_and_grad: " + std::to_string(targets.size()) +
                                                       " targets for a batch of " + std::to_string(B));
  Tensor logits({B, S, K1}), boxes({B, S, 4}), dlogits({B, S, K1}), dboxes({B, S, 4});
  std::copy(acts.logits.begin(), acts.logits.end(), logits.data());
  std::copy(acts.boxes.begin(), acts.boxes.end(), boxes.data());
  SetLossConfig cfg = yolos_set_loss_config(model);
  cfg.num_boxes = num_boxes;
  SetLossResult r = set_loss({&logits}, {&boxes}, targets, cfg, {&dlogits}, {&dboxes});
  yolos_train_backward(model, acts, dlogits.data(), dboxes.data(), grads);
  const double loss = r.loss;
  if (detail) *detail = std::move(r);
  return loss;
}

TrainStepResult yolos_train_step(VitTrainModel& model, VitTrainState& state, const Tensor& pixel_values,
                                 const std::vector<DetectionTarget>& targets, const TrainStepOptions& o,
                                 SetLossResult* detail) {
  const size_t n = model.weights.size();
  if (state.grads.size() != n) state.grads.assign(n, 0.0f);
  std::fill(state.grads.begin(), state.grads.end(), 0.0f);
  SetLossResult r;
  TrainStepResult out;
  out.loss = yolos_train_loss_and_grad(model, pixel_values, targets, state.acts, state.grads, &r, o.box_normaliser);
  out.correct = detail::matched_correct(r, state.acts.logits.data(), model.config.num_detection_tokens,
                                        model.num_labels + 1, targets);
  out.grad_norm = vit_train_apply_gradients(model, state, o);
  if (detail) *detail = std::move(r);
  return out;
}

}  // namespace tessera
