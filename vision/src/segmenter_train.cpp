// Segmenter's training pass (tessera/segmenter_train.hpp): the encoder on vit_train's pass, the
// linear decoder's forward (segmenter.cpp's, over unpacked weights) and its backward beside it,
// Segmenter's names on load and save, and the training loop.
#include "tessera/segmenter_train.hpp"

#include "model_internal.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <numeric>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <random>
#include <set>
#include <tuple>

#include "tessera/backward.hpp"
#include "tessera/atomic_file.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/image.hpp"
#include "tessera/kernels.hpp"
#include "tessera/optim.hpp"
#include "tessera/parallel.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/segmentation_loss.hpp"
#include "train_internal.hpp"

namespace fs = std::filesystem;

namespace tessera {
namespace {

using detail::Config;

using detail::NameMap;

// Segmenter's names are timm's under "encoder.", its linear decoder's head "decoder.head"; the
// mask transformer's parameters carry their Segmenter names already.
std::vector<NameMap> segmenter_names(const SegmenterTrainModel& m) {
  if (m.hf_backbone) {  // a Hugging Face encoder keeps its names under "encoder."
    std::vector<NameMap> out;
    for (const TrainParam& p : m.vit.params) {
      if (p.name == "classifier.weight") out.push_back({"decoder.head.weight", p.shape, {p.name}});
      else if (p.name == "classifier.bias") out.push_back({"decoder.head.bias", p.shape, {p.name}});
      else out.push_back({p.name, p.shape, {p.name}});
    }
    return out;
  }
  std::vector<NameMap> out = detail::timm_style_names(m.vit, "encoder.", "decoder.head");
  if (m.mask.layers == 0) return out;
  out.resize(out.size() - 2);  // no decoder.head
  for (const TrainParam& p : m.vit.params)
    if (p.name.starts_with("decoder.")) out.push_back({p.name, p.shape, {p.name}});
  return out;
}

std::string block_name(int64_t i, const std::string& rest) { return "decoder.blocks." + std::to_string(i) + "." + rest; }

// The classifier dropped and the mask transformer's parameters appended (zero), in buffer order.
void add_mask_decoder(VitTrainModel& v, const MaskDecoderShape& s, int64_t n) {
  check(s.layers > 0 && s.d_model > 0 && s.heads > 0 && s.d_ff > 0 && s.d_model % s.heads == 0,
        "the mask transformer needs positive n_layers, d_model, n_heads, d_ff with d_model a multiple of n_heads");
  while (!v.params.empty() && v.params.back().name.starts_with("classifier.")) v.params.pop_back();
  int64_t offset = v.params.back().offset + v.params.back().numel();
  auto add = [&](const std::string& name, Shape shape, bool decay) {
    TrainParam tp{name, std::move(shape), offset, decay};
    offset += tp.numel();
    v.params.push_back(std::move(tp));
  };
  const int64_t dm = s.d_model, f = s.d_ff, de = v.config.hidden_size;
  add("decoder.proj_dec.weight", {dm, de}, true);
  add("decoder.proj_dec.bias", {dm}, false);
  add("decoder.cls_emb", {1, n, dm}, false);
  for (int64_t i = 0; i < s.layers; ++i) {
    add(block_name(i, "norm1.weight"), {dm}, false);
    add(block_name(i, "norm1.bias"), {dm}, false);
    add(block_name(i, "attn.qkv.weight"), {3 * dm, dm}, true);
    add(block_name(i, "attn.qkv.bias"), {3 * dm}, false);
    add(block_name(i, "attn.proj.weight"), {dm, dm}, true);
    add(block_name(i, "attn.proj.bias"), {dm}, false);
    add(block_name(i, "norm2.weight"), {dm}, false);
    add(block_name(i, "norm2.bias"), {dm}, false);
    add(block_name(i, "mlp.fc1.weight"), {f, dm}, true);
    add(block_name(i, "mlp.fc1.bias"), {f}, false);
    add(block_name(i, "mlp.fc2.weight"), {dm, f}, true);
    add(block_name(i, "mlp.fc2.bias"), {dm}, false);
  }
  add("decoder.decoder_norm.weight", {dm}, false);
  add("decoder.decoder_norm.bias", {dm}, false);
  add("decoder.proj_patch", {dm, dm}, true);
  add("decoder.proj_classes", {dm, dm}, true);
  add("decoder.mask_norm.weight", {n}, false);
  add("decoder.mask_norm.bias", {n}, false);
  v.weights.resize(static_cast<size_t>(offset), 0.0f);
  v.headless = true;
}

// Block i of the mask transformer as the training pass's block view.
VitTrainLayerView mask_block_view(const VitTrainModel& v, float* buffer, int64_t i) {
  auto at = [&](const std::string& rest) { return buffer + v.param(block_name(i, rest)).offset; };
  VitTrainLayerView l{};
  l.norm1_w = at("norm1.weight"), l.norm1_b = at("norm1.bias");
  l.qkv_w = at("attn.qkv.weight"), l.qkv_b = at("attn.qkv.bias");
  l.attn_out_w = at("attn.proj.weight"), l.attn_out_b = at("attn.proj.bias");
  l.norm2_w = at("norm2.weight"), l.norm2_b = at("norm2.bias");
  l.fc1_w = at("mlp.fc1.weight"), l.fc1_b = at("mlp.fc1.bias");
  l.fc2_w = at("mlp.fc2.weight"), l.fc2_b = at("mlp.fc2.bias");
  l.ls1 = l.ls2 = nullptr;
  return l;
}

int64_t mapped_offset(const SegmenterTrainModel& m, const NameMap& n) {
  return detail::mapped_offset(m.vit, n, "segmenter_train");
}

std::string segmenter_config_json(const VitConfig& c, const std::vector<std::string>& labels, int64_t window,
                                  const MaskDecoderShape& mask) {
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) id2label[std::to_string(i)] = labels[i];
  nlohmann::ordered_json j = {
      {"architectures", {"Segmenter"}},
      {"model_type", "segmenter"},
      {"n_cls", labels.size()},
      {"encoder",
       {{"image_size", {c.image_height, c.image_width}},
        {"patch_size", c.patch_size},
        {"n_layers", c.num_hidden_layers},
        {"d_model", c.hidden_size},
        {"n_heads", c.num_attention_heads},
        {"d_ff", c.intermediate_size},
        {"distilled", false},
        {"layer_norm_eps", detail::shortest(c.layer_norm_eps)}}},
      {"decoder", {{"name", "linear"}}},
      {"id2label", id2label},
  };
  if (mask.layers > 0)
    j["decoder"] = {{"name", "mask_transformer"},
                    {"n_layers", mask.layers},
                    {"d_model", mask.d_model},
                    {"n_heads", mask.heads},
                    {"d_ff", mask.d_ff},
                    {"layer_norm_eps", detail::shortest(mask.eps)}};
  // Segmenter's inference_kwargs: a model trained on crops segments with sliding windows.
  if (window > 0) j["inference"] = {{"window_size", window}, {"window_stride", std::max<int64_t>(1, window * 2 / 3)}};
  return j.dump(2) + "\n";
}

void check_trainable(const VitConfig& c, const std::string& where) {
  check(c.image_height == c.image_width,
        where + ": Segmenter training needs a square image_size for now (got " +
            std::to_string(c.image_height) + "x" + std::to_string(c.image_width) + ")");
  check(c.image_height % c.patch_size == 0, where + ": image_size must be a multiple of patch_size");
}

void zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }

Interpolation upsample() {
  Interpolation how;
  how.mode = InterpolationMode::Bilinear;
  how.align_corners = false;
  return how;
}

}  // namespace

namespace {

// Segmenter's trunc_normal_(std=0.02): N(0, 1) draws redrawn outside ±2, scaled by 0.02.
void trunc_normal_002(std::mt19937_64& rng, std::normal_distribution<double>& normal, float* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double z;
    do z = normal(rng);
    while (std::abs(z) > 2.0);
    w[i] = static_cast<float>(0.02 * z);
  }
}

}  // namespace

SegmenterTrainModel make_segmenter_train_model(const VitConfig& encoder,
                                               const std::vector<std::string>& labels, uint64_t seed,
                                               int64_t window_size, const MaskDecoderShape& mask) {
  check(!labels.empty(), "make_segmenter_train_model: no labels");
  check_trainable(encoder, "make_segmenter_train_model");
  VitConfig c = encoder;
  c.qkv_bias = true;  // Segmenter's attn.qkv has a bias
  SegmenterTrainModel m;
  m.vit = make_vit_train_model(c, labels, seed);
  m.num_classes = static_cast<int64_t>(labels.size());
  m.labels = labels;
  check(window_size == 0 || (window_size == c.image_height && window_size == c.image_width),
        "make_segmenter_train_model: a crop-trained model's window must be its image size");
  m.window_size = window_size;
  if (mask.layers > 0) {
    m.mask = mask;
    add_mask_decoder(m.vit, mask, m.num_classes);
    // Segmenter's init_weights: trunc_normal(0.02) linear weights and cls_emb, zero biases, unit
    // norms; proj_patch / proj_classes d_model^-0.5 · randn.
    std::mt19937_64 rng(seed ^ 0x4d41534bull);  // "MASK"
    std::normal_distribution<double> normal(0.0, 1.0);
    for (const TrainParam& p : m.vit.params) {
      if (!p.name.starts_with("decoder.")) continue;
      float* w = m.vit.weights.data() + p.offset;
      const bool proj = p.name == "decoder.proj_patch" || p.name == "decoder.proj_classes";
      if (proj) {
        const double scale = 1.0 / std::sqrt(static_cast<double>(mask.d_model));
        for (int64_t i = 0; i < p.numel(); ++i) w[i] = static_cast<float>(scale * normal(rng));
      } else if (p.decay || p.name == "decoder.cls_emb") {
        trunc_normal_002(rng, normal, w, p.numel());
      } else {
        std::fill_n(w, p.numel(), p.name.ends_with("norm1.weight") || p.name.ends_with("norm2.weight") ||
                                          p.name.ends_with("_norm.weight")
                                      ? 1.0f
                                      : 0.0f);
      }
    }
  }
  m.config_json = segmenter_config_json(m.vit.config, labels, window_size, mask);
  return m;
}

SegmenterTrainModel load_segmenter_train_model(const std::string& dir_string) {
  const fs::path dir(dir_string);
  const std::string config_file = (dir / "config.json").string();
  const std::string text = detail::read_text(config_file);
  const Config cfg{detail::parse_json(text, config_file), config_file};
  check(cfg.string("model_type", "") == "segmenter",
        config_file + ": not a Segmenter (model_type \"" + cfg.string("model_type", "") + "\")");
  const Config enc = cfg.sub("encoder"), dec = cfg.sub("decoder");
  const std::string decoder = dec.string("name", "");
  check(decoder == "linear" || decoder == "mask_transformer",
        config_file + ": decoder \"" + decoder + "\" is not one training supports (linear, mask_transformer)");
  MaskDecoderShape mask;
  if (decoder == "mask_transformer") {
    mask.layers = dec.positive("n_layers"), mask.d_model = dec.positive("d_model");
    mask.heads = dec.positive("n_heads"), mask.d_ff = dec.positive("d_ff");
    mask.eps = static_cast<float>(dec.number("layer_norm_eps", 1e-5));
    check(mask.d_model % mask.heads == 0, dec.file + ": d_model is not a multiple of n_heads");
  }
  const std::string file = (dir / "model.safetensors").string();
  check(fs::exists(file), dir.string() + ": no model.safetensors (training reads single-file checkpoints)");
  const SafeTensors st = SafeTensors::open(file);
  const int64_t n = cfg.positive("n_cls");
  SegmenterTrainModel m;
  m.labels = detail::labels_from(cfg.j, n, config_file);
  m.num_classes = n;
  int64_t ih = 0, iw = 0;
  if (enc.has("backbone_config")) {
    // A Hugging Face encoder (ViT, DeiT, DINOv2) under "encoder.", with its own names: the
    // training pass's encoder with base "encoder.", every tensor under its checkpoint name.
    const Config bb = enc.sub("backbone_config");
    const std::string mt = bb.string("model_type", "");
    check(mt == "vit" || mt == "deit" || mt == "dinov2",
          bb.file + ": model_type \"" + mt + "\" is not a Segmenter backbone training supports (vit, deit, dinov2)");
    VitConfig c = detail::hf_vit_config(bb, mt);
    check(c.activation == MlpActivation::Gelu || c.activation == MlpActivation::SwiGlu,
          bb.file + ": training supports exact GELU and DINOv2's SwiGLU MLPs");
    check_trainable(c, config_file);
    ih = c.image_height, iw = c.image_width;
    m.hf_backbone = true;
    m.vit.architecture = "Segmenter";
    m.vit.base = "encoder.";
    m.vit.config = c;
    m.vit.num_labels = n;
    m.vit.params = detail::vit_train_params(c, m.vit.base, n, c.layer_scale && st.contains("encoder.embeddings.mask_token"));
    m.vit.weights.assign(static_cast<size_t>(m.vit.params.back().offset + m.vit.params.back().numel()), 0.0f);
  } else {
    check(!enc.boolean("distilled", false),
          config_file + ": training a distilled Segmenter encoder is not supported yet");
    VitConfig c;
    std::tie(ih, iw) = enc.size2("image_size");
    c.image_height = ih, c.image_width = iw;
    c.patch_size = enc.positive("patch_size");
    c.num_hidden_layers = enc.positive("n_layers");
    c.hidden_size = enc.positive("d_model");
    c.num_attention_heads = enc.positive("n_heads");
    c.intermediate_size = enc.integer("d_ff", 4 * c.hidden_size);
    c.layer_norm_eps = static_cast<float>(enc.number("layer_norm_eps", 1e-5));
    c.num_channels = enc.integer("channels", 3);
    c.qkv_bias = true;
    check(c.hidden_size % c.num_attention_heads == 0, enc.file + ": d_model is not a multiple of n_heads");
    check_trainable(c, config_file);
    m.vit = make_vit_train_model(c, m.labels, 0);
  }
  if (mask.layers > 0) {
    m.mask = mask;
    add_mask_decoder(m.vit, mask, n);
  }
  m.config_json = text;
  if (cfg.has("inference")) {
    m.window_size = cfg.sub("inference").positive("window_size");
    check(m.window_size == ih && m.window_size == iw,
          config_file + ": inference.window_size " + std::to_string(m.window_size) +
              " is not the encoder's image_size; training crops are image_size windows");
  }

  std::set<std::string> used;
  for (const NameMap& nm : segmenter_names(m)) {
    check(st.contains(nm.name), file + ": missing tensor '" + nm.name + "' (expected shape " +
                                    shape_str(nm.shape) + ")");
    const TensorInfo& info = st.info(nm.name);
    check(info.shape == nm.shape, file + ": tensor '" + nm.name + "' has shape " +
                                      shape_str(info.shape) + ", expected " + shape_str(nm.shape));
    st.read(nm.name, 0, shape_numel(nm.shape), m.vit.weights.data() + mapped_offset(m, nm));
    used.insert(nm.name);
  }
  for (const std::string& t : st.names())
    check(used.count(t) || t.rfind("encoder.head", 0) == 0,
          file + ": unexpected tensor '" + t + "' for a Segmenter with the " + decoder +
              " decoder (config and checkpoint disagree)");
  return m;
}

SegmenterTrainModel segmenter_from_vit(const VitTrainModel& vit, int64_t image_size,
                                       const std::vector<std::string>& labels, int64_t window_size,
                                       const MaskDecoderShape& mask) {
  const VitConfig& from = vit.config;
  const std::string what = "a Segmenter encoder from a " + vit.architecture;
  check(!vit.teacher && !vit.class_mean && !vit.detection && from.num_distillation_tokens == 0 &&
            from.num_register_tokens == 0 && !from.layer_scale && (vit.base == "vit." || vit.base == "deit."),
        what + ": only a ViT or DeiT classifier without a distillation token can be one");
  check(from.activation == MlpActivation::Gelu, what + ": Segmenter's MLP is exact GELU, this model's is not");
  check(image_size > 0 && image_size % from.patch_size == 0,
        what + ": image size " + std::to_string(image_size) + " is not a positive multiple of the patch size " +
            std::to_string(from.patch_size));
  VitConfig c = from;
  c.image_height = c.image_width = image_size;
  SegmenterTrainModel m = make_segmenter_train_model(c, labels, 0, window_size, mask);
  // Every encoder tensor by name (the prefix may differ), the position table resampled.
  const std::string pos = "embeddings.position_embeddings";
  for (const TrainParam& p : m.vit.params) {
    if (p.name.rfind(m.vit.base, 0) != 0) continue;  // the classifier: stays zero
    const std::string rest = p.name.substr(m.vit.base.size());
    const bool present = std::any_of(vit.params.begin(), vit.params.end(),
                                     [&](const TrainParam& q) { return q.name == vit.base + rest; });
    if (!present) continue;  // query/key/value biases of a ViT without them (qkv_bias false): zero
    const std::span<const float> src = vit.view(std::span<const float>(vit.weights), vit.base + rest);
    const std::span<float> dst = m.vit.view(std::span<float>(m.vit.weights), p.name);
    if (rest != pos) {
      check(src.size() == dst.size(), what + ": " + rest + " has another size");
      std::copy(src.begin(), src.end(), dst.begin());
      continue;
    }
    const int64_t d = c.hidden_size, gh = from.grid_height(), gw = from.grid_width();
    const int64_t nh = c.grid_height(), nw = c.grid_width();
    std::copy_n(src.data(), d, dst.data());  // the class token's row
    if (gh == nh && gw == nw) {
      std::copy(src.begin() + d, src.end(), dst.begin() + d);
      continue;
    }
    std::vector<float> grid(static_cast<size_t>(d * gh * gw)), out(static_cast<size_t>(d * nh * nw));
    for (int64_t t = 0; t < gh * gw; ++t)
      for (int64_t k = 0; k < d; ++k) grid[k * gh * gw + t] = src[(1 + t) * d + k];
    interpolate_bilinear(grid.data(), d, gh, gw, out.data(), nh, nw, false);
    for (int64_t t = 0; t < nh * nw; ++t)
      for (int64_t k = 0; k < d; ++k) dst[(1 + t) * d + k] = out[k * nh * nw + t];
  }
  return m;
}

std::vector<std::string> segmenter_train_presets() { return {"segmenter-ti", "segmenter-digits"}; }

VitConfig segmenter_train_preset(const std::string& arch, int64_t image_size) {
  VitConfig c;
  c.image_height = c.image_width = image_size;
  c.num_channels = 3;
  c.qkv_bias = true;
  c.layer_norm_eps = 1e-6f;
  if (arch == "segmenter-ti") {
    c.patch_size = 16, c.hidden_size = 192, c.num_hidden_layers = 12, c.num_attention_heads = 3;
  } else if (arch == "segmenter-digits") {
    c.patch_size = 4, c.hidden_size = 96, c.num_hidden_layers = 6, c.num_attention_heads = 3;
  } else {
    std::string known;
    for (const std::string& p : segmenter_train_presets()) known += (known.empty() ? "" : ", ") + p;
    fail("--arch " + arch + ": unknown Segmenter preset (known: " + known + ")");
  }
  c.intermediate_size = 4 * c.hidden_size;
  check(image_size > 0 && image_size % c.patch_size == 0,
        "--arch " + arch + ": image size " + std::to_string(image_size) +
            " is not a positive multiple of the patch size " + std::to_string(c.patch_size));
  return c;
}

std::vector<std::pair<std::string, Tensor>> segmenter_named_tensors(const SegmenterTrainModel& m,
                                                                    std::span<const float> buffer) {
  check(buffer.size() == m.vit.weights.size(), "segmenter_named_tensors: buffer of another size than the weights");
  std::vector<std::pair<std::string, Tensor>> out;
  for (const NameMap& nm : segmenter_names(m)) {
    Tensor t(nm.shape);
    std::copy_n(buffer.data() + mapped_offset(m, nm), t.numel(), t.data());
    out.emplace_back(nm.name, std::move(t));
  }
  return out;
}

void replace_segmentation_classes(SegmenterTrainModel& m, const std::vector<std::string>& labels, uint64_t seed) {
  check(!labels.empty(), "replace_segmentation_classes: no labels");
  const int64_t k = static_cast<int64_t>(labels.size());
  VitTrainModel& v = m.vit;
  std::mt19937_64 rng(seed ^ 0x4e455743ull);  // "NEWC"
  std::normal_distribution<double> normal(0.0, 1.0);
  detail::relayout_params(
      v,
      [&](TrainParam& p) {
        if (p.name == "classifier.weight") p.shape = {k, p.shape[1]};
        if (p.name == "classifier.bias" || p.name == "decoder.mask_norm.weight" || p.name == "decoder.mask_norm.bias")
          p.shape = {k};
        if (p.name == "decoder.cls_emb") p.shape = {1, k, p.shape[2]};
        return p.name.starts_with("classifier.") || p.name == "decoder.cls_emb" || p.name.starts_with("decoder.mask_norm.");
      },
      [&](const TrainParam& p, float* w) {  // the linear head and mask_norm's bias stay zero
        if (p.name == "decoder.mask_norm.weight") std::fill_n(w, p.numel(), 1.0f);
        if (p.name == "decoder.cls_emb") trunc_normal_002(rng, normal, w, p.numel());
      });
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(m.config_json);
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) id2label[std::to_string(i)] = labels[i];
  cfg["n_cls"] = k;
  cfg["id2label"] = id2label;
  m.config_json = cfg.dump(2) + "\n";
  v.num_labels = k;
  m.num_classes = k;
  m.labels = labels;
}

void save_segmenter_train_model(const SegmenterTrainModel& m, const std::string& dir_string,
                                const std::string& preprocessor_json) {
  const fs::path dir(dir_string);
  std::error_code ec;
  fs::create_directories(dir, ec);
  check(!ec, dir.string() + ": cannot create (" + ec.message() + ")");
  save_safetensors((dir / "model.safetensors").string(), segmenter_named_tensors(m, m.vit.weights),
                   {{"format", "pt"}});
  auto write_text = [&](const std::string& name, const std::string& text) {
    write_file_atomic((dir / name).string(), text.data(), text.size());
  };
  write_text("config.json", m.config_json);
  if (!preprocessor_json.empty()) write_text("preprocessor_config.json", preprocessor_json);
}

namespace {

// dm x dm matrix transposed into `out`.
void transpose_square(const float* in, int64_t n, std::vector<float>& out) {
  out.resize(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) out[j * n + i] = in[i * n + j];
}

// acts.normed [B·N, de] → acts.scores [B·N, K] through the mask transformer.
void mask_decoder_forward(const SegmenterTrainModel& m, SegmenterTrainActivations& acts, int64_t B, int64_t N) {
  const MaskDecoderShape& s = m.mask;
  const VitTrainModel& v = m.vit;
  const int64_t dm = s.d_model, K = m.num_classes, de = v.config.hidden_size, T2 = N + K, M2 = B * T2, R = B * N;
  float* wb = const_cast<float*>(v.weights.data());
  auto at = [&](const std::string& name) { return wb + v.param(name).offset; };
  auto sized = [](std::vector<float>& x, int64_t n) {
    if (static_cast<int64_t>(x.size()) != n) x.assign(static_cast<size_t>(n), 0.0f);
  };
  VitTrainActivations& dec = acts.decoder;
  if (dec.layers.size() != static_cast<size_t>(s.layers) || dec.batch != B || dec.height != N) {
    dec.layers.assign(static_cast<size_t>(s.layers), {});
    for (auto& l : dec.layers) {
      for (auto* x : {&l.x, &l.ln1, &l.ctx, &l.x_mid, &l.ln2}) sized(*x, M2 * dm);
      for (auto* x : {&l.mean1, &l.rstd1, &l.mean2, &l.rstd2}) sized(*x, M2);
      sized(l.qkv, M2 * 3 * dm), sized(l.lse, B * s.heads * T2), sized(l.h, M2 * s.d_ff), sized(l.a, M2 * s.d_ff);
    }
    sized(dec.dx, M2 * dm), sized(dec.dln, M2 * dm), sized(dec.dctx, M2 * dm), sized(dec.dqkv, M2 * 3 * dm);
    sized(dec.da, M2 * s.d_ff), sized(dec.dh, M2 * s.d_ff);
    dec.batch = B, dec.height = N;  // what the buffers are sized for
  }
  for (auto* x : {&acts.z, &acts.zn, &acts.dz}) sized(*x, M2 * dm);
  sized(acts.zmean, M2), sized(acts.zrstd, M2);
  sized(acts.pfeat, R * dm), sized(acts.dpfeat, R * dm), sized(acts.pnorm, R);
  sized(acts.cfeat, B * K * dm), sized(acts.dcfeat, B * K * dm), sized(acts.cnorm, B * K);
  sized(acts.cos, R * K), sized(acts.dcos, R * K), sized(acts.smean, R), sized(acts.srstd, R);

  // [proj_dec(patches), cls_emb] per image
  float* x0 = dec.layers[0].x.data();
  const float* cls_emb = at("decoder.cls_emb");
  const PackedLinear proj_dec = pack_linear(at("decoder.proj_dec.weight"), at("decoder.proj_dec.bias"), dm, de, training_gemm_type());
  for (int64_t b = 0; b < B; ++b) {
    linear(acts.normed.data() + b * N * de, N, de, proj_dec, x0 + b * T2 * dm, dm);
    std::memcpy(x0 + (b * T2 + N) * dm, cls_emb, sizeof(float) * K * dm);
  }
  const detail::BlockDims dims{B, T2, dm, s.d_ff, s.heads, s.eps};
  for (int64_t i = 0; i < s.layers; ++i) {
    float* next = i + 1 < s.layers ? dec.layers[static_cast<size_t>(i + 1)].x.data() : acts.z.data();
    detail::vit_block_forward(mask_block_view(v, wb, i), dims, dec.layers[static_cast<size_t>(i)], next);
  }
  layer_norm_forward(acts.z.data(), M2, dm, at("decoder.decoder_norm.weight"), at("decoder.decoder_norm.bias"), s.eps,
                     acts.zn.data(), acts.zmean.data(), acts.zrstd.data());
  // x @ P is a Linear with weight Pᵀ.
  transpose_square(at("decoder.proj_patch"), dm, acts.proj_patch_t);
  transpose_square(at("decoder.proj_classes"), dm, acts.proj_classes_t);
  const PackedLinear pp = pack_linear(acts.proj_patch_t.data(), nullptr, dm, dm, training_gemm_type());
  const PackedLinear pc = pack_linear(acts.proj_classes_t.data(), nullptr, dm, dm, training_gemm_type());
  for (int64_t b = 0; b < B; ++b) {
    linear(acts.zn.data() + b * T2 * dm, N, dm, pp, acts.pfeat.data() + b * N * dm, dm);
    linear(acts.zn.data() + (b * T2 + N) * dm, K, dm, pc, acts.cfeat.data() + b * K * dm, dm);
  }
  // x / ‖x‖ per row (no epsilon, as Segmenter divides by the norm)
  auto normalize = [&](std::vector<float>& x, std::vector<float>& norms, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x.data() + r * dm;
      double ss = 0;
      for (int64_t k = 0; k < dm; ++k) ss += static_cast<double>(row[k]) * row[k];
      const float nrm = static_cast<float>(std::sqrt(ss));
      norms[static_cast<size_t>(r)] = nrm;
      for (int64_t k = 0; k < dm; ++k) row[k] /= nrm;
    }
  };
  normalize(acts.pfeat, acts.pnorm, R);
  normalize(acts.cfeat, acts.cnorm, B * K);
  for (int64_t b = 0; b < B; ++b) {
    const PackedLinear classes = pack_linear(acts.cfeat.data() + b * K * dm, nullptr, K, dm, training_gemm_type());
    linear(acts.pfeat.data() + b * N * dm, N, dm, classes, acts.cos.data() + b * N * K, K);
  }
  layer_norm_forward(acts.cos.data(), R, K, at("decoder.mask_norm.weight"), at("decoder.mask_norm.bias"), s.eps,
                     acts.scores.data(), acts.smean.data(), acts.srstd.data());
}

// acts.dscores [B·N, K] → the decoder's gradients (added into grads) and acts.dnormed (added).
void mask_decoder_backward(const SegmenterTrainModel& m, SegmenterTrainActivations& acts, int64_t B, int64_t N,
                           std::span<float> grads) {
  const MaskDecoderShape& s = m.mask;
  const VitTrainModel& v = m.vit;
  const int64_t dm = s.d_model, K = m.num_classes, de = v.config.hidden_size, T2 = N + K, M2 = B * T2, R = B * N;
  float* wb = const_cast<float*>(v.weights.data());
  auto at = [&](const std::string& name) { return wb + v.param(name).offset; };
  auto grad = [&](const std::string& name) { return grads.data() + v.param(name).offset; };
  zero(acts.dcos);
  layer_norm_backward(acts.dscores.data(), acts.cos.data(), acts.smean.data(), acts.srstd.data(),
                      at("decoder.mask_norm.weight"), R, K, acts.dcos.data(), grad("decoder.mask_norm.weight"),
                      grad("decoder.mask_norm.bias"));
  // cos_b = p̂_b · ĉ_bᵀ
  zero(acts.dpfeat), zero(acts.dcfeat);
  for (int64_t b = 0; b < B; ++b)
    linear_backward(acts.pfeat.data() + b * N * dm, acts.cfeat.data() + b * K * dm, acts.dcos.data() + b * N * K, N,
                    K, dm, acts.dpfeat.data() + b * N * dm, acts.dcfeat.data() + b * K * dm, nullptr);
  // ŷ = x/‖x‖:  dx = (dŷ − ŷ·(ŷ·dŷ)) / ‖x‖, in place
  auto normalize_backward = [&](const std::vector<float>& y, const std::vector<float>& norms, std::vector<float>& d,
                                int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* yr = y.data() + r * dm;
      float* dr = d.data() + r * dm;
      double dot = 0;
      for (int64_t k = 0; k < dm; ++k) dot += static_cast<double>(yr[k]) * dr[k];
      const float inv = 1.0f / norms[static_cast<size_t>(r)];
      for (int64_t k = 0; k < dm; ++k) dr[k] = (dr[k] - yr[k] * static_cast<float>(dot)) * inv;
    }
  };
  normalize_backward(acts.pfeat, acts.pnorm, acts.dpfeat, R);
  normalize_backward(acts.cfeat, acts.cnorm, acts.dcfeat, B * K);
  // features = zn rows · P: dzn += dfeat · Pᵀ, dP += znᵀ · dfeat (through the transposed copy)
  zero(acts.dz);
  auto project_backward = [&](const std::vector<float>& pt, const std::vector<float>& dfeat, int64_t first,
                              int64_t rows, const std::string& name) {
    acts.dproj_t.assign(static_cast<size_t>(dm * dm), 0.0f);
    for (int64_t b = 0; b < B; ++b)
      linear_backward(acts.zn.data() + (b * T2 + first) * dm, pt.data(), dfeat.data() + b * rows * dm, rows, dm, dm,
                      acts.dz.data() + (b * T2 + first) * dm, acts.dproj_t.data(), nullptr);
    float* g = grad(name);
    for (int64_t i = 0; i < dm; ++i)
      for (int64_t j = 0; j < dm; ++j) g[i * dm + j] += acts.dproj_t[j * dm + i];
  };
  project_backward(acts.proj_patch_t, acts.dpfeat, 0, N, "decoder.proj_patch");
  project_backward(acts.proj_classes_t, acts.dcfeat, N, K, "decoder.proj_classes");
  VitTrainActivations& dec = acts.decoder;
  zero(dec.dx);
  layer_norm_backward(acts.dz.data(), acts.z.data(), acts.zmean.data(), acts.zrstd.data(),
                      at("decoder.decoder_norm.weight"), M2, dm, dec.dx.data(), grad("decoder.decoder_norm.weight"),
                      grad("decoder.decoder_norm.bias"));
  const detail::BlockDims dims{B, T2, dm, s.d_ff, s.heads, s.eps};
  for (int64_t i = s.layers - 1; i >= 0; --i)
    detail::vit_block_backward(mask_block_view(v, wb, i), mask_block_view(v, grads.data(), i), dims,
                               dec.layers[static_cast<size_t>(i)], dec);
  // dec.dx: d loss / d [proj_dec(patches), cls_emb]
  float* gcls = grad("decoder.cls_emb");
  for (int64_t b = 0; b < B; ++b) {
    const float* rows = dec.dx.data() + (b * T2 + N) * dm;
    for (int64_t i = 0; i < K * dm; ++i) gcls[i] += rows[i];
    linear_backward(acts.normed.data() + b * N * de, at("decoder.proj_dec.weight"), dec.dx.data() + b * T2 * dm, N,
                    dm, de, acts.dnormed.data() + b * N * de, grad("decoder.proj_dec.weight"),
                    grad("decoder.proj_dec.bias"));
  }
}

}  // namespace

namespace {

void size_decoder(const SegmenterTrainModel& m, int64_t B, SegmenterTrainActivations& acts) {
  const VitConfig& c = m.vit.config;
  const int64_t H = c.image_height, W = c.image_width, p = c.patch_size;
  const int64_t N = (H / p) * (W / p), d = c.hidden_size, K = m.num_classes, R = B * N;
  auto sized = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) != n) v.assign(static_cast<size_t>(n), 0.0f);
  };
  sized(acts.patches, R * d), sized(acts.normed, R * d), sized(acts.mean, R), sized(acts.rstd, R);
  sized(acts.scores, R * K), sized(acts.masks, B * K * N);
  sized(acts.dmasks, B * K * N), sized(acts.dscores, R * K), sized(acts.dnormed, R * d),
      sized(acts.dpatches, R * d);
  if (acts.logits.shape() != Shape{B, K, H, W}) acts.logits = Tensor({B, K, H, W});
}

const Tensor& decoder_forward(const SegmenterTrainModel& m, int64_t B, SegmenterTrainActivations& acts);

}  // namespace

const Tensor& segmenter_train_forward(const SegmenterTrainModel& m, const Tensor& pixel_values,
                                      SegmenterTrainActivations& acts) {
  const VitConfig& c = m.vit.config;
  check(pixel_values.ndim() == 4 && pixel_values.dim(2) == c.image_height &&
            pixel_values.dim(3) == c.image_width,
        "Segmenter training takes pixel_values [batch, " + std::to_string(c.num_channels) + ", " +
            std::to_string(c.image_height) + ", " + std::to_string(c.image_width) +
            "] (the config's image_size; other sizes would resample the position table), got " +
            shape_str(pixel_values.shape()));
  vit_train_encoder_forward(m.vit, pixel_values, acts.encoder);
  const int64_t B = pixel_values.dim(0), p = c.patch_size;
  const int64_t N = (c.image_height / p) * (c.image_width / p), pre = c.num_prefix_tokens(), T = pre + N;
  const int64_t d = c.hidden_size, R = B * N;
  size_decoder(m, B, acts);
  VitTrainView w = bind_view(m.vit, const_cast<float*>(m.vit.weights.data()));
  // x[:, pre:] → encoder.norm → decoder.head
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(acts.patches.data() + b * N * d, acts.encoder.x_out.data() + (b * T + pre) * d,
                sizeof(float) * N * d);
  layer_norm_forward(acts.patches.data(), R, d, w.norm_w, w.norm_b, c.layer_norm_eps,
                     acts.normed.data(), acts.mean.data(), acts.rstd.data());
  acts.from_features = false;
  return decoder_forward(m, B, acts);
}

void segmenter_encode_features(const SegmenterTrainModel& m, const Tensor& pixel_values,
                               SegmenterTrainActivations& acts, float* features) {
  const VitConfig& c = m.vit.config;
  check(pixel_values.ndim() == 4 && pixel_values.dim(2) == c.image_height && pixel_values.dim(3) == c.image_width,
        "segmenter_encode_features: pixel_values of another size than the config's, " + shape_str(pixel_values.shape()));
  vit_train_encoder_forward(m.vit, pixel_values, acts.encoder);
  const int64_t B = pixel_values.dim(0), p = c.patch_size;
  const int64_t N = (c.image_height / p) * (c.image_width / p), pre = c.num_prefix_tokens(), T = pre + N;
  const int64_t d = c.hidden_size, R = B * N;
  std::vector<float> rows(static_cast<size_t>(R * d)), mean(static_cast<size_t>(R)), rstd(static_cast<size_t>(R));
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(rows.data() + b * N * d, acts.encoder.x_out.data() + (b * T + pre) * d, sizeof(float) * N * d);
  VitTrainView w = bind_view(m.vit, const_cast<float*>(m.vit.weights.data()));
  layer_norm_forward(rows.data(), R, d, w.norm_w, w.norm_b, c.layer_norm_eps, features, mean.data(), rstd.data());
}

const Tensor& segmenter_train_forward_features(const SegmenterTrainModel& m, const float* features, int64_t batch,
                                               SegmenterTrainActivations& acts) {
  check(m.vit.frozen_encoder && batch > 0,
        "segmenter_train_forward_features: the decoder alone trains on cached features (a frozen encoder)");
  const VitConfig& c = m.vit.config;
  const int64_t N = (c.image_height / c.patch_size) * (c.image_width / c.patch_size);
  size_decoder(m, batch, acts);
  std::copy_n(features, batch * N * c.hidden_size, acts.normed.begin());
  acts.from_features = true;
  return decoder_forward(m, batch, acts);
}

namespace {

const Tensor& decoder_forward(const SegmenterTrainModel& m, int64_t B, SegmenterTrainActivations& acts) {
  const VitConfig& c = m.vit.config;
  const int64_t H = c.image_height, W = c.image_width, p = c.patch_size;
  const int64_t gh = H / p, gw = W / p, N = gh * gw;
  const int64_t d = c.hidden_size, K = m.num_classes, R = B * N;
  VitTrainView w = bind_view(m.vit, const_cast<float*>(m.vit.weights.data()));
  if (m.mask.layers > 0) {
    mask_decoder_forward(m, acts, B, N);
  } else {
    const PackedLinear head = pack_linear(w.head_w, w.head_b, K, d, training_gemm_type());
    linear(acts.normed.data(), R, d, head, acts.scores.data(), K);
  }
  // b (h w) k → b k h w, then bilinear to the input size (no padding: H, W are multiples of p).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < K; ++k)
        acts.masks[(b * K + k) * N + i] = acts.scores[(b * N + i) * K + k];
  for (int64_t b = 0; b < B; ++b)
    interpolate_forward(upsample(), acts.masks.data() + b * K * N, K, gh, gw,
                        acts.logits.data() + b * K * H * W, H, W);
  return acts.logits;
}

}  // namespace

void segmenter_train_backward(const SegmenterTrainModel& m, SegmenterTrainActivations& acts,
                              const Tensor& dlogits, std::span<float> grads, std::span<const float> dfeatures) {
  check(grads.size() == m.vit.weights.size(), "segmenter_train_backward: gradient buffer size differs from the weights'");
  check(dlogits.shape() == acts.logits.shape(), "segmenter_train_backward: dlogits " +
                                                    shape_str(dlogits.shape()) + " for logits " +
                                                    shape_str(acts.logits.shape()));
  const VitConfig& c = m.vit.config;
  const int64_t B = acts.logits.dim(0), H = c.image_height, W = c.image_width, p = c.patch_size;
  const int64_t gh = H / p, gw = W / p, N = gh * gw, pre = c.num_prefix_tokens(), T = pre + N;
  const int64_t d = c.hidden_size, K = m.num_classes, R = B * N;
  VitTrainView w = bind_view(m.vit, const_cast<float*>(m.vit.weights.data()));
  VitTrainView g = bind_view(m.vit, grads.data());
  zero(acts.dmasks), zero(acts.dnormed), zero(acts.dpatches);
  for (int64_t b = 0; b < B; ++b)
    interpolate_backward(upsample(), dlogits.data() + b * K * H * W, K, gh, gw, H, W,
                         acts.dmasks.data() + b * K * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < K; ++k)
        acts.dscores[(b * N + i) * K + k] = acts.dmasks[(b * K + k) * N + i];
  if (m.mask.layers > 0)
    mask_decoder_backward(m, acts, B, N, grads);
  else
    linear_backward(acts.normed.data(), w.head_w, acts.dscores.data(), R, K, d, acts.dnormed.data(),
                    g.head_w, g.head_b);
  if (!dfeatures.empty()) {
    check(dfeatures.size() == acts.dnormed.size(), "segmenter_train_backward: dfeatures of another size than the patch features'");
    for (size_t i = 0; i < dfeatures.size(); ++i) acts.dnormed[i] += dfeatures[i];
  }
  if (m.vit.frozen_encoder) return;  // --freeze-encoder: the head's gradients only (encoder.norm is the encoder's)
  check(!acts.from_features, "segmenter_train_backward: a forward from cached features has no encoder activations");
  layer_norm_backward(acts.dnormed.data(), acts.patches.data(), acts.mean.data(), acts.rstd.data(),
                      w.norm_w, R, d, acts.dpatches.data(), g.norm_w, g.norm_b);
  // The class token's row gets no gradient from the decoder.
  std::vector<float>& dx = acts.encoder.dx;
  std::fill(dx.begin(), dx.end(), 0.0f);
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(dx.data() + (b * T + pre) * d, acts.dpatches.data() + b * N * d, sizeof(float) * N * d);
  vit_train_encoder_backward(m.vit, acts.encoder, grads);
}

double segmenter_train_loss_and_grad(const SegmenterTrainModel& m, const Tensor& pixel_values,
                                     const std::vector<int32_t>& labels,
                                     SegmenterTrainActivations& acts, std::span<float> grads,
                                     int32_t ignore_label) {
  const Tensor& logits = segmenter_train_forward(m, pixel_values, acts);
  Tensor dlogits(logits.shape());
  const double loss = segmentation_cross_entropy(logits, labels, &dlogits, ignore_label);
  segmenter_train_backward(m, acts, dlogits, grads);
  return loss;
}

namespace {

// One step on a batch whose forward `forward` runs (from pixels or from cached features).
SegmenterStepResult step_with(SegmenterTrainModel& model, SegmenterTrainState& state, const std::vector<int32_t>& labels,
                              const TrainStepOptions& o, const std::function<const Tensor&()>& forward,
                              const PatchBoxBatch* boxes = nullptr);

}  // namespace

SegmenterStepResult segmenter_train_step(SegmenterTrainModel& model, SegmenterTrainState& state,
                                         const Tensor& pixel_values,
                                         const std::vector<int32_t>& labels,
                                         const TrainStepOptions& o, const PatchBoxBatch* boxes) {
  return step_with(
      model, state, labels, o, [&]() -> const Tensor& { return segmenter_train_forward(model, pixel_values, state.acts); },
      boxes);
}

SegmenterStepResult segmenter_train_step_features(SegmenterTrainModel& model, SegmenterTrainState& state,
                                                  const float* features, int64_t batch,
                                                  const std::vector<int32_t>& labels, const TrainStepOptions& o) {
  return step_with(model, state, labels, o, [&]() -> const Tensor& {
    return segmenter_train_forward_features(model, features, batch, state.acts);
  });
}

namespace {

SegmenterStepResult step_with(SegmenterTrainModel& model, SegmenterTrainState& state, const std::vector<int32_t>& labels,
                              const TrainStepOptions& o, const std::function<const Tensor&()>& forward,
                              const PatchBoxBatch* boxes) {
  VitTrainState& s = state.opt;
  const size_t n = model.vit.weights.size();
  if (s.grads.size() != n) {
    s.grads.assign(n, 0.0f);
    s.m.assign(n, 0.0f);
  }
  if (s.m.size() != n) s.m.assign(n, 0.0f);
  if (o.optimizer == Optimizer::AdamW && s.v.size() != n) s.v.assign(n, 0.0f);
  std::fill(s.grads.begin(), s.grads.end(), 0.0f);
  SegmenterStepResult r;
  PatchBoxHead& box = state.box;
  const bool with_boxes = boxes && boxes->loss_weight > 0;
  if (with_boxes) {
    check(!model.vit.frozen_encoder, "segmenter_train_step: the patch-box loss trains the encoder; it is frozen");
    check(box.dim == model.vit.config.hidden_size && box.params.size() == static_cast<size_t>(4 * box.dim + 4),
          "segmenter_train_step: the patch-box loss needs its head (make_patch_box_head) of the encoder's width");
    box.grads.assign(box.params.size(), 0.0f);
    if (box.m.size() != box.params.size()) box.m.assign(box.params.size(), 0.0f), box.v.assign(box.params.size(), 0.0f);
  }
  {
    const Tensor& logits = forward();
    Tensor dlogits(logits.shape());
    r.loss = segmentation_cross_entropy(logits, labels, &dlogits, 255);
    if (with_boxes) {
      const int64_t rows = static_cast<int64_t>(state.acts.normed.size()) / box.dim;
      check(boxes->weights.size() == static_cast<size_t>(rows) && boxes->targets.size() == static_cast<size_t>(4 * rows),
            "segmenter_train_step: patch-box targets for " + std::to_string(boxes->weights.size()) + " patches, the batch has " +
                std::to_string(rows));
      std::vector<float> dfeatures(state.acts.normed.size(), 0.0f);
      r.box_loss = patch_box_loss_and_grad(box, state.acts.normed.data(), rows, boxes->targets.data(),
                                           boxes->weights.data(), boxes->loss_weight, dfeatures.data(), box.grads.data());
      r.loss += boxes->loss_weight * r.box_loss;
      segmenter_train_backward(model, state.acts, dlogits, s.grads, dfeatures);
    } else {
      segmenter_train_backward(model, state.acts, dlogits, s.grads);
    }
  }
  // Pixel accuracy of this batch (before the step), for the log.
  const Tensor& logits = state.acts.logits;
  const int64_t B = logits.dim(0), K = logits.dim(1), HW = logits.dim(2) * logits.dim(3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < HW; ++i) {
      const int32_t label = labels[static_cast<size_t>(b * HW + i)];
      if (label < 0 || label >= K) continue;
      int64_t best = 0;
      for (int64_t k = 1; k < K; ++k)
        if (logits[(b * K + k) * HW + i] > logits[(b * K + best) * HW + i]) best = k;
      ++r.pixels;
      r.correct += best == label;
    }
  allreduce_mean(o.comm, s.grads);  // data-parallel: the global batch's gradient on every rank
  if (with_boxes) {
    allreduce_mean(o.comm, box.grads);
    // One norm over the model's and the head's gradients, as clip_grad_norm over all parameters.
    const double a = grad_norm(s.grads), b = grad_norm(box.grads);
    r.grad_norm = std::sqrt(a * a + b * b);
    if (o.clip_grad > 0 && o.clip_grad / (r.grad_norm + 1e-6) < 1) {
      const float scale = static_cast<float>(o.clip_grad / (r.grad_norm + 1e-6));
      for (float& g : s.grads) g *= scale;
      for (float& g : box.grads) g *= scale;
    }
  } else {
    r.grad_norm = clip_grad_norm(s.grads, o.clip_grad);
  }
  ++s.step;
  if (with_boxes) {
    const size_t nw = static_cast<size_t>(4 * box.dim);
    std::span<float> w(box.params), g(box.grads), m(box.m), v(box.v);
    if (o.optimizer == Optimizer::AdamW) {
      AdamWOptions a;
      a.lr = o.lr, a.beta1 = o.beta1, a.beta2 = o.beta2, a.eps = o.eps, a.weight_decay = o.weight_decay;
      AdamWOptions bias = a;
      bias.weight_decay = 0.0f;  // the biases take no decay
      const int64_t n = static_cast<int64_t>(w.size()), k = static_cast<int64_t>(nw);
      adamw_step(w, g, m, v, s.step, std::vector<AdamWSegment>{{0, k, a}, {k, n - k, bias}});
    } else {
      sgd_step(w.first(nw), g.first(nw), o.momentum != 0.0f ? m.first(nw) : std::span<float>{}, o.lr, o.momentum,
               o.weight_decay, s.step == 1);
      sgd_step(w.subspan(nw), g.subspan(nw), o.momentum != 0.0f ? m.subspan(nw) : std::span<float>{}, o.lr, o.momentum,
               0.0f, s.step == 1);
    }
  }
  if (o.optimizer == Optimizer::AdamW) {
    AdamWOptions a;
    a.lr = o.lr, a.beta1 = o.beta1, a.beta2 = o.beta2, a.eps = o.eps, a.weight_decay = o.weight_decay;
    vit_train_adamw_step(model.vit, s.grads, s.m, s.v, s.step, a, o.layer_decay);
  } else {
    std::span<float> w(model.vit.weights), g(s.grads), mom(s.m);
    for (const TrainParam& p : model.vit.params) {
      if (model.vit.is_frozen(p)) continue;
      const size_t off = static_cast<size_t>(p.offset), len = static_cast<size_t>(p.numel());
      sgd_step(w.subspan(off, len), g.subspan(off, len),
               o.momentum != 0.0f ? mom.subspan(off, len) : std::span<float>{},
               static_cast<float>(o.lr * vit_train_lr_scale(model.vit, p, o.layer_decay)), o.momentum,
               p.decay ? o.weight_decay : 0.0f, s.step == 1);
    }
  }
  return r;
}

}  // namespace

// ------------------------------------------------------------------ the patch-box loss

PatchBoxHead make_patch_box_head(int64_t dim, uint64_t seed) {
  check(dim > 0, "make_patch_box_head: the width must be positive");
  PatchBoxHead h;
  h.dim = dim;
  h.params.assign(static_cast<size_t>(4 * dim + 4), 0.0f);
  std::mt19937_64 rng(seed ^ 0x626f782d68656164ull);  // "box-head"
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int64_t i = 0; i < 4 * dim; ++i) h.params[static_cast<size_t>(i)] = static_cast<float>(0.02 * normal(rng));
  return h;
}

void patch_box_targets(const std::vector<std::array<float, 4>>& boxes, int64_t H, int64_t W, int64_t p, float* targets,
                       float* weights, bool relative) {
  check(p > 0 && H % p == 0 && W % p == 0, "patch_box_targets: the input must be a multiple of the patch");
  const int64_t gh = H / p, gw = W / p, N = gh * gw;
  std::fill(targets, targets + 4 * N, 0.0f);
  std::fill(weights, weights + N, 0.0f);
  std::vector<float> area(static_cast<size_t>(N), 0.0f);
  auto assign = [&](int64_t i, const std::array<float, 4>& b) {
    const float a = (b[2] - b[0]) * (b[3] - b[1]);
    if (weights[i] > 0 && area[static_cast<size_t>(i)] <= a) return;  // overlapping boxes: the smallest
    area[static_cast<size_t>(i)] = a, weights[i] = 1.0f;
    float* t = targets + 4 * i;
    t[0] = 0.5f * (b[0] + b[2]) / static_cast<float>(W), t[1] = 0.5f * (b[1] + b[3]) / static_cast<float>(H);
    t[2] = (b[2] - b[0]) / static_cast<float>(W), t[3] = (b[3] - b[1]) / static_cast<float>(H);
    if (relative) {  // the offset from this patch's centre
      t[0] += 0.5f - (static_cast<float>(i % gw) + 0.5f) * static_cast<float>(p) / static_cast<float>(W);
      t[1] += 0.5f - (static_cast<float>(i / gw) + 0.5f) * static_cast<float>(p) / static_cast<float>(H);
    }
  };
  for (const std::array<float, 4>& b : boxes) {
    if (!(b[2] > b[0] && b[3] > b[1])) continue;
    bool any = false;
    for (int64_t y = 0; y < gh; ++y) {
      const float cy = (static_cast<float>(y) + 0.5f) * static_cast<float>(p);
      if (cy < b[1] || cy >= b[3]) continue;
      for (int64_t x = 0; x < gw; ++x) {
        const float cx = (static_cast<float>(x) + 0.5f) * static_cast<float>(p);
        if (cx < b[0] || cx >= b[2]) continue;
        assign(y * gw + x, b), any = true;
      }
    }
    if (!any) {  // a box smaller than a patch holds no patch centre: the patch holding its centre
      const int64_t x = std::clamp<int64_t>(static_cast<int64_t>(0.5f * (b[0] + b[2]) / static_cast<float>(p)), 0, gw - 1);
      const int64_t y = std::clamp<int64_t>(static_cast<int64_t>(0.5f * (b[1] + b[3]) / static_cast<float>(p)), 0, gh - 1);
      assign(y * gw + x, b);
    }
  }
}

double patch_box_loss_and_grad(const PatchBoxHead& head, const float* features, int64_t rows, const float* targets,
                               const float* weights, double loss_weight, float* dfeatures, float* dparams) {
  const int64_t D = head.dim;
  check(head.params.size() == static_cast<size_t>(4 * D + 4), "patch_box_loss_and_grad: the head is not [4, dim] + [4]");
  double positives = 0;
  for (int64_t r = 0; r < rows; ++r) positives += weights[r] > 0;
  const double norm = 1.0 / std::max(1.0, positives);
  const float* Wt = head.params.data();
  const float* bias = Wt + 4 * D;
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!(weights[r] > 0)) continue;
    const float* f = features + r * D;
    for (int64_t k = 0; k < 4; ++k) {
      double z = bias[k];
      for (int64_t d = 0; d < D; ++d) z += static_cast<double>(Wt[k * D + d]) * f[d];
      const double pk = 1.0 / (1.0 + std::exp(-z)), diff = pk - targets[4 * r + k];
      sum += std::abs(diff);
      if (!dfeatures && !dparams) continue;
      const double sign = diff > 0 ? 1.0 : diff < 0 ? -1.0 : 0.0;
      const float dz = static_cast<float>(loss_weight * norm * sign * pk * (1.0 - pk));
      if (dparams) {
        for (int64_t d = 0; d < D; ++d) dparams[k * D + d] += dz * f[d];
        dparams[4 * D + k] += dz;
      }
      if (dfeatures)
        for (int64_t d = 0; d < D; ++d) dfeatures[r * D + d] += dz * Wt[k * D + d];
    }
  }
  return sum * norm;
}

// ------------------------------------------------------------------ the loop

int64_t segmenter_total_steps(size_t samples, const SegmenterTrainOptions& o) {
  check(o.batch > 0, "train: the batch size must be positive");
  const int64_t per_epoch = static_cast<int64_t>(samples) / o.batch;
  check(per_epoch > 0, "train: " + std::to_string(samples) + " samples make no batch of " +
                           std::to_string(o.batch));
  const int64_t all = per_epoch * std::max<int64_t>(o.epochs, 0);
  return o.max_steps > 0 ? (all > 0 ? std::min(all, o.max_steps) : o.max_steps) : all;
}

std::vector<size_t> segmenter_batch_indices(size_t samples, const SegmenterTrainOptions& o, int64_t step) {
  return epoch_batch(samples, o.batch, o.shuffle, o.seed, step, "train");
}

void segmentation_sample(const SegmentationPair& pair, const PreprocessConfig& processor, bool augment,
                         uint64_t augment_seed, float* pixels, int32_t* labels, int64_t height,
                         int64_t width, int64_t crop, bool hflip, std::vector<std::array<float, 4>>* boxes) {
  cv::Mat rgb = load_image_rgb(pair.image);
  // The boxes' corners [x0, y0, x1, y1] in the current image's continuous pixel coordinates
  // (pixel i spans [i, i + 1)), moved with every geometric step below.
  std::vector<std::array<double, 4>> corners;
  if (boxes)
    for (const std::array<double, 4>& b : pair.boxes) corners.push_back({b[0], b[1], b[0] + b[2], b[1] + b[3]});
  auto scale_boxes = [&](double sx, double sy, double ox, double oy) {  // x → sx·x + ox
    for (std::array<double, 4>& c : corners) c = {sx * c[0] + ox, sy * c[1] + oy, sx * c[2] + ox, sy * c[3] + oy};
  };
  auto flip_boxes = [&](double w) {
    for (std::array<double, 4>& c : corners) c = {w - c[2], c[1], w - c[0], c[3]};
  };
  auto emit_boxes = [&] {  // clipped to the output; empty ones dropped
    if (!boxes) return;
    boxes->clear();
    for (const std::array<double, 4>& c : corners) {
      const std::array<float, 4> b{static_cast<float>(std::clamp(c[0], 0.0, static_cast<double>(width))),
                                   static_cast<float>(std::clamp(c[1], 0.0, static_cast<double>(height))),
                                   static_cast<float>(std::clamp(c[2], 0.0, static_cast<double>(width))),
                                   static_cast<float>(std::clamp(c[3], 0.0, static_cast<double>(height)))};
      if (b[2] > b[0] && b[3] > b[1]) boxes->push_back(b);
    }
  };
  cv::Mat mask = load_label_map(pair.mask);
  check(mask.size() == rgb.size(), pair.mask + ": not a label map of its image's size");
  // Uniforms from the 53 high bits of a mt19937_64: the same on every platform.
  std::mt19937_64 rng(augment_seed);
  auto uniform = [&](double lo, double hi) {
    return lo + (hi - lo) * static_cast<double>(rng() >> 11) * 0x1.0p-53;
  };
  // After the geometry (its draws first): a horizontal flip of half the samples (hflip), and
  // contrast about mid-grey ×[0.8, 1.2] then brightness ±0.2·255, saturating.
  auto photometric = [&](cv::Mat& image, cv::Mat& label_map) {
    const bool flip = hflip && uniform(0, 1) < 0.5;
    const double gain = uniform(0.8, 1.2), bias = uniform(-0.2, 0.2) * 255.0;
    if (flip) {
      cv::Mat fi, fm;
      cv::flip(image, fi, 1), cv::flip(label_map, fm, 1);
      image = fi, label_map = fm;
      flip_boxes(image.cols);
    }
    cv::Mat out;
    image.convertTo(out, -1, gain, bias + 127.5 * (1 - gain));
    image = out;
  };
  if (crop > 0) {
    check(height == crop && width == crop, "segmentation_sample: the crop must be the model's input size");
    check(!processor.do_resize && !processor.do_center_crop,
          "segmentation_sample: crops need a processor that keeps the image's size (do_resize false)");
    auto scale_to = [&](double sw, double sh) {
      const cv::Size to(std::max(1, static_cast<int>(std::lround(rgb.cols * sw))),
                        std::max(1, static_cast<int>(std::lround(rgb.rows * sh))));
      if (to == rgb.size()) return;
      cv::Mat r, rm;
      cv::resize(rgb, r, to, 0, 0, cv::INTER_LINEAR);
      cv::resize(mask, rm, to, 0, 0, cv::INTER_NEAREST_EXACT);
      scale_boxes(static_cast<double>(to.width) / rgb.cols, static_cast<double>(to.height) / rgb.rows, 0, 0);
      rgb = r, mask = rm;
    };
    if (augment) {
      const double s = std::exp(uniform(std::log(0.8), std::log(1.25)));
      scale_to(s, s);
    }
    if (std::min(rgb.rows, rgb.cols) < crop) {  // segm resize(): the short side becomes `crop`
      const double s = static_cast<double>(crop) / std::min(rgb.rows, rgb.cols);
      scale_to(s, s);
    }
    const int c = static_cast<int>(crop);
    auto label_at = [&](int y, int x) -> int {
      return mask.depth() == CV_16U ? mask.at<uint16_t>(y, x) : mask.at<uint8_t>(y, x);
    };
    cv::Rect win((rgb.cols - c) / 2, (rgb.rows - c) / 2, c, c);
    if (augment) {
      // Class-balanced centre: one class present in the image, chosen uniformly (not by area, so
      // a digit's few ink pixels count as much as the background), one of its pixels uniformly;
      // the window centred there, moved by up to a quarter of its size, kept inside the image.
      std::vector<int64_t> count(mask.depth() == CV_16U ? 65536 : 256, 0);
      for (int y = 0; y < mask.rows; ++y)
        for (int x = 0; x < mask.cols; ++x) ++count[static_cast<size_t>(label_at(y, x))];
      count[255] = 0;  // ignore
      std::vector<int> present;
      for (size_t v = 0; v < count.size(); ++v)
        if (count[v] > 0) present.push_back(static_cast<int>(v));
      int cy = rgb.rows / 2, cx = rgb.cols / 2;
      if (!present.empty()) {
        const int label = present[static_cast<size_t>(uniform(0, static_cast<double>(present.size()) - 1e-9))];
        int64_t k = static_cast<int64_t>(uniform(0, static_cast<double>(count[static_cast<size_t>(label)]) - 1e-9));
        for (int y = 0; y < mask.rows && k >= 0; ++y)
          for (int x = 0; x < mask.cols && k >= 0; ++x)
            if (label_at(y, x) == label && k-- == 0) cy = y, cx = x;
      }
      const double jitter = 0.25 * c;
      win.x = static_cast<int>(std::lround(cx - c / 2.0 + uniform(-jitter, jitter)));
      win.y = static_cast<int>(std::lround(cy - c / 2.0 + uniform(-jitter, jitter)));
      win.x = std::clamp(win.x, 0, rgb.cols - c);
      win.y = std::clamp(win.y, 0, rgb.rows - c);
    }
    cv::Mat window = rgb(win).clone(), window_mask = mask(win).clone();
    scale_boxes(1, 1, -win.x, -win.y);
    if (augment) photometric(window, window_mask);
    emit_boxes();
    rgb_to_chw(window, processor, pixels);
    for (int y = 0; y < c; ++y)
      for (int x = 0; x < c; ++x)
        labels[y * c + x] = window_mask.depth() == CV_16U ? window_mask.at<uint16_t>(y, x) : window_mask.at<uint8_t>(y, x);
    return;
  }
  if (augment) {
    const double s = std::exp(uniform(std::log(0.8), std::log(1.25)));
    const double tx = uniform(-0.1, 0.1) * rgb.cols, ty = uniform(-0.1, 0.1) * rgb.rows;
    const double cx = 0.5 * rgb.cols, cy = 0.5 * rgb.rows;
    const cv::Matx23d a(s, 0, (1 - s) * cx + tx, 0, s, (1 - s) * cy + ty);
    cv::Mat warped, warped_mask;
    cv::warpAffine(rgb, warped, a, rgb.size(), cv::INTER_LINEAR, cv::BORDER_REPLICATE);
    cv::warpAffine(mask, warped_mask, a, mask.size(), cv::INTER_NEAREST, cv::BORDER_REPLICATE);
    // warpAffine maps pixel centres (x + ½): an edge e goes to s·(e − ½) + a₀₂ + ½.
    scale_boxes(s, s, a(0, 2) + 0.5 * (1 - s), a(1, 2) + 0.5 * (1 - s));
    rgb = warped, mask = warped_mask;
    photometric(rgb, mask);
  }
  const cv::Mat resized = resize_and_crop(rgb, processor);
  check(resized.rows == height && resized.cols == width,
        pair.image + ": the processor makes " + std::to_string(resized.cols) + "x" +
            std::to_string(resized.rows) + ", the model trains at " + std::to_string(width) + "x" +
            std::to_string(height) + " (set the processor's size to the model's image_size)");
  rgb_to_chw(resized, processor, pixels);
  // The mask through the same geometry: nearest neighbour (pixel centres, as PIL's NEAREST) to the
  // resized size, then the crop window (outside: ignore).
  const cv::Size rs = processor.do_resize ? resize_output_size(rgb.size(), processor) : rgb.size();
  cv::Mat mask_resized;
  if (rs == mask.size()) mask_resized = mask;
  else cv::resize(mask, mask_resized, rs, 0, 0, cv::INTER_NEAREST_EXACT);
  const cv::Rect win = processor.do_center_crop ? crop_window(rs, processor) : cv::Rect({0, 0}, rs);
  scale_boxes(static_cast<double>(rs.width) / rgb.cols, static_cast<double>(rs.height) / rgb.rows, -win.x, -win.y);
  emit_boxes();
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x = 0; x < width; ++x) {
      const int sy = win.y + static_cast<int>(y), sx = win.x + static_cast<int>(x);
      int32_t v = 255;
      if (sy >= 0 && sy < rs.height && sx >= 0 && sx < rs.width)
        v = mask_resized.depth() == CV_16U ? mask_resized.at<uint16_t>(sy, sx) : mask_resized.at<uint8_t>(sy, sx);
      labels[y * width + x] = v;
    }
}

bool segmenter_caches_features(const SegmenterTrainModel& model, size_t samples, const SegmenterTrainOptions& o) {
  if (!model.vit.frozen_encoder || o.augment || !o.cache_features) return false;
  const VitConfig& c = model.vit.config;
  const double per = static_cast<double>((c.image_height / c.patch_size) * (c.image_width / c.patch_size) * c.hidden_size +
                                         c.image_height * c.image_width);
  return per * 4.0 * static_cast<double>(samples) <= o.cache_limit_bytes;
}

void train_segmenter(SegmenterTrainModel& model, SegmenterTrainState& state,
                     const std::vector<SegmentationPair>& data, const PreprocessConfig& processor,
                     const SegmenterTrainOptions& o,
                     const std::function<void(const SegmenterProgress&)>& on_step, int64_t stop_before) {
  const VitConfig& c = model.vit.config;
  const int64_t H = c.image_height, W = c.image_width, C = c.num_channels;
  const int64_t total = segmenter_total_steps(data.size(), o);
  const int64_t per_epoch = static_cast<int64_t>(data.size()) / o.batch;
  const int64_t end = stop_before > 0 ? std::min(stop_before, total) : total;
  check(o.shards >= 1 && o.shard >= 0 && o.shard < o.shards && o.batch % o.shards == 0,
        "train: the batch of " + std::to_string(o.batch) + " does not split evenly over " + std::to_string(o.shards) +
            " ranks");
  const int64_t lo = o.batch / o.shards * o.shard, nb = o.batch / o.shards;  // this rank's positions
  check(o.shards == 1 || !segmenter_caches_features(model, data.size(), o),
        "train: cached frozen-encoder features are for one process");
  if (state.opt.step < end && segmenter_caches_features(model, data.size(), o)) {
    // --freeze-encoder without augmentation: each sample (deterministic without augmentation)
    // through the frozen encoder once, in file order; each step gathers its samples' rows.
    const int64_t N = (H / c.patch_size) * (W / c.patch_size), per = N * c.hidden_size;
    const int64_t n = static_cast<int64_t>(data.size());
    std::vector<float> cache(static_cast<size_t>(n * per));
    std::vector<int32_t> label_cache(static_cast<size_t>(n * H * W));
    {
      SegmenterTrainActivations encode_acts;
      // The frozen encoder's features in fp32 whatever --precision: they are what inference feeds
      // the head (the published model is fp32), and encoding once gains nothing from bf16; the head
      // itself trains at --precision.
      const TrainingGemmScope fp32(WeightType::F32);
      for (int64_t i0 = 0; i0 < n; i0 += o.batch) {
        const int64_t nb = std::min(n - i0, o.batch);
        Tensor pixels({nb, C, H, W});
        parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            segmentation_sample(data[static_cast<size_t>(i0 + b)], processor, false, 0, pixels.data() + b * C * H * W,
                                label_cache.data() + (i0 + b) * H * W, H, W, model.window_size);
        });
        segmenter_encode_features(model, pixels, encode_acts, cache.data() + i0 * per);
      }
    }
    std::vector<float> features(static_cast<size_t>(o.batch * per));
    std::vector<int32_t> labels(static_cast<size_t>(o.batch * H * W));
    while (state.opt.step < end) {
      const int64_t s = state.opt.step;
      const std::vector<size_t> idx = segmenter_batch_indices(data.size(), o, s);
      for (size_t b = 0; b < idx.size(); ++b) {
        const int64_t k = static_cast<int64_t>(idx[b]), bi = static_cast<int64_t>(b);
        std::copy_n(cache.data() + k * per, per, features.data() + bi * per);
        std::copy_n(label_cache.data() + k * H * W, H * W, labels.data() + bi * H * W);
      }
      TrainStepOptions step = o.step;
      step.lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
      const SegmenterStepResult r = segmenter_train_step_features(model, state, features.data(), o.batch, labels, step);
      if (on_step)
        on_step({s + 1, total, s / per_epoch, r.loss, step.lr, r.grad_norm,
                 r.pixels ? static_cast<double>(r.correct) / static_cast<double>(r.pixels) : 0.0, o.batch});
    }
    return;
  }
  const bool with_boxes = o.box_loss > 0;
  const int64_t N = (H / c.patch_size) * (W / c.patch_size);
  if (with_boxes) {
    check(!model.vit.frozen_encoder, "train: the patch-box loss trains the encoder (not with a frozen one)");
    if (state.box.dim != c.hidden_size) state.box = make_patch_box_head(c.hidden_size, o.seed);
  }
  struct Batch {
    Tensor pixels;
    std::vector<int32_t> labels;
    PatchBoxBatch boxes;
  };
  // Every batch follows from (seed, step) alone, so it can be made ahead of its step.
  auto load = [&](int64_t s) {
    Batch batch{Tensor({nb, C, H, W}), std::vector<int32_t>(static_cast<size_t>(nb * H * W)), {}};
    if (with_boxes) {
      batch.boxes.loss_weight = o.box_loss;
      batch.boxes.targets.assign(static_cast<size_t>(nb * N * 4), 0.0f);
      batch.boxes.weights.assign(static_cast<size_t>(nb * N), 0.0f);
    }
    const std::vector<size_t> idx = segmenter_batch_indices(data.size(), o, s);
    parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = lo + i;  // the position in the global batch: its augmentation's seed
        const uint64_t aug_seed = (o.seed * 0x9E3779B97F4A7C15ull) ^
                                  (static_cast<uint64_t>(s) * 0xBF58476D1CE4E5B9ull + static_cast<uint64_t>(b) + 1);
        std::vector<std::array<float, 4>> boxes;
        segmentation_sample(data[idx[static_cast<size_t>(b)]], processor, o.augment, aug_seed,
                            batch.pixels.data() + i * C * H * W, batch.labels.data() + i * H * W, H, W,
                            model.window_size, o.hflip, with_boxes ? &boxes : nullptr);
        if (with_boxes)
          patch_box_targets(boxes, H, W, c.patch_size, batch.boxes.targets.data() + i * N * 4,
                            batch.boxes.weights.data() + i * N, model.window_size > 0);
      }
    });
    return batch;
  };
  // Decoding and augmentation of batch s + 1 overlap the step on batch s.
  std::future<Batch> next;
  if (state.opt.step < end) next = std::async(std::launch::async, load, state.opt.step);
  while (state.opt.step < end) {
    const int64_t s = state.opt.step;
    const Batch batch = next.get();
    if (s + 1 < end) next = std::async(std::launch::async, load, s + 1);
    const Tensor& pixels = batch.pixels;
    const std::vector<int32_t>& labels = batch.labels;
    TrainStepOptions step = o.step;
    step.lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
    const SegmenterStepResult r =
        segmenter_train_step(model, state, pixels, labels, step, with_boxes ? &batch.boxes : nullptr);
    double loss = r.loss, correct = static_cast<double>(r.correct), pixels_n = static_cast<double>(r.pixels);
    double box_loss = r.box_loss;
    if (o.step.comm && o.step.comm->size() > 1) {  // the global batch's loss and accuracy, for the log
      std::array<double, 4> v = {loss, correct, pixels_n, box_loss};
      o.step.comm->allreduce_sum(v);
      loss = v[0] / o.step.comm->size(), correct = v[1], pixels_n = v[2], box_loss = v[3] / o.step.comm->size();
    }
    if (on_step)
      on_step({s + 1, total, s / per_epoch, loss, step.lr, r.grad_norm, pixels_n > 0 ? correct / pixels_n : 0.0, o.batch,
               box_loss});
  }
}

}  // namespace tessera
