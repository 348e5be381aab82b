#include "tessera/model.hpp"

#include "model_internal.hpp"

#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/kernels.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace tessera::detail;

namespace tessera {
namespace detail {

// A regular file of at most kMaxConfigBytes (a link to /dev/zero or a FIFO is refused, not read forever).
std::string read_text(const fs::path& path) { return read_regular_file(path.string(), "JSON file"); }

// Depth-checked first (nlohmann recurses per level when it prints or copies a value); every
// nlohmann error, a number out of range (1e999) included, becomes an Error naming the file.
json parse_json(const std::string& text, const std::string& file) {
  check_json_depth(text, file);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail(file + ": invalid JSON (" + brief_text(e.what(), 200) + ")");
  }
}

// Typed access to config.json fields with errors that name the file and the field.
Checkpoint open_checkpoint(const fs::path& dir) {
  fs::path single = dir / "model.safetensors";
  fs::path index = dir / "model.safetensors.index.json";
  std::error_code ec;
  if (fs::exists(single, ec)) return {SafeTensors::open(single.string()), single.string(), {}, 0, {}};
  if (fs::exists(index, ec)) return {SafeTensors::open(index.string()), index.string(), {}, 0, {}};
  for (const char* other : {"pytorch_model.bin", "model.pth", "model.pt", "open_clip_pytorch_model.bin"})
    if (fs::exists(dir / other, ec))
      fail(dir.string() + ": has " + other + " but no model.safetensors; convert it with "
           "tools/convert_to_safetensors.py (pickled PyTorch checkpoints are not loaded)");
  fail(dir.string() + ": no model.safetensors or model.safetensors.index.json");
}

PackedLinear pack_weight(Checkpoint& ck, const std::string& weight, const Shape& shape,
                         const std::string& bias, WeightType type, const Tensor* gamma) {
  ck.expect(weight, shape);
  const int64_t out = shape.at(0), in = out > 0 ? shape_numel(shape) / out : 0;
  // The bias goes into the packed layer: read it into a scratch vector, not the arena.
  std::vector<float> b(!bias.empty() || gamma ? static_cast<size_t>(out) : 0, 0.0f);
  if (!bias.empty()) {
    ck.expect(bias, {out});
    ck.st.read(bias, 0, out, b.data());
  }
  if (gamma)
    for (int64_t n = 0; n < out; ++n) b[n] *= (*gamma)[n];
  const WeightRows rows = [&](int64_t n0, int64_t n1, float* dst) {
    ck.st.read(weight, n0 * in, (n1 - n0) * in, dst);
    if (gamma)
      for (int64_t n = n0; n < n1; ++n) {
        const float g = (*gamma)[n];
        for (int64_t k = 0; k < in; ++k) dst[(n - n0) * in + k] *= g;
      }
  };
  return pack_linear(rows, b.empty() ? nullptr : b.data(), out, in, type, &ck.arena);
}

PackedLinear pack(Checkpoint& ck, const std::string& weight, const std::string& bias, int64_t out,
                  int64_t in, bool has_bias, WeightType type, const Tensor* gamma) {
  return pack_weight(ck, weight, {out, in}, has_bias ? bias : "", type, gamma);
}

PackedLinear pack_stacked(Checkpoint& ck, const std::vector<std::string>& parts, int64_t d, bool bias,
                          WeightType type) {
  const int64_t n_parts = static_cast<int64_t>(parts.size());
  std::vector<std::string> weights;
  std::vector<float> b(bias ? static_cast<size_t>(n_parts * d) : 0);
  for (int64_t i = 0; i < n_parts; ++i) {
    weights.push_back(parts[i] + ".weight");
    ck.expect(weights.back(), {d, d});
    if (bias) {
      ck.expect(parts[i] + ".bias", {d});
      ck.st.read(parts[i] + ".bias", 0, d, b.data() + i * d);
    }
  }
  // Output row n is row n mod d of part n / d; a panel may straddle two parts.
  const WeightRows rows = [&](int64_t n0, int64_t n1, float* dst) {
    for (int64_t n = n0; n < n1;) {
      const int64_t i = n / d, end = std::min(n1, (i + 1) * d);
      ck.st.read(weights[i], (n - i * d) * d, (end - n) * d, dst + (n - n0) * d);
      n = end;
    }
  };
  return pack_linear(rows, bias ? b.data() : nullptr, n_parts * d, d, type, &ck.arena);
}

PackedLinear pack_qkv(Checkpoint& ck, const std::string& q, const std::string& k,
                      const std::string& v, int64_t d, bool bias, WeightType type) {
  return pack_stacked(ck, {q, k, v}, d, bias, type);
}

// Loads [1, n, D] (or [n, D]) token parameters as [n, D].
Tensor tokens(Checkpoint& ck, const std::string& name, int64_t n, int64_t d) {
  const Shape& s = ck.shape(name);
  if (s.size() == 2) return ck.get(name, {n, d});
  return ck.get(name, {1, n, d}).reshape({n, d});
}

std::vector<std::string> labels_from(const json& cfg, int64_t n, const std::string& file) {
  std::vector<std::string> labels(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) labels[i] = "LABEL_" + std::to_string(i);
  if (cfg.contains("id2label") && cfg["id2label"].is_object()) {
    for (auto& [key, value] : cfg["id2label"].items()) {
      char* end = nullptr;
      long id = std::strtol(key.c_str(), &end, 10);
      check(end != key.c_str() && *end == '\0' && id >= 0,
            file + ": id2label key '" + key + "' is not a class index");
      if (id < n && value.is_string()) labels[id] = value.get<std::string>();
    }
  } else if (cfg.contains("label_names") && cfg["label_names"].is_array()) {
    for (size_t i = 0; i < cfg["label_names"].size() && static_cast<int64_t>(i) < n; ++i)
      if (cfg["label_names"][i].is_string()) labels[i] = cfg["label_names"][i].get<std::string>();
  }
  return labels;
}

int64_t count_layers(const Checkpoint& ck, const std::string& prefix, const std::string& suffix) {
  int64_t n = 0;
  while (ck.has(prefix + std::to_string(n) + suffix)) ++n;
  return n;
}

}  // namespace detail

namespace {
using namespace detail;

// ---------------------------------------------------------------- Hugging Face ViT/DeiT/DINOv2

}  // namespace

namespace detail {

VitConfig hf_vit_config(const Config& cfg, const std::string& mt) {
  VitConfig c;
  auto [ih, iw] = cfg.size2("image_size");
  c.image_height = ih, c.image_width = iw;
  c.patch_size = cfg.positive("patch_size");
  c.num_channels = cfg.integer("num_channels", 3);
  c.hidden_size = cfg.positive("hidden_size");
  c.num_hidden_layers = cfg.positive("num_hidden_layers");
  c.num_attention_heads = cfg.positive("num_attention_heads");
  check(c.hidden_size % c.num_attention_heads == 0,
        cfg.file + ": hidden_size " + std::to_string(c.hidden_size) +
            " is not a multiple of num_attention_heads " + std::to_string(c.num_attention_heads));
  if (mt == "dinov2") {
    double ratio = cfg.number("mlp_ratio", 4.0);
    c.intermediate_size = static_cast<int64_t>(c.hidden_size * ratio);
    if (cfg.boolean("use_swiglu_ffn", false)) {
      // transformers' Dinov2SwiGLUFFN: hidden = (int(F * 2 / 3) + 7) // 8 * 8
      c.activation = MlpActivation::SwiGlu;
      c.intermediate_size = (c.intermediate_size * 2 / 3 + 7) / 8 * 8;
    }
  } else {
    c.intermediate_size = cfg.positive("intermediate_size");
  }
  c.layer_norm_eps = static_cast<float>(cfg.number("layer_norm_eps", 1e-12));
  c.qkv_bias = cfg.boolean("qkv_bias", true);
  std::string act = cfg.string("hidden_act", "gelu");
  check(act == "gelu", cfg.file + ": hidden_act \"" + brief_text(act) + "\" is not supported (only \"gelu\")");
  c.class_token = true;
  c.pos_resample = PosResample::HfScaleBicubic;
  c.layer_scale = (mt == "dinov2");
  if (mt == "deit") c.num_distillation_tokens = 1;
  return c;
}

void load_hf_encoder(VitWeights& w, Checkpoint& ck, const std::string& base, const std::string& mt,
                     WeightType type) {
  const WeightType edge = edge_layer_type(type);  // patch embedding, pooler, heads
  const VitConfig& c = w.config;
  const std::string e = base + "embeddings.";
  const int64_t d = c.hidden_size, p = c.patch_size, C = c.num_channels;

  // Position embeddings: [1, prefix + grid + detection, D].
  const int64_t grid = c.grid_height() * c.grid_width();
  w.pos_embed = tokens(ck, e + "position_embeddings",
                       c.num_prefix_tokens() + grid + c.num_detection_tokens, d);
  Tensor cls = tokens(ck, e + "cls_token", 1, d);
  w.prefix_tokens = Tensor({c.num_prefix_tokens(), d});
  std::memcpy(w.prefix_tokens.data(), cls.data(), sizeof(float) * d);
  if (c.num_distillation_tokens) {
    Tensor dist = tokens(ck, e + "distillation_token", 1, d);
    std::memcpy(w.prefix_tokens.data() + d, dist.data(), sizeof(float) * d);
  }
  if (c.num_detection_tokens)
    w.detection_tokens = tokens(ck, e + "detection_tokens", c.num_detection_tokens, d);
  w.patch_embed = pack_weight(ck, e + "patch_embeddings.projection.weight", {d, C, p, p},
                              e + "patch_embeddings.projection.bias", edge);
  if (mt == "dinov2" && ck.has(e + "mask_token")) ck.expect(e + "mask_token", {1, d});

  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = base + "encoder.layer." + std::to_string(i) + ".";
    VitLayer layer;
    const std::string att = l + "attention.attention.";
    layer.qkv = pack_qkv(ck, att + "query", att + "key", att + "value", d, c.qkv_bias, type);
    if (mt == "dinov2") {
      Tensor ls1 = ck.get(l + "layer_scale1.lambda1", {d});
      Tensor ls2 = ck.get(l + "layer_scale2.lambda1", {d});
      layer.norm1_weight = ck.get(l + "norm1.weight", {d});
      layer.norm1_bias = ck.get(l + "norm1.bias", {d});
      layer.norm2_weight = ck.get(l + "norm2.weight", {d});
      layer.norm2_bias = ck.get(l + "norm2.bias", {d});
      layer.attn_out = pack(ck, l + "attention.output.dense.weight", l + "attention.output.dense.bias",
                            d, d, true, type, &ls1);
      const bool swiglu = c.activation == MlpActivation::SwiGlu;
      const std::string in = l + (swiglu ? "mlp.weights_in." : "mlp.fc1.");
      const std::string out = l + (swiglu ? "mlp.weights_out." : "mlp.fc2.");
      const int64_t f = c.intermediate_size;
      layer.fc1 = pack(ck, in + "weight", in + "bias", swiglu ? 2 * f : f, d, true, type);
      layer.fc2 = pack(ck, out + "weight", out + "bias", d, f, true, type, &ls2);
    } else {
      layer.norm1_weight = ck.get(l + "layernorm_before.weight", {d});
      layer.norm1_bias = ck.get(l + "layernorm_before.bias", {d});
      layer.norm2_weight = ck.get(l + "layernorm_after.weight", {d});
      layer.norm2_bias = ck.get(l + "layernorm_after.bias", {d});
      layer.attn_out = pack(ck, l + "attention.output.dense.weight",
                            l + "attention.output.dense.bias", d, d, true, type);
      layer.fc1 = pack(ck, l + "intermediate.dense.weight", l + "intermediate.dense.bias",
                       c.intermediate_size, d, true, type);
      layer.fc2 = pack(ck, l + "output.dense.weight", l + "output.dense.bias", d,
                       c.intermediate_size, true, type);
    }
    w.layers.push_back(std::move(layer));
  }
  const std::string next = base + "encoder.layer." + std::to_string(c.num_hidden_layers) + ".";
  check(!ck.has(next + "norm1.weight") && !ck.has(next + "layernorm_before.weight"),
        ck.file + ": has more layers than num_hidden_layers = " + std::to_string(c.num_hidden_layers));
  w.final_norm_weight = ck.get(base + "layernorm.weight", {d});
  w.final_norm_bias = ck.get(base + "layernorm.bias", {d});
}

}  // namespace detail

namespace {

void load_hf(Model& m, const Config& cfg, Checkpoint& ck, WeightType type) {
  const WeightType edge = edge_layer_type(type);  // patch embedding, pooler, heads
  const std::string& mt = m.model_type;
  m.encoder.config = hf_vit_config(cfg, mt);
  const std::string arch = m.architecture;
  // Weights of the base model sit under "vit." / "deit." / "dinov2." in task models.
  std::string base = mt + ".";
  if (!ck.has(base + "embeddings.cls_token")) base = "";
  const bool teacher = arch == "DeiTForImageClassificationWithTeacher";
  load_hf_encoder(m.encoder, ck, base, mt, type);
  const int64_t d = m.encoder.config.hidden_size;

  ClassifierWeights& h = m.classifier;
  auto num_labels_of = [&](const std::string& name) { return ck.dim(name, 0, 2); };
  if (arch == "ViTForImageClassification" || arch == "DeiTForImageClassification") {
    h.kind = HeadKind::ClassToken;
    h.num_labels = num_labels_of("classifier.weight");
    h.head = pack(ck, "classifier.weight", "classifier.bias", h.num_labels, d, true, edge);
  } else if (teacher) {
    h.kind = HeadKind::DeitTeacher;
    h.num_labels = num_labels_of("cls_classifier.weight");
    h.head = pack(ck, "cls_classifier.weight", "cls_classifier.bias", h.num_labels, d, true, edge);
    h.head_dist = pack(ck, "distillation_classifier.weight", "distillation_classifier.bias",
                       h.num_labels, d, true, edge);
  } else if (arch == "Dinov2ForImageClassification") {
    h.kind = HeadKind::Dinov2ClassMean;
    h.num_labels = num_labels_of("classifier.weight");
    h.head = pack(ck, "classifier.weight", "classifier.bias", h.num_labels, 2 * d, true, edge);
  } else if (arch == "ViTModel" || arch == "DeiTModel" || arch == "Dinov2Model") {
    h.kind = HeadKind::None;
    if (mt != "dinov2" && ck.has(base + "pooler.dense.weight")) {
      h.has_pooler = true;
      h.pooler = pack(ck, base + "pooler.dense.weight", base + "pooler.dense.bias", d, d, true, edge);
    }
  } else {
    fail(cfg.file + ": architecture \"" + arch + "\" is not supported for model_type \"" + mt +
         "\" (supported: ViTForImageClassification, ViTModel, DeiTForImageClassification, "
         "DeiTForImageClassificationWithTeacher, DeiTModel, Dinov2Model, "
         "Dinov2ForImageClassification)");
  }
  m.labels = labels_from(cfg.j, h.num_labels, cfg.file);
}

// ---------------------------------------------------------------- timm

// num_heads is not in the weights; timm's architecture names fix it (head_dim 64 otherwise).
int64_t timm_heads(const std::string& arch, int64_t dim) {
  static const std::pair<const char*, int64_t> by_size[] = {
      {"_tiny_", 3}, {"_small_", 6}, {"_little_", 5}, {"_medium_", 8}, {"_mediumd_", 8},
      {"_betwixt_", 10}, {"_base_", 12}, {"_large_", 16}, {"_so400m_", 16}, {"_so150m_", 16},
      {"_huge_", 16}, {"_giant_", 16}, {"_gigantic_", 16}, {"_7b_", 32}};
  for (auto& [key, heads] : by_size)
    if (arch.find(key) != std::string::npos && dim % heads == 0) return heads;
  return std::max<int64_t>(1, dim / 64);
}

void load_timm(Model& m, const Config& cfg, Checkpoint& ck, WeightType type) {
  const WeightType edge = edge_layer_type(type);  // patch embedding, pooler, heads
  const std::string arch = cfg.string("architecture", "");
  check(arch.rfind("vit_", 0) == 0 || arch.rfind("deit_", 0) == 0 || arch.rfind("deit3_", 0) == 0,
        cfg.file + ": timm architecture \"" + brief_text(arch) + "\" is not supported (timm VisionTransformer: vit_*, deit_*)");
  m.architecture = "timm:" + arch;
  Config args{cfg.has("model_args") ? cfg.j["model_args"] : json::object(), cfg.file + " (model_args)"};
  Config pre{cfg.has("pretrained_cfg") ? cfg.j["pretrained_cfg"] : json::object(),
             cfg.file + " (pretrained_cfg)"};
  for (const char* unsupported : {"attn_pool.latent", "blocks.0.attn.q_norm.weight",
                                  "blocks.0.norm1.weight_unused", "blocks.0.attn.norm.weight"})
    check(!ck.has(unsupported), ck.file + ": timm feature with '" + unsupported +
                                    "' is not supported (attention pooling / qk-norm / scale-norm)");
  const std::string pool = cfg.string("global_pool", args.string("global_pool", "token"));
  check(pool == "token" || pool == "avg" || pool == "",
        cfg.file + ": global_pool \"" + brief_text(pool) + "\" is not supported (token, avg)");

  VitConfig& c = m.encoder.config;
  VitWeights& w = m.encoder;
  const Shape& pws = ck.shape("patch_embed.proj.weight");
  check(pws.size() == 4 && pws[2] == pws[3],
        ck.file + ": patch_embed.proj.weight must be [D, C, p, p], got " + shape_str(pws));
  const int64_t d = pws[0], C = pws[1], p = pws[2];
  c.hidden_size = d, c.num_channels = C, c.patch_size = p;
  if (args.has("patch_size")) check(args.integer("patch_size") == p, cfg.file + ": patch_size disagrees with the weights");
  if (args.has("embed_dim")) check(args.integer("embed_dim") == d, cfg.file + ": embed_dim disagrees with the weights");
  int64_t ih = 224, iw = 224;
  if (args.has("img_size")) {
    std::tie(ih, iw) = args.size2("img_size");
  } else if (pre.has("input_size") && pre.j["input_size"].is_array() && pre.j["input_size"].size() == 3) {
    const json& v = pre.j["input_size"];
    check(v[1].is_number_integer() && v[2].is_number_integer() && v[1].get<int64_t>() > 0 &&
              v[2].get<int64_t>() > 0 && v[1].get<int64_t>() <= kMaxImageSide && v[2].get<int64_t>() <= kMaxImageSide,
          pre.file + ": \"input_size\" must be [3, height, width] with sides 1.." + std::to_string(kMaxImageSide) +
              ", got " + brief(v));
    ih = v[1].get<int64_t>(), iw = v[2].get<int64_t>();
  }
  c.image_height = ih, c.image_width = iw;
  c.num_hidden_layers = count_layers(ck, "blocks.", ".norm1.weight");
  check(c.num_hidden_layers > 0, ck.file + ": no transformer blocks (blocks.0.norm1.weight)");
  if (args.has("depth")) check(args.integer("depth") == c.num_hidden_layers, cfg.file + ": depth disagrees with the weights");
  c.num_attention_heads = args.has("num_heads") ? args.positive("num_heads") : timm_heads(arch, d);
  check(d % c.num_attention_heads == 0, cfg.file + ": embed_dim is not a multiple of num_heads");
  c.intermediate_size = ck.dim("blocks.0.mlp.fc1.weight", 0, 2);
  c.qkv_bias = ck.has("blocks.0.attn.qkv.bias");
  c.class_token = ck.has("cls_token");
  c.num_distillation_tokens = ck.has("dist_token") ? 1 : 0;
  c.num_register_tokens = ck.has("reg_token") ? ck.dim("reg_token", 1, 3) : 0;  // [1, n, D]
  c.pre_norm = ck.has("norm_pre.weight");
  c.layer_scale = ck.has("blocks.0.ls1.gamma");
  c.final_norm = ck.has("norm.weight");
  // timm's ViTs use LayerNorm(eps=1e-6); its CLIP variants pass nn.LayerNorm (eps=1e-5).
  c.layer_norm_eps = arch.find("clip") != std::string::npos ? 1e-5f : 1e-6f;
  std::string act = args.string("act_layer", arch.find("quickgelu") != std::string::npos ? "quick_gelu" : "gelu");
  check(act == "gelu" || act == "quick_gelu", cfg.file + ": act_layer \"" + brief_text(act) + "\" is not supported");
  c.activation = act == "quick_gelu" ? MlpActivation::QuickGelu : MlpActivation::Gelu;
  c.pos_resample = PosResample::TimmAntialias;

  const int64_t grid = c.grid_height() * c.grid_width();
  const int64_t prefix = c.num_prefix_tokens();
  const Shape& pos = ck.shape("pos_embed");
  check(pos.size() == 3 && pos[0] == 1 && pos[2] == d,
        ck.file + ": pos_embed must be [1, N, " + std::to_string(d) + "], got " + shape_str(pos));
  if (pos[1] == grid + prefix) {
    c.prefix_has_pos_embed = true;
  } else if (pos[1] == grid) {
    c.prefix_has_pos_embed = false;  // no_embed_class
  } else {
    fail(ck.file + ": pos_embed has " + std::to_string(pos[1]) + " positions; a " +
         std::to_string(c.grid_height()) + "x" + std::to_string(c.grid_width()) +
         " grid with " + std::to_string(prefix) + " prefix tokens needs " + std::to_string(grid) +
         " or " + std::to_string(grid + prefix));
  }
  w.pos_embed = ck.get("pos_embed", pos).reshape({pos[1], d});
  w.prefix_tokens = Tensor({prefix, d});
  int64_t row = 0;
  auto put = [&](const std::string& name, int64_t n) {
    Tensor t = tokens(ck, name, n, d);
    std::memcpy(w.prefix_tokens.data() + row * d, t.data(), sizeof(float) * n * d);
    row += n;
  };
  // timm concatenates [cls, reg] (VisionTransformer) or [cls, dist] (distilled DeiT).
  if (c.class_token) put("cls_token", 1);
  if (c.num_distillation_tokens) put("dist_token", 1);
  if (c.num_register_tokens) put("reg_token", c.num_register_tokens);
  // CLIP-style models have no patch-embedding bias.
  w.patch_embed = pack_weight(ck, "patch_embed.proj.weight", {d, C, p, p},
                              ck.has("patch_embed.proj.bias") ? "patch_embed.proj.bias" : "", edge);
  if (c.pre_norm) {
    w.pre_norm_weight = ck.get("norm_pre.weight", {d});
    w.pre_norm_bias = ck.get("norm_pre.bias", {d});
  }
  const int64_t f = c.intermediate_size;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = "blocks." + std::to_string(i) + ".";
    VitLayer layer;
    layer.norm1_weight = ck.get(l + "norm1.weight", {d});
    layer.norm1_bias = ck.get(l + "norm1.bias", {d});
    layer.norm2_weight = ck.get(l + "norm2.weight", {d});
    layer.norm2_bias = ck.get(l + "norm2.bias", {d});
    layer.qkv = pack(ck, l + "attn.qkv.weight", l + "attn.qkv.bias", 3 * d, d, c.qkv_bias, type);
    Tensor ls1, ls2;
    if (c.layer_scale) {
      ls1 = ck.get(l + "ls1.gamma", {d});
      ls2 = ck.get(l + "ls2.gamma", {d});
    }
    layer.attn_out = pack(ck, l + "attn.proj.weight", l + "attn.proj.bias", d, d, true, type,
                          c.layer_scale ? &ls1 : nullptr);
    layer.fc1 = pack(ck, l + "mlp.fc1.weight", l + "mlp.fc1.bias", f, d, true, type);
    layer.fc2 = pack(ck, l + "mlp.fc2.weight", l + "mlp.fc2.bias", d, f, true, type,
                     c.layer_scale ? &ls2 : nullptr);
    w.layers.push_back(std::move(layer));
  }
  if (c.final_norm) {
    w.final_norm_weight = ck.get("norm.weight", {d});
    w.final_norm_bias = ck.get("norm.bias", {d});
  }

  ClassifierWeights& h = m.classifier;
  h.kind = HeadKind::Timm;
  h.timm_pool = pool.empty() ? "none" : pool;
  check(pool != "token" || c.class_token || c.num_distillation_tokens,
        cfg.file + ": global_pool \"token\" needs a class token");
  if (ck.has("fc_norm.weight")) {
    h.fc_norm_weight = ck.get("fc_norm.weight", {d});
    h.fc_norm_bias = ck.get("fc_norm.bias", {d});
  }
  if (ck.has("head.weight")) {
    h.num_labels = ck.dim("head.weight", 0, 2);
    h.head = pack(ck, "head.weight", "head.bias", h.num_labels, d, true, edge);
    if (c.num_distillation_tokens)
      h.head_dist = pack(ck, "head_dist.weight", "head_dist.bias", h.num_labels, d, true, edge);
  }
  m.labels = labels_from(cfg.j, h.num_labels, cfg.file);
}

// ---------------------------------------------------------------- torchvision

void load_torchvision(Model& m, const Config& cfg, Checkpoint& ck, WeightType type) {
  const WeightType edge = edge_layer_type(type);  // patch embedding, pooler, heads
  VitConfig& c = m.encoder.config;
  VitWeights& w = m.encoder;
  m.architecture = "torchvision.VisionTransformer";
  const int64_t size = cfg.positive("image_size");
  c.image_height = c.image_width = size;
  c.patch_size = cfg.positive("patch_size");
  c.num_hidden_layers = cfg.positive("num_layers");
  c.num_attention_heads = cfg.positive("num_heads");
  c.hidden_size = cfg.positive("hidden_dim");
  c.intermediate_size = cfg.positive("mlp_dim");
  c.layer_norm_eps = 1e-6f;
  c.pos_resample = PosResample::None;
  check(c.hidden_size % c.num_attention_heads == 0, cfg.file + ": hidden_dim is not a multiple of num_heads");
  const int64_t d = c.hidden_size, p = c.patch_size, f = c.intermediate_size;
  const int64_t grid = c.grid_height() * c.grid_width();
  // torchvision state dicts may carry a "module." (DataParallel) prefix.
  std::string root = ck.has("class_token") ? "" : "module.";
  w.prefix_tokens = tokens(ck, root + "class_token", 1, d);
  w.pos_embed = tokens(ck, root + "encoder.pos_embedding", grid + 1, d);
  w.patch_embed = pack_weight(ck, root + "conv_proj.weight", {d, 3, p, p}, root + "conv_proj.bias", edge);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = root + "encoder.layers.encoder_layer_" + std::to_string(i) + ".";
    VitLayer layer;
    layer.norm1_weight = ck.get(l + "ln_1.weight", {d});
    layer.norm1_bias = ck.get(l + "ln_1.bias", {d});
    layer.norm2_weight = ck.get(l + "ln_2.weight", {d});
    layer.norm2_bias = ck.get(l + "ln_2.bias", {d});
    layer.qkv = pack(ck, l + "self_attention.in_proj_weight", l + "self_attention.in_proj_bias",
                     3 * d, d, true, type);
    layer.attn_out = pack(ck, l + "self_attention.out_proj.weight",
                          l + "self_attention.out_proj.bias", d, d, true, type);
    // MLPBlock keys: mlp.0 / mlp.3 (torchvision ≥ 0.13) or the legacy linear_1 / linear_2.
    const bool legacy = ck.has(l + "mlp.linear_1.weight");
    const std::string fc1 = l + (legacy ? "mlp.linear_1." : "mlp.0.");
    const std::string fc2 = l + (legacy ? "mlp.linear_2." : "mlp.3.");
    layer.fc1 = pack(ck, fc1 + "weight", fc1 + "bias", f, d, true, type);
    layer.fc2 = pack(ck, fc2 + "weight", fc2 + "bias", d, f, true, type);
    w.layers.push_back(std::move(layer));
  }
  w.final_norm_weight = ck.get(root + "encoder.ln.weight", {d});
  w.final_norm_bias = ck.get(root + "encoder.ln.bias", {d});
  ClassifierWeights& h = m.classifier;
  h.kind = HeadKind::ClassToken;
  int64_t head_in = d;
  if (ck.has(root + "heads.pre_logits.weight")) {
    const int64_t rep = ck.dim(root + "heads.pre_logits.weight", 0, 2);
    h.has_pooler = true;
    h.pooler = pack(ck, root + "heads.pre_logits.weight", root + "heads.pre_logits.bias", rep, d, true, edge);
    head_in = rep;
  }
  h.num_labels = cfg.positive("num_classes");
  h.head = pack(ck, root + "heads.head.weight", root + "heads.head.bias", h.num_labels, head_in, true, edge);
  m.labels = labels_from(cfg.j, h.num_labels, cfg.file);
}

}  // namespace

namespace {

void plan_cache_anchor() {}  // an address in this library, for build_identity

// Models with less checkpoint data than this (TESSERA_CACHE_MIN_MB, default 32) pack in a few
// ms and are not cached.
uintmax_t cache_min_bytes() {
  const char* env = std::getenv("TESSERA_CACHE_MIN_MB");
  char* end = nullptr;
  const double mb = env && *env ? std::strtod(env, &end) : 32.0;
  return static_cast<uintmax_t>(std::max(0.0, end && *end ? 32.0 : mb) * 1024 * 1024);
}

const char* type_name(WeightType t) {
  return t == WeightType::BF16 ? "bf16" : t == WeightType::INT8 ? "int8" : "fp32";
}

// TESSERA_CACHE_DIR ("off", "0" or "" turn the cache off), else $XDG_CACHE_HOME/tessera, else
// $HOME/.cache/tessera; empty when off.
fs::path packed_cache_dir() {
  if (const char* env = std::getenv("TESSERA_CACHE_DIR")) {
    const std::string v = env;
    if (v.empty() || v == "off" || v == "0") return {};
    return v;
  }
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return fs::path(xdg) / "tessera";
  if (const char* home = std::getenv("HOME"); home && *home) return fs::path(home) / ".cache" / "tessera";
  return {};
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// The file this code was loaded from (the tessera library, or the program it is linked into):
// path, size and modification time. A cache is only used by the build that wrote it, since a
// loader that changed what it puts in a piece without changing the piece's size would
// otherwise read a stale one.
std::string build_identity() {
  std::string path;
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&plan_cache_anchor), &info) && info.dli_fname && *info.dli_fname)
    path = info.dli_fname;
  std::error_code ec;
  const fs::path real = fs::canonical(path.empty() ? fs::path("/proc/self/exe") : fs::path(path), ec);
  struct stat st {};
  if (ec || ::stat(real.c_str(), &st) != 0) return "unknown build";
  return real.string() + " " + std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) +
         "." + std::to_string(st.st_mtim.tv_nsec);
}

struct CachePlan {
  fs::path file;    // empty: no cache for this load
  std::string key;  // what the packed weights are made from
  std::string status = "off";
};

// The cache file for (folder, weight type) and the key that must match: the layout version,
// this build, the weight type and every .json and .safetensors file of the folder (name, size,
// mtime).
CachePlan plan_cache(const fs::path& dir, WeightType type) {
  CachePlan plan;
  const fs::path cache_dir = packed_cache_dir();
  if (cache_dir.empty()) return plan;
  std::error_code ec;
  const fs::path real = fs::canonical(dir, ec);
  if (ec) return plan;
  std::vector<std::string> files;
  uintmax_t weight_bytes = 0;
  for (const auto& e : fs::directory_iterator(real, ec)) {
    const std::string ext = e.path().extension().string();
    if ((ext != ".json" && ext != ".safetensors") || !e.is_regular_file(ec)) continue;
    struct stat st {};
    if (::stat(e.path().c_str(), &st) != 0) return plan;
    if (ext == ".safetensors") weight_bytes += static_cast<uintmax_t>(st.st_size);
    files.push_back(e.path().filename().string() + " " + std::to_string(st.st_size) + " " +
                    std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec));
  }
  if (weight_bytes < cache_min_bytes()) {
    plan.status = "small";
    return plan;
  }
  std::sort(files.begin(), files.end());
  static const std::string build = build_identity();
  plan.key = "tessera packed weights, layout " + std::to_string(kPackedLayoutVersion) + ", built by " +
             build + ", " + type_name(type) + ", " + real.string();
  for (const std::string& f : files) plan.key += "\n" + f;
  char name[64];
  std::snprintf(name, sizeof name, "%016llx-%s.tpack",
                static_cast<unsigned long long>(fnv1a(real.string())), type_name(type));
  plan.file = cache_dir / name;
  return plan;
}

// One load: from the cache file when try_cache and it is there, else packing (and saving).
std::shared_ptr<const Model> load_model_once(const fs::path& dir, WeightType weight_type,
                                             const CachePlan& plan, bool try_cache);

}  // namespace

std::shared_ptr<const Model> load_model(const std::string& dir_arg, WeightType weight_type) {
  fs::path dir(dir_arg);
  std::error_code ec;
  if (!fs::exists(dir, ec)) fail(dir_arg + ": no such model folder");
  if (!fs::is_directory(dir, ec)) fail(dir_arg + ": not a folder (a model is a folder with config.json and model.safetensors)");
  fs::path config_path = dir / "config.json";
  if (!fs::exists(config_path, ec)) fail(dir_arg + ": no config.json");
  CachePlan plan = plan_cache(dir, weight_type);
  if (plan.file.empty()) return load_model_once(dir, weight_type, plan, false);
  try {
    return load_model_once(dir, weight_type, plan, true);
  } catch (const WeightArena::CacheMismatch&) {  // made by another build of the loaders: redo it
    return load_model_once(dir, weight_type, plan, false);
  }
}

namespace {

std::shared_ptr<const Model> load_model_once(const fs::path& dir, WeightType weight_type,
                                             const CachePlan& plan, bool try_cache) {
  const std::string dir_arg = dir.string();
  const fs::path config_path = dir / "config.json";
  auto model = std::make_shared<Model>();
  model->dir = dir_arg;
  model->config_json = read_text(config_path);
  Config cfg{parse_json(model->config_json, config_path.string()), config_path.string()};
  check(cfg.j.is_object(), config_path.string() + ": must be a JSON object");

  std::string arch;
  if (cfg.has("architectures") && cfg.j["architectures"].is_array() && !cfg.j["architectures"].empty() &&
      cfg.j["architectures"][0].is_string())
    arch = cfg.j["architectures"][0].get<std::string>();
  Checkpoint ck = open_checkpoint(dir);
  bool replayed = false;
  if (try_cache) {
    try {
      replayed = ck.arena.replay(plan.file.string(), plan.key);
    } catch (const Error&) {  // a damaged cache file: pack, and write it again
    }
  }
  if (cfg.has("architecture") && cfg.has("pretrained_cfg")) {
    model->family = ModelFamily::Timm;
    model->model_type = "timm";
    load_timm(*model, cfg, ck, weight_type);
  } else if (arch == "torchvision.VisionTransformer") {
    model->family = ModelFamily::Torchvision;
    model->model_type = "torchvision";
    load_torchvision(*model, cfg, ck, weight_type);
  } else if (cfg.string("model_type", "") == "segmenter") {
    model->family = ModelFamily::Segmenter;
    model->model_type = "segmenter";
    load_segmenter(*model, cfg, ck, weight_type);
  } else if (cfg.string("model_type", "") == "yolos" || cfg.string("model_type", "") == "vit-detr") {
    model->family = ModelFamily::Detector;
    model->model_type = cfg.string("model_type", "");
    const bool yolos = model->model_type == "yolos";
    model->architecture = !arch.empty() ? arch : yolos ? "YolosForObjectDetection" : "VitDetrForObjectDetection";
    if (yolos) load_yolos(*model, cfg, ck, weight_type);
    else load_vit_detr(*model, cfg, ck, weight_type);
  } else {
    model->family = ModelFamily::HuggingFace;
    model->model_type = cfg.string("model_type", "");
    static const std::set<std::string> hf_types = {"vit", "deit", "dinov2"};
    if (!hf_types.count(model->model_type))
      fail(config_path.string() + ": unknown architecture (model_type \"" + brief_text(model->model_type) +
           "\", architectures [" + brief_text(arch) + "]); supported: Hugging Face vit/deit/dinov2, timm "
           "VisionTransformer (architecture + pretrained_cfg), torchvision.VisionTransformer");
    if (arch.empty())  // a bare base-model config
      arch = model->model_type == "vit" ? "ViTModel" : model->model_type == "deit" ? "DeiTModel" : "Dinov2Model";
    model->architecture = arch;
    load_hf(*model, cfg, ck, weight_type);
  }
  model->parameter_count = ck.parameters;
  model->weight_dtype = ck.st.info(*ck.used.begin()).dtype;
  model->weights_cache = plan.status;
  if (replayed) {
    ck.arena.finish_replay();
    model->weights_cache = "hit";
    model->weights_cache_file = plan.file.string();
  } else if (!plan.file.empty()) {
    try {
      std::error_code mk;
      fs::create_directories(plan.file.parent_path(), mk);
      ck.arena.save(plan.file.string(), plan.key);
      model->weights_cache = "written";
      model->weights_cache_file = plan.file.string();
    } catch (const Error& e) {
      model->weights_cache = std::string("not written: ") + e.what();
      static std::once_flag warned;
      std::call_once(warned, [&] {
        std::fprintf(stderr, "tessera: warning: %s (set TESSERA_CACHE_DIR=off to stop trying)\n", e.what());
      });
    }
  }
  return model;
}

}  // namespace

const Tensor& output(const NamedTensors& outputs, const std::string& name) {
  std::string have;
  for (const auto& [n, t] : outputs) {
    if (n == name) return t;
    have += (have.empty() ? "" : ", ") + n;
  }
  fail("the model has no output '" + name + "' (it has: " + have + ")");
}

namespace {

// rows [B, ld] with row b at ptr + b*stride → head(rows) [B, N]
Tensor apply_linear(const PackedLinear& lin, const float* x, int64_t B, int64_t stride,
                    Activation act = Activation::None) {
  Tensor y({B, lin.out_features});
  linear(x, B, stride, lin, y.data(), lin.out_features, act);
  return y;
}

// Token t of every image: [B, T, D] rows → [B, D].
Tensor token_rows(const float* h, int64_t B, int64_t T, int64_t d, int64_t t) {
  Tensor out({B, d});
  for (int64_t b = 0; b < B; ++b) std::memcpy(out.data() + b * d, h + (b * T + t) * d, sizeof(float) * d);
  return out;
}

// out[b * ld + k] = mean over tokens [first, T) of h[b, t, k] (summed in double).
void mean_tokens(const float* h, int64_t B, int64_t T, int64_t d, int64_t first, float* out, int64_t ld) {
  for (int64_t b = 0; b < B; ++b) {
    const float* hb = h + b * T * d;
    for (int64_t k = 0; k < d; ++k) {
      double s = 0;
      for (int64_t t = first; t < T; ++t) s += hb[t * d + k];
      out[b * ld + k] = static_cast<float>(s / static_cast<double>(T - first));
    }
  }
}

// (a + b) / 2, element-wise: the averaged heads of distilled models.
Tensor average(const Tensor& a, const Tensor& b) {
  Tensor out(a.shape());
  for (int64_t i = 0; i < out.numel(); ++i) out[i] = (a[i] + b[i]) / 2;
  return out;
}

void tanh_in_place(Tensor& t) {
  for (float& v : t.span()) v = std::tanh(v);
}

}  // namespace

NamedTensors model_forward(const Model& m, const Tensor& pixel_values, ModelWorkspace& ws) {
  if (m.segmentation) return segmentation_forward(m, pixel_values, ws);
  if (m.detection) return detection_forward(m, pixel_values, ws);
  const VitConfig& c = m.encoder.config;
  Tensor hidden = vit_forward(m.encoder, pixel_values, ws.vit);
  const int64_t B = hidden.dim(0), T = hidden.dim(1), d = hidden.dim(2);
  const float* h = hidden.data();
  const ClassifierWeights& head = m.classifier;
  NamedTensors out;
  switch (head.kind) {
    case HeadKind::None: {
      out.emplace_back("last_hidden_state", hidden.clone());
      if (m.model_type == "dinov2") {
        out.emplace_back("pooler_output", token_rows(h, B, T, d, 0));
      } else if (head.has_pooler) {
        Tensor pooled = apply_linear(head.pooler, h, B, T * d);
        tanh_in_place(pooled);
        out.emplace_back("pooler_output", pooled);
      }
      break;
    }
    case HeadKind::ClassToken: {
      Tensor logits;
      if (head.has_pooler) {  // torchvision representation layer: tanh(pre_logits(x))
        Tensor pre = apply_linear(head.pooler, h, B, T * d);
        tanh_in_place(pre);
        logits = apply_linear(head.head, pre.data(), B, pre.dim(1));
      } else {
        logits = apply_linear(head.head, h, B, T * d);
      }
      out.emplace_back("logits", logits);
      out.emplace_back("last_hidden_state", hidden.clone());
      break;
    }
    case HeadKind::DeitTeacher: {
      Tensor cls = apply_linear(head.head, h, B, T * d);
      Tensor dist = apply_linear(head.head_dist, h + d, B, T * d);
      out.emplace_back("logits", average(cls, dist));
      out.emplace_back("cls_logits", cls);
      out.emplace_back("distillation_logits", dist);
      out.emplace_back("last_hidden_state", hidden.clone());
      break;
    }
    case HeadKind::Dinov2ClassMean: {
      Tensor pooled({B, 2 * d});  // [class token, mean of the patch tokens]
      for (int64_t b = 0; b < B; ++b) std::memcpy(pooled.data() + b * 2 * d, h + b * T * d, sizeof(float) * d);
      mean_tokens(h, B, T, d, 1, pooled.data() + d, 2 * d);
      out.emplace_back("logits", apply_linear(head.head, pooled.data(), B, 2 * d));
      out.emplace_back("last_hidden_state", hidden.clone());
      break;
    }
    case HeadKind::Timm: {
      // forward_head: pool → fc_norm → (pre_logits) → head; distilled: average of two heads.
      Tensor pre;
      if (head.timm_pool == "avg") {
        pre = Tensor({B, d});
        mean_tokens(h, B, T, d, c.num_prefix_tokens(), pre.data(), d);
      } else if (head.timm_pool == "token") {
        pre = token_rows(h, B, T, d, 0);
      } else {
        fail("timm global_pool '' (no pooling) has no pre-logits vector");
      }
      if (!head.fc_norm_weight.empty())
        layer_norm(pre.data(), B, d, d, head.fc_norm_weight.data(), head.fc_norm_bias.data(),
                   c.layer_norm_eps, pre.data(), d);
      Tensor logits;
      if (c.num_distillation_tokens > 0) {
        Tensor dist_tok = token_rows(h, B, T, d, 1);
        if (head.num_labels)
          logits = average(apply_linear(head.head, pre.data(), B, d),
                           apply_linear(head.head_dist, dist_tok.data(), B, d));
        pre = average(pre, dist_tok);
      } else if (head.num_labels) {
        logits = apply_linear(head.head, pre.data(), B, d);
      }
      out.emplace_back("logits", head.num_labels ? logits : pre.clone());
      out.emplace_back("features", hidden.clone());
      out.emplace_back("pre_logits", pre);
      break;
    }
  }
  return out;
}

}  // namespace tessera
