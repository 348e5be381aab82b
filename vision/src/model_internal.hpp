#pragma once
// Shared by the model-folder loaders (model.cpp, and the detection and segmentation heads):
// typed config.json access and strict checkpoint access, each error naming file and field/tensor.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/limits.hpp"
#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"

namespace tessera::detail {

using json = nlohmann::json;

std::string read_text(const std::filesystem::path& path);
json parse_json(const std::string& text, const std::string& file);
// A JSON value for a one-line message (values are at most kMaxJsonDepth deep: see parse_json).
inline std::string brief(const json& v) {
  return brief_text(v.dump(-1, ' ', false, json::error_handler_t::replace));
}

struct Config {
  json j;
  std::string file;

  bool has(const std::string& key) const { return j.contains(key) && !j[key].is_null(); }
  int64_t integer(const std::string& key) const {
    check(has(key), file + ": missing \"" + key + "\"");
    const json& v = j[key];
    // A float must be a whole number that fits int64 (1e300 and nan are not).
    check(v.is_number_integer() || (v.is_number() && std::floor(v.get<double>()) == v.get<double>() &&
                                    std::fabs(v.get<double>()) < 9.0e18),
          file + ": \"" + key + "\" must be an integer, got " + brief(v));
    check(!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX),
          file + ": \"" + key + "\" is too large, got " + brief(v));
    int64_t x = v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(v.get<double>());
    return x;
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    return has(key) ? integer(key) : fallback;
  }
  int64_t positive(const std::string& key) const {
    int64_t x = integer(key);
    check(x > 0, file + ": \"" + key + "\" must be positive, got " + std::to_string(x));
    return x;
  }
  double number(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    check(j[key].is_number(), file + ": \"" + key + "\" must be a number, got " + brief(j[key]));
    return j[key].get<double>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    check(j[key].is_boolean(), file + ": \"" + key + "\" must be true or false, got " + brief(j[key]));
    return j[key].get<bool>();
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    check(j[key].is_string(), file + ": \"" + key + "\" must be a string, got " + brief(j[key]));
    return j[key].get<std::string>();
  }
  // image_size: an int or [h, w].
  std::pair<int64_t, int64_t> size2(const std::string& key) const {
    check(has(key), file + ": missing \"" + key + "\"");
    const json& v = j[key];
    if (v.is_number_integer()) return {v.get<int64_t>(), v.get<int64_t>()};
    if (v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer())
      return {v[0].get<int64_t>(), v[1].get<int64_t>()};
    fail(file + ": \"" + key + "\" must be an integer or [height, width], got " + brief(v));
  }
  Config sub(const std::string& key) const {
    check(has(key) && j[key].is_object(), file + ": \"" + key + "\" must be an object");
    return {j[key], file + " (" + key + ")"};
  }
};

// The checkpoint, with strict typed access: every get names the file, tensor and shapes.
// Tensors are copied (pread) into memory the model owns, and GEMM weights are packed from the
// file a panel at a time into `arena` (pack_weight): a loaded model keeps nothing of the file, so
// no page of its mapping counts in the process's memory, and the mapping goes with the load.
struct Checkpoint {
  SafeTensors st;
  std::string file;
  std::set<std::string> used;
  int64_t parameters = 0;
  WeightArena arena;  // this load's packed weights

  bool has(const std::string& name) const { return st.contains(name); }
  // Checks that NAME exists with SHAPE, and counts it as used.
  void expect(const std::string& name, const Shape& shape) {
    check(st.contains(name), file + ": missing tensor '" + name + "' (expected shape " +
                                 shape_str(shape) + ")");
    const TensorInfo& info = st.info(name);
    if (info.shape != shape)
      fail(info.file + ": tensor '" + name + "' has shape " + shape_str(info.shape) + ", expected " +
           shape_str(shape));
    if (used.insert(name).second) parameters += shape_numel(shape);
  }
  // NAME, checked to have SHAPE, read into memory the model owns (cut from the arena, so the
  // small tensors share its huge pages too).
  Tensor get(const std::string& name, const Shape& shape) {
    expect(name, shape);
    const int64_t n = shape_numel(shape);
    std::shared_ptr<float[]> storage = arena.writable_floats(static_cast<size_t>(n));
    if (n > 0) st.read(name, 0, n, storage.get());
    return Tensor::view(storage.get(), shape, storage);
  }
  const Shape& shape(const std::string& name) const {
    check(st.contains(name), file + ": missing tensor '" + name + "'");
    return st.info(name).shape;
  }
  // Dimension I of NAME's shape, which must have RANK dimensions (a library range error otherwise).
  int64_t dim(const std::string& name, size_t i, size_t rank) const {
    const Shape& s = shape(name);
    check(s.size() == rank, file + ": tensor '" + name + "' must have " + std::to_string(rank) +
                                " dimensions, got shape " + shape_str(s));
    return s[i];
  }
};

Checkpoint open_checkpoint(const std::filesystem::path& dir);

// WEIGHT, checked to have SHAPE (shape[0] outputs, each the product of the rest wide, as a conv
// weight [D, C, p, p] is), and BIAS ("" for none) as one linear layer, packed into ck.arena with
// W read from the file a panel at a time. GAMMA, if given, is a per-output scale folded in
// (layer scale: γ ⊙ (Wx + b)).
PackedLinear pack_weight(Checkpoint& ck, const std::string& weight, const Shape& shape,
                         const std::string& bias, WeightType type, const Tensor* gamma = nullptr);
// y = Wx + b with W [out, in], optionally scaled per output (see pack_weight).
PackedLinear pack(Checkpoint& ck, const std::string& weight, const std::string& bias, int64_t out,
                  int64_t in, bool has_bias, WeightType type, const Tensor* gamma = nullptr);
// Stacks PARTS[i].weight [d, d] (+ PARTS[i].bias [d]) into one [n d, d] layer, in that order.
PackedLinear pack_stacked(Checkpoint& ck, const std::vector<std::string>& parts, int64_t d, bool bias,
                          WeightType type);
// Stacks query, key, value [D, D] (+ biases) named NAME.weight / NAME.bias into one [3D, D].
PackedLinear pack_qkv(Checkpoint& ck, const std::string& q, const std::string& k,
                      const std::string& v, int64_t d, bool bias, WeightType type);
// Loads [1, n, D] (or [n, D]) token parameters as [n, D].
Tensor tokens(Checkpoint& ck, const std::string& name, int64_t n, int64_t d);
// id2label (or timm's label_names) as a list of n names; LABEL_i where missing.
std::vector<std::string> labels_from(const json& cfg, int64_t n, const std::string& file);
// How many PREFIX<i>SUFFIX tensors exist for i = 0, 1, ...
int64_t count_layers(const Checkpoint& ck, const std::string& prefix, const std::string& suffix);

// Hugging Face ViT-style encoder (ViT, DeiT, DINOv2, YOLOS backbones): the VitConfig fields from a
// config.json of model_type vit/deit/dinov2/yolos, and the weights under BASE ("vit.", "" ...).
VitConfig hf_vit_config(const Config& cfg, const std::string& model_type);
void load_hf_encoder(VitWeights& w, Checkpoint& ck, const std::string& base,
                     const std::string& model_type, WeightType type);

// Segmenter (segmenter.cpp): config.json with model_type "segmenter" → m.encoder + m.segmentation;
// its forward gives "logits" [B, n_cls, H, W].
void load_segmenter(Model& m, const Config& cfg, Checkpoint& ck, WeightType type);
NamedTensors segmentation_forward(const Model& m, const Tensor& pixel_values, ModelWorkspace& ws);

// Detectors (yolos.cpp, detr.cpp): set m.encoder, m.detection and m.labels.
void load_yolos(Model& m, const Config& cfg, Checkpoint& ck, WeightType type);
void load_vit_detr(Model& m, const Config& cfg, Checkpoint& ck, WeightType type);
// config.json's optional "post_process" ({"labels_per_query": k >= 1, "nms_iou": t in [0, 1] or
// "soft_nms_sigma": s in [0, 100]}) into the detection head's post (detection.cpp), with a clear
// error naming the file.
void read_post_process(const Config& cfg, DetectionHead& head);
// encoder_window's optional "merge": "mean" (false) or "centre" (true), or an error naming the file.
bool window_merge_centre(const Config& window);

}  // namespace tessera::detail
