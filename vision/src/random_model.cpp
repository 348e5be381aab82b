// Random-weight models of standard shapes, for `tessera bench` without a checkpoint: ViT
// classifiers (vit-ti16 ... vit-l16), YOLOS-Tiny (yolos-ti) and Segmenter ViT-S/16 with its mask
// transformer (segmenter-s). Each fills the same structures its loader fills from a checkpoint
// (model.cpp, yolos.cpp, segmenter.cpp), in the same dtype per layer, so benchmarking one times
// what benchmarking the real model folder would.
#include <map>
#include <random>

#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/model.hpp"
#include "tessera/segmentation.hpp"

namespace tessera {
namespace {

struct Size {
  int64_t hidden, layers, heads, mlp, patch;
};

const std::map<std::string, Size>& vit_sizes() {
  static const std::map<std::string, Size> table = {
      {"vit-ti16", {192, 12, 3, 768, 16}},
      {"vit-s16", {384, 12, 6, 1536, 16}},
      {"vit-b16", {768, 12, 12, 3072, 16}},
      {"vit-l16", {1024, 24, 16, 4096, 16}},
  };
  return table;
}

// Normal random tensors and linear layers, counting the parameters drawn.
struct RandomWeights {
  std::mt19937_64 rng;
  int64_t parameters = 0;

  Tensor tensor(Shape shape, float stddev = 0.02f, float mean = 0) {
    Tensor t(std::move(shape));
    std::normal_distribution<float> dist(mean, stddev);
    for (float& v : t.span()) v = dist(rng);
    parameters += t.numel();
    return t;
  }
  // LayerNorm weight: around 1.
  Tensor norm_weight(int64_t d) { return tensor({d}, 0.02f, 1.0f); }
  PackedLinear linear(int64_t out, int64_t in, WeightType type, bool bias = true) {
    Tensor w = tensor({out, in});
    Tensor b = bias ? tensor({out}) : Tensor();
    return pack_linear(w.data(), bias ? b.data() : nullptr, out, in, type);
  }
  // A pre-norm block (the encoder's VitLayer, also the mask transformer's).
  VitLayer block(int64_t d, int64_t f, WeightType type) {
    VitLayer l;
    l.norm1_weight = norm_weight(d);
    l.norm1_bias = tensor({d});
    l.norm2_weight = norm_weight(d);
    l.norm2_bias = tensor({d});
    l.qkv = linear(3 * d, d, type);
    l.attn_out = linear(d, d, type);
    l.fc1 = linear(f, d, type);
    l.fc2 = linear(d, f, type);
    return l;
  }
};

// The encoder of w.config (class token, detection tokens, one position per token of the
// config's grid): the patch embedding is an edge layer, the blocks take `type` (as load_hf_encoder).
void random_encoder(VitWeights& w, RandomWeights& r, WeightType type) {
  const VitConfig& c = w.config;
  const int64_t d = c.hidden_size, p = c.patch_size;
  const int64_t positions = c.num_prefix_tokens() + c.grid_height() * c.grid_width() + c.num_detection_tokens;
  w.patch_embed = r.linear(d, c.num_channels * p * p, edge_layer_type(type));
  w.prefix_tokens = r.tensor({c.num_prefix_tokens(), d});
  w.pos_embed = r.tensor({positions, d});
  if (c.num_detection_tokens) w.detection_tokens = r.tensor({c.num_detection_tokens, d});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    w.layers.push_back(r.block(d, c.intermediate_size, type));
  w.final_norm_weight = r.norm_weight(d);
  w.final_norm_bias = r.tensor({d});
}

std::vector<std::string> numbered_labels(int64_t n) {
  std::vector<std::string> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back("class_" + std::to_string(i));
  return labels;
}

// ViT classifier with an ImageNet-1k head, trained (position grid) at image_size.
void build_vit(Model& m, const Size& s, int64_t image_size, RandomWeights& r, WeightType type) {
  check(image_size >= s.patch && image_size % s.patch == 0,
        "--image-size must be a multiple of the patch size " + std::to_string(s.patch));
  m.model_type = "vit";
  VitConfig& c = m.encoder.config;
  c.image_height = c.image_width = image_size;
  c.patch_size = s.patch;
  c.hidden_size = s.hidden;
  c.num_hidden_layers = s.layers;
  c.num_attention_heads = s.heads;
  c.intermediate_size = s.mlp;
  c.layer_norm_eps = 1e-12f;
  random_encoder(m.encoder, r, type);
  m.classifier.kind = HeadKind::ClassToken;
  m.classifier.num_labels = 1000;
  m.classifier.head = r.linear(1000, s.hidden, edge_layer_type(type));
  m.labels = numbered_labels(1000);
}

// hustvl/yolos-tiny (transformers YolosConfig as published): hidden 192, 12 layers, 3 heads,
// MLP 768, patch 16, image_size [800, 1333] (a 50x83 position grid, resized to every input),
// 100 detection tokens, use_mid_position_embeddings false, 91 labels (+ "no object"); 3-layer
// class and box MLPs with hidden 192. 6,488,736 parameters.
void build_yolos_tiny(Model& m, RandomWeights& r, WeightType type) {
  m.model_type = "yolos";
  m.family = ModelFamily::Detector;
  VitConfig& c = m.encoder.config;
  c.image_height = 800, c.image_width = 1333;
  c.patch_size = 16;
  c.hidden_size = 192;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 3;
  c.intermediate_size = 768;
  c.layer_norm_eps = 1e-12f;
  c.num_detection_tokens = 100;
  c.pos_resample = PosResample::SizeBicubic;
  random_encoder(m.encoder, r, type);
  auto head = std::make_shared<DetectionHead>();
  head->kind = DetectionKind::Yolos;
  head->num_labels = 91;
  head->num_slots = c.num_detection_tokens;
  const int64_t d = c.hidden_size;
  for (auto [mlp, out] : {std::pair{&head->class_head, head->num_labels + 1}, std::pair{&head->box_head, int64_t{4}}})
    for (int64_t i = 0; i < 3; ++i) mlp->layers.push_back(r.linear(i == 2 ? out : d, d, edge_layer_type(type)));
  m.labels = numbered_labels(head->num_labels);
  m.detection = std::move(head);
}

// Segmenter seg_small_mask on ADE20K (rstrudel/segmenter): ViT-S/16 encoder (d_model 384, 12
// layers, 6 heads, d_ff 1536, LayerNorm eps 1e-5) trained at 512x512, mask transformer decoder
// (2 layers, d_model 384, 6 heads = 384 / 64, d_ff 1536), 150 classes. 26,033,964 parameters
// (the pre-trained ViT's unused ImageNet head not included).
void build_segmenter_small(Model& m, RandomWeights& r, WeightType type) {
  m.model_type = "segmenter";
  m.family = ModelFamily::Segmenter;
  VitConfig& c = m.encoder.config;
  c.image_height = c.image_width = 512;
  c.patch_size = 16;
  c.hidden_size = 384;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 6;
  c.intermediate_size = 1536;
  c.layer_norm_eps = 1e-5f;
  c.pos_resample = PosResample::SizeBilinear;
  random_encoder(m.encoder, r, type);
  auto head = std::make_shared<SegmentationHead>();
  SegmentationHead& h = *head;
  h.decoder = SegmenterDecoder::MaskTransformer;
  h.num_classes = 150;
  h.encoder_dim = c.hidden_size;
  h.num_extra_tokens = c.num_prefix_tokens();
  h.d_model = 384, h.n_heads = 6, h.d_ff = 1536, h.layer_norm_eps = 1e-5f;
  const int64_t dm = h.d_model;
  // The decoder's transformer blocks take the dtype; its projections are edge layers.
  h.proj_dec = r.linear(dm, h.encoder_dim, edge_layer_type(type));
  h.cls_emb = r.tensor({h.num_classes, dm});
  for (int i = 0; i < 2; ++i) h.blocks.push_back(r.block(dm, h.d_ff, type));
  h.decoder_norm_weight = r.norm_weight(dm);
  h.decoder_norm_bias = r.tensor({dm});
  h.proj_patch = r.linear(dm, dm, edge_layer_type(type), false);
  h.proj_classes = r.linear(dm, dm, edge_layer_type(type), false);
  h.mask_norm_weight = r.norm_weight(h.num_classes);
  h.mask_norm_bias = r.tensor({h.num_classes});
  m.labels = numbered_labels(h.num_classes);
  m.segmentation = std::move(head);
}

}  // namespace

std::vector<std::string> random_model_archs() {
  std::vector<std::string> names;
  for (const auto& [name, size] : vit_sizes()) names.push_back(name);
  names.push_back("yolos-ti");
  names.push_back("segmenter-s");
  return names;
}

std::shared_ptr<const Model> random_model(const std::string& arch, int64_t image_size,
                                          WeightType type, uint64_t seed) {
  auto m = std::make_shared<Model>();
  m->architecture = "random:" + arch;
  RandomWeights r{std::mt19937_64(seed)};
  if (auto it = vit_sizes().find(arch); it != vit_sizes().end()) {
    build_vit(*m, it->second, image_size, r, type);
  } else if (arch == "yolos-ti") {
    build_yolos_tiny(*m, r, type);
  } else if (arch == "segmenter-s") {
    build_segmenter_small(*m, r, type);
  } else {
    std::string known;
    for (const auto& n : random_model_archs()) known += (known.empty() ? "" : ", ") + n;
    fail("unknown --arch '" + arch + "' (known: " + known + ")");
  }
  m->parameter_count = r.parameters;
  m->weight_dtype = "random";
  return m;
}

}  // namespace tessera
