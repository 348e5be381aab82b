#pragma once
// What the training passes share inside the library (vit_train.cpp, yolos_train.cpp).
#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/gemm.hpp"
#include "tessera/set_loss.hpp"
#include "tessera/vit_train.hpp"

namespace tessera::detail {

// One pre-norm transformer block as HF ViTLayer / timm Block compute it (Segmenter's encoder and
// mask-transformer decoder blocks too), on B images of T tokens of width dim:
//   x_mid = x + attn_out(attention(qkv(LN₁ x)));  next = x_mid + fc2(gelu(fc1(LN₂ x_mid)))
// (with DINOv2's layer scale λ₁, λ₂ on the branches when lw.ls1 / ls2 are set).
struct BlockDims {
  int64_t batch, tokens, dim, mlp, heads;
  float eps;
  bool swiglu = false;  // DINOv2's SwiGLU MLP: fc1 gives [a, b] of `mlp` each, silu(a)·b into fc2
  bool quick_gelu = false;  // CLIP's x·σ(1.702x) instead of exact GELU
};
// a.x holds the input; every other field of `a` is written (sized by the caller); the output
// goes to `next` [B·T, dim].
void vit_block_forward(const VitTrainLayerView& lw, const BlockDims& s, VitTrainActivations::Layer& a, float* next);
// scratch.dx holds dL/dnext on entry and dL/dx on exit; the block's gradients are ADDED into lg.
// Uses scratch.da, dh, dln, dctx, dqkv (and dz with layer scale), sized for the block.
void vit_block_backward(const VitTrainLayerView& lw, const VitTrainLayerView& lg, const BlockDims& s,
                        VitTrainActivations::Layer& a, VitTrainActivations& scratch);

// The checkpoint names and shapes, in buffer order, of an encoder of `c` under `base` ("vit.")
// with its head: the classifier of num_labels classes, or with c.num_detection_tokens > 0 the
// YOLOS detection tokens and heads (num_labels + 1 class outputs).
// mask_token: DINOv2's (unused by the pass, kept so that a folder is written back whole).
std::vector<TrainParam> vit_train_params(const VitConfig& c, const std::string& base, int64_t num_labels,
                                         bool mask_token = false);

// One tensor of a fused-qkv checkpoint layout (timm, Segmenter) and the Hugging Face-named
// training parameters whose concatenation in buffer order it is (attn.qkv = query, key, value).
struct NameMap {
  std::string name;
  Shape shape;
  std::vector<std::string> parts;
};

// timm's VisionTransformer names of `m`'s encoder under `prefix` ("" for timm, "encoder." for
// Segmenter): patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
// mlp.fc1, mlp.fc2}, norm; then its classifier [num_labels, D] as `head`.weight / .bias. For an
// encoder with a class token only (no distillation, register or detection tokens), no LayerScale.
std::vector<NameMap> timm_style_names(const VitTrainModel& m, const std::string& prefix, const std::string& head);

// torchvision's VisionTransformer names of `m` (conv_proj, class_token, encoder.pos_embedding,
// encoder.layers.encoder_layer_N.{ln_1, self_attention.in_proj_*, self_attention.out_proj, ln_2,
// mlp.0 / mlp.3}, encoder.ln, heads.head) under `root` ("" or DataParallel's "module."), with the
// legacy mlp.linear_1 / linear_2 keys when `legacy_mlp`.
std::vector<NameMap> torchvision_names(const VitTrainModel& m, const std::string& root = "", bool legacy_mlp = false);

// The buffer offset of a mapped tensor, whose parts must be adjacent in the buffer (an Error
// naming `what` otherwise).
int64_t mapped_offset(const VitTrainModel& m, const NameMap& n, const std::string& what);

// The double that prints as the float's shortest form (1e-06, not 9.999999974752427e-07).
double shortest(float x);

// config.json of a new Hugging Face encoder model, in transformers' key order: architectures,
// model_type, image_size, the encoder's fields (patch_size … qkv_bias), then `head` (the model's
// own fields), id2label / label2id of `labels`, `tail`, torch_dtype float32.
nlohmann::ordered_json hf_train_config(const VitConfig& c, const std::string& architecture,
                                       const std::string& model_type, const nlohmann::ordered_json& image_size,
                                       const std::vector<std::string>& labels, const nlohmann::ordered_json& head,
                                       const nlohmann::ordered_json& tail = nlohmann::ordered_json::object());

// What the detection heads share: a processor of `type` (YolosImageProcessor, DetrImageProcessor)
// that resizes every image to exactly height x width (bilinear), rescales, normalises with
// ImageNet's mean and std, no padding; and the set-loss configuration a config.json gives
// (DetrConfig / YolosConfig defaults where absent; the class loss weighs 1 in both).
std::string fixed_size_detection_processor_json(const std::string& type, int64_t height, int64_t width);
SetLossConfig set_loss_config_from(const std::string& config_json);

// The matched queries (the model's output, matches' last layer) whose best real class (no-object
// excluded) is their target's; logits [B·slots, K + 1].
inline int64_t matched_correct(const SetLossResult& r, const float* logits, int64_t slots, int64_t k1,
                               const std::vector<DetectionTarget>& targets) {
  int64_t correct = 0;
  for (size_t b = 0; b < r.layers.back().matches.size(); ++b)
    for (const auto& [q, t] : r.layers.back().matches[b]) {
      const float* row = logits + (static_cast<int64_t>(b) * slots + q) * k1;
      correct += std::max_element(row, row + k1 - 1) - row == targets[b].labels[static_cast<size_t>(t)];
    }
  return correct;
}

// W [N,K] and b packed into this thread's training buffer, which is reused from one call to the
// next (no new pages every layer of every step): the result is valid until the thread's next
// train_pack, so it is packed right where it is used. Not for use inside a parallel region.
inline PackedLinear train_pack(const float* w, const float* b, int64_t N, int64_t K) {
  thread_local ScratchFloats buffer;
  return pack_linear(w, b, N, K, buffer.get(pack_linear_buffer_floats(N, K)), training_gemm_type());
}

// y[M,N] = x[M,K]·W[N,K]ᵀ + b, packed per call (the weights change every step).
inline void train_linear(const float* x, int64_t M, const float* w, const float* b, int64_t N, int64_t K, float* y) {
  const PackedLinear packed = train_pack(w, b, N, K);
  linear(x, M, K, packed, y, N);
}
inline void relu_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}
// dy ← dy ⊙ [y > 0] (y the ReLU's output).
inline void relu_backward(const float* y, float* dy, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!(y[i] > 0.0f)) dy[i] = 0.0f;
}

// A model's parameters laid out anew (the same order, offsets recomputed) where fine-tuning
// replaces some tensors (replace_detection_labels, replace_segmentation_classes,
// resize_position_table): `renew(p)` may change p's shape and returns whether p is replaced; a
// replaced tensor is filled by `fill(p, its values)` (zeros before), every other keeps its values.
inline void relayout_params(VitTrainModel& m, const std::function<bool(TrainParam&)>& renew,
                            const std::function<void(const TrainParam&, float*)>& fill) {
  std::vector<TrainParam> params = m.params;
  std::vector<bool> replaced(params.size());
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    replaced[i] = renew(params[i]);
    params[i].offset = offset;
    offset += params[i].numel();
  }
  std::vector<float> weights(static_cast<size_t>(offset), 0.0f);
  for (size_t i = 0; i < params.size(); ++i) {
    float* to = weights.data() + params[i].offset;
    if (replaced[i])
      fill(params[i], to);
    else
      std::copy_n(m.weights.data() + m.params[i].offset, params[i].numel(), to);
  }
  m.params = std::move(params);
  m.weights = std::move(weights);
}

}  // namespace tessera::detail
