// Export of the trained ViT as a standard Hugging Face ViTForImageClassification folder: the
// weights under transformers' names and shapes, config.json, and the ViTImageProcessor that the
// training images went through.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "tessera/error.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/train.hpp"

namespace fs = std::filesystem;

namespace tessera {

namespace {

// The double that prints as the float's shortest form (1e-06, not 9.999999974752427e-07).
double shortest(float x) {
  char buf[32];
  for (int digits = 1; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(x));
    if (std::strtof(buf, nullptr) == x) break;
  }
  return std::strtod(buf, nullptr);
}

}  // namespace

std::string hf_vit_config_json(const TrainVitConfig& c, const std::vector<std::string>& labels) {
  c.validate();
  check(static_cast<int64_t>(labels.size()) == c.num_labels,
        "train: " + std::to_string(labels.size()) + " label names for " + std::to_string(c.num_labels) + " labels");
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object(), label2id = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) {
    id2label[std::to_string(i)] = labels[i];
    label2id[labels[i]] = i;
  }
  nlohmann::ordered_json j = {
      {"architectures", {"ViTForImageClassification"}},
      {"model_type", "vit"},
      {"image_size", c.image_size},
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
      {"qkv_bias", true},
      {"encoder_stride", c.patch_size},
      {"id2label", id2label},
      {"label2id", label2id},
      {"problem_type", "single_label_classification"},
      {"torch_dtype", "float32"},
  };
  return j.dump(2) + "\n";
}

std::string hf_vit_preprocessor_json(const TrainVitConfig& c) {
  nlohmann::ordered_json j = {
      {"image_processor_type", "ViTImageProcessor"},
      {"do_resize", true},
      {"size", {{"height", c.image_size}, {"width", c.image_size}}},
      {"resample", 2},  // PIL.Image.BILINEAR
      {"do_rescale", true},
      {"rescale_factor", 1.0 / 255.0},
      {"do_normalize", true},
      {"image_mean", {0.5, 0.5, 0.5}},
      {"image_std", {0.5, 0.5, 0.5}},
  };
  return j.dump(2) + "\n";
}

std::vector<std::pair<std::string, Tensor>> hf_vit_tensors(const TrainVitConfig& c, std::span<const float> params) {
  check(static_cast<int64_t>(params.size()) == param_count(c),
        "train: " + std::to_string(params.size()) + " parameters, the config needs " + std::to_string(param_count(c)));
  const int64_t D = c.hidden_size;
  std::vector<std::pair<std::string, Tensor>> out;
  auto put = [&](const std::string& name, Shape shape, const float* src) {
    Tensor t(shape);
    std::copy(src, src + t.numel(), t.data());
    out.emplace_back(name, t);
  };
  for (const ParamTensor& t : param_layout(c)) {
    const float* p = params.data() + t.offset;
    const std::string& n = t.name;
    if (n == "patch_embed.weight") {
      put("vit.embeddings.patch_embeddings.projection.weight", {D, c.num_channels, c.patch_size, c.patch_size}, p);
    } else if (n == "patch_embed.bias") {
      put("vit.embeddings.patch_embeddings.projection.bias", {D}, p);
    } else if (n == "cls_token") {
      put("vit.embeddings.cls_token", {1, 1, D}, p);
    } else if (n == "position_embeddings") {
      put("vit.embeddings.position_embeddings", {1, c.tokens(), D}, p);
    } else if (n == "norm.weight" || n == "norm.bias") {
      put("vit.layernorm." + n.substr(5), {D}, p);
    } else if (n.starts_with("classifier.")) {
      put(n, t.shape, p);
    } else if (n.starts_with("layers.")) {
      const size_t dot = n.find('.', 7);
      const std::string layer = "vit.encoder.layer." + n.substr(7, dot - 7) + ".";
      const std::string rest = n.substr(dot + 1);  // e.g. "qkv.weight"
      const bool weight = rest.ends_with(".weight");
      const std::string kind = weight ? "weight" : "bias";
      if (rest.starts_with("qkv.")) {
        // Rows [0, D) are the query, [D, 2D) the key, [2D, 3D) the value.
        const char* parts[3] = {"query", "key", "value"};
        for (int i = 0; i < 3; ++i)
          put(layer + "attention.attention." + parts[i] + "." + kind, weight ? Shape{D, D} : Shape{D},
              p + i * D * (weight ? D : 1));
      } else {
        static const std::map<std::string, std::string> names = {
            {"norm1", "layernorm_before"}, {"attn_out", "attention.output.dense"},
            {"norm2", "layernorm_after"},  {"fc1", "intermediate.dense"},
            {"fc2", "output.dense"}};
        const std::string module = rest.substr(0, rest.find('.'));
        put(layer + names.at(module) + "." + kind, t.shape, p);
      }
    } else {
      fail("train: no Hugging Face name for parameter '" + n + "'");
    }
  }
  return out;
}

namespace {

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  check(static_cast<bool>(f), path.string() + ": cannot write");
}

}  // namespace

void write_hf_vit(const std::string& dir, const TrainVitConfig& config, std::span<const float> params,
                  const std::vector<std::string>& labels) {
  const fs::path d(dir);
  write_text(d / "config.json", hf_vit_config_json(config, labels));
  write_text(d / "preprocessor_config.json", hf_vit_preprocessor_json(config));
  save_safetensors((d / "model.safetensors").string(), hf_vit_tensors(config, params), {{"format", "pt"}});
}

void replace_folder(const std::string& from, const std::string& to) {
  std::error_code ec;
  if (!fs::exists(to, ec)) {
    fs::rename(from, to, ec);
    check(!ec, "cannot rename " + from + " to " + to + ": " + ec.message());
    return;
  }
  check(fs::is_directory(to, ec), to + ": exists and is not a folder");
  const std::string old = to + ".old-" + std::to_string(::getpid());
  fs::rename(to, old, ec);
  check(!ec, "cannot move the old " + to + " aside: " + ec.message());
  fs::rename(from, to, ec);
  if (ec) {
    std::error_code ignored;
    fs::rename(old, to, ignored);  // put the old one back
    fail("cannot rename " + from + " to " + to + ": " + ec.message());
  }
  fs::remove_all(old, ec);
}

}  // namespace tessera
