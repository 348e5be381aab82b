// Random-weight ViTs of the standard sizes, for `tessera bench` without a checkpoint.
#include <map>
#include <random>

#include "tessera/error.hpp"
#include "tessera/model.hpp"

namespace tessera {
namespace {

struct Size {
  int64_t hidden, layers, heads, mlp, patch;
};

const std::map<std::string, Size>& sizes() {
  static const std::map<std::string, Size> table = {
      {"vit-ti16", {192, 12, 3, 768, 16}},
      {"vit-s16", {384, 12, 6, 1536, 16}},
      {"vit-b16", {768, 12, 12, 3072, 16}},
      {"vit-l16", {1024, 24, 16, 4096, 16}},
  };
  return table;
}

Tensor random_tensor(Shape shape, std::mt19937_64& rng, float stddev, float mean = 0) {
  Tensor t(std::move(shape));
  std::normal_distribution<float> dist(mean, stddev);
  for (float& v : t.span()) v = dist(rng);
  return t;
}

PackedLinear random_linear(int64_t out, int64_t in, std::mt19937_64& rng, WeightType type) {
  Tensor w = random_tensor({out, in}, rng, 0.02f), b = random_tensor({out}, rng, 0.02f);
  return pack_linear(w.data(), b.data(), out, in, type);
}

}  // namespace

std::vector<std::string> random_model_archs() {
  std::vector<std::string> names;
  for (const auto& [name, size] : sizes()) names.push_back(name);
  return names;
}

std::shared_ptr<const Model> random_model(const std::string& arch, int64_t image_size,
                                          WeightType type, uint64_t seed) {
  auto it = sizes().find(arch);
  if (it == sizes().end()) {
    std::string known;
    for (const auto& n : random_model_archs()) known += (known.empty() ? "" : ", ") + n;
    fail("unknown --arch '" + arch + "' (known: " + known + ")");
  }
  const Size& s = it->second;
  check(image_size >= s.patch && image_size % s.patch == 0,
        "--image-size must be a multiple of the patch size " + std::to_string(s.patch));
  std::mt19937_64 rng(seed);
  auto m = std::make_shared<Model>();
  m->architecture = "random:" + arch;
  m->model_type = "vit";
  VitConfig& c = m->encoder.config;
  c.image_height = c.image_width = image_size;
  c.patch_size = s.patch;
  c.hidden_size = s.hidden;
  c.num_hidden_layers = s.layers;
  c.num_attention_heads = s.heads;
  c.intermediate_size = s.mlp;
  c.layer_norm_eps = 1e-12f;
  const int64_t d = s.hidden, grid = (image_size / s.patch) * (image_size / s.patch);
  VitWeights& w = m->encoder;
  w.patch_embed = random_linear(d, 3 * s.patch * s.patch, rng, edge_layer_type(type));
  w.prefix_tokens = random_tensor({1, d}, rng, 0.02f);
  w.pos_embed = random_tensor({grid + 1, d}, rng, 0.02f);
  for (int64_t i = 0; i < s.layers; ++i) {
    VitLayer l;
    l.norm1_weight = random_tensor({d}, rng, 0.02f, 1.0f);
    l.norm1_bias = random_tensor({d}, rng, 0.02f);
    l.norm2_weight = random_tensor({d}, rng, 0.02f, 1.0f);
    l.norm2_bias = random_tensor({d}, rng, 0.02f);
    l.qkv = random_linear(3 * d, d, rng, type);
    l.attn_out = random_linear(d, d, rng, type);
    l.fc1 = random_linear(s.mlp, d, rng, type);
    l.fc2 = random_linear(d, s.mlp, rng, type);
    w.layers.push_back(std::move(l));
  }
  w.final_norm_weight = random_tensor({d}, rng, 0.02f, 1.0f);
  w.final_norm_bias = random_tensor({d}, rng, 0.02f);
  m->classifier.kind = HeadKind::ClassToken;
  m->classifier.num_labels = 1000;
  m->classifier.head = random_linear(1000, d, rng, edge_layer_type(type));
  for (int i = 0; i < 1000; ++i) m->labels.push_back("class_" + std::to_string(i));
  m->parameter_count = d * (3 * s.patch * s.patch + 1) + (grid + 2) * d +
                       s.layers * (4 * d + 4 * d * d + 4 * d + 2 * d * s.mlp + s.mlp + d) + 2 * d +
                       1000 * (d + 1);
  m->weight_dtype = "random";
  return m;
}

}  // namespace tessera
