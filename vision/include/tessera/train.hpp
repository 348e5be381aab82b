#pragma once
// Training a small ViT on the CPU, in plain C++ (llm.c style): every weight lives in one
// contiguous buffer (VitParams points into it), a parallel buffer of the same layout holds the
// gradients, and each layer is a *_forward / *_backward pair of plain functions. The model is
// exactly Hugging Face's ViTForImageClassification (pre-norm blocks, exact-erf GELU, class token,
// learned position embeddings), so it exports to a standard model folder that load_model reads.
//
// The math is templated on the scalar type: float for training, double for the gradient check.
//
//   pixels [n, C, S, S] ──im2col──► patches [n·N, C·p·p] ──linear──► [n·N, D]
//   ──(class token, + position embedding)──► x₀ [n·T, D]          (T = 1 + N)
//   ──L × { x += attn_out(attention(qkv(LN₁ x)));  x += fc2(gelu(fc1(LN₂ x))) }──►
//   ──final LN of the class token──► classifier ──► logits [n, K] ──► softmax cross-entropy
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <opencv2/core.hpp>

#include "tessera/preprocess.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

// The architecture (names follow the Hugging Face ViT config it exports to).
struct TrainVitConfig {
  int64_t image_size = 20;  // square inputs, image_size x image_size
  int64_t patch_size = 4;
  int64_t num_channels = 3;
  int64_t hidden_size = 64;
  int64_t num_hidden_layers = 4;
  int64_t num_attention_heads = 4;
  int64_t intermediate_size = 256;
  int64_t num_labels = 10;
  float layer_norm_eps = 1e-6f;

  int64_t grid() const { return image_size / patch_size; }
  int64_t num_patches() const { return grid() * grid(); }
  int64_t tokens() const { return 1 + num_patches(); }  // class token + patches
  int64_t patch_dim() const { return num_channels * patch_size * patch_size; }
  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  void validate() const;  // Error naming the first field that does not fit
};

// One parameter tensor's place in the flat buffer (the trainer's own names; the export maps them
// to Hugging Face's).
struct ParamTensor {
  std::string name;  // "patch_embed.weight", "layers.3.qkv.weight", "classifier.bias", ...
  Shape shape;
  int64_t offset = 0;  // in elements from the start of the buffer
  bool decay = false;  // AdamW weight decay applies (matrices), or not (biases, norms, tokens)
};

std::vector<ParamTensor> param_layout(const TrainVitConfig& config);  // in buffer order
int64_t param_count(const TrainVitConfig& config);

template <typename R>
struct VitLayerParams {
  R* norm1_w;     // [D]        layernorm_before
  R* norm1_b;     // [D]
  R* qkv_w;       // [3D, D]    query, key, value rows stacked
  R* qkv_b;       // [3D]
  R* attn_out_w;  // [D, D]     attention.output.dense
  R* attn_out_b;  // [D]
  R* norm2_w;     // [D]        layernorm_after
  R* norm2_b;     // [D]
  R* fc1_w;       // [F, D]     intermediate.dense
  R* fc1_b;       // [F]
  R* fc2_w;       // [D, F]     output.dense
  R* fc2_b;       // [D]
};

// Pointers into one flat buffer of param_count(config) elements (weights or their gradients).
template <typename R>
struct VitParams {
  R* patch_w;    // [D, C·p·p]  the patch convolution as a matrix over im2col'd patches
  R* patch_b;    // [D]
  R* cls_token;  // [D]
  R* pos_embed;  // [T, D]
  std::vector<VitLayerParams<R>> layers;
  R* norm_w;  // [D]  final layernorm
  R* norm_b;  // [D]
  R* head_w;  // [K, D]  classifier
  R* head_b;  // [K]
};

template <typename R>
VitParams<R> bind_params(const TrainVitConfig& config, R* buffer);

// The original (JAX) ViT's initialisation: linear weights Xavier-uniform, patch projection
// LeCun-normal, position embedding MAE's 2-D sin-cos table, class token and classifier 0, biases
// 0, norms 1.
// Deterministic for a seed.
template <typename R>
void init_params(const TrainVitConfig& config, R* buffer, uint64_t seed);

// Everything the forward caches for the backward, and the backward's scratch, for n samples.
template <typename R>
struct VitActivations {
  int64_t n = 0;
  std::vector<R> patches, patch_out;                       // [n·N, C·p·p], [n·N, D]
  std::vector<R> x;                                        // (L+1) × [n·T, D] residual stream
  std::vector<R> ln1, ln1_mean, ln1_rstd;                  // L × [n·T, D], L × [n·T]
  std::vector<R> qkv, att, ctx, x_mid;                     // L × [n·T, 3D], [n, H, T, T], [n·T, D], [n·T, D]
  std::vector<R> ln2, ln2_mean, ln2_rstd;                  // L × [n·T, D], L × [n·T]
  std::vector<R> fc1, gelu;                                // L × [n·T, F] before / after GELU
  std::vector<R> cls, norm_out, norm_mean, norm_rstd;      // [n, D] ×2, [n] ×2
  std::vector<R> logits;                                   // [n, K]
  // backward scratch
  std::vector<R> dx, dln, dqkv, dctx, dfc1, dgelu, dcls, dnorm_out, dpatch_out, dlogits, row;

  void resize(const TrainVitConfig& config, int64_t samples);
};

// pixels [n, C, S, S] → acts.logits [n, K], caching activations.
template <typename R>
void vit_train_forward(const TrainVitConfig& config, const VitParams<R>& params, const R* pixels,
                       int64_t n, VitActivations<R>& acts);

// Given dlogits [n, K] (dLoss/dlogits of the forward just run), ADDS dLoss/dparam into grads.
template <typename R>
void vit_train_backward(const TrainVitConfig& config, const VitParams<R>& params,
                        const VitParams<R>& grads, VitActivations<R>& acts, const R* dlogits);

// loss_i = logsumexp(logits_i) − logits_i[y_i]; dlogits_i = scale · (softmax(logits_i) − onehot(y_i)).
// Returns Σ_i loss_i over the n rows; counts the rows whose argmax is the label into *correct.
template <typename R>
double softmax_cross_entropy(const R* logits, const int64_t* labels, int64_t n, int64_t classes,
                             R scale, R* dlogits, int64_t* correct = nullptr);

// ---------------------------------------------------------------------------------------------
// The training loop (float).

// Deterministic random numbers (splitmix64), the same on every platform and standard library.
struct TrainRng {
  uint64_t state;
  explicit TrainRng(uint64_t seed) : state(seed) {}
  uint64_t next();
  double uniform();                                   // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  double normal();                                    // N(0, 1), Box-Muller
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};
// A seed for item `index` of stream `stream` derived from `seed` (independent streams per sample).
uint64_t mix_seed(uint64_t seed, uint64_t stream, uint64_t index);

struct TrainOptions {
  int64_t epochs = 30;
  int64_t batch_size = 64;
  float learning_rate = 2e-3f;  // peak, after a linear warmup; cosine decay to min_lr_ratio·peak
  float min_lr_ratio = 0.02f;
  float warmup_epochs = 2;
  float weight_decay = 0.05f;  // AdamW, decoupled, on matrices only
  float beta1 = 0.9f, beta2 = 0.999f, adam_eps = 1e-8f;
  uint64_t seed = 1;
  // The minibatch is cut into this many fixed slices; each slice's gradient goes to its own
  // buffer and the buffers are summed in slice order, so a run is bit-for-bit the same for any
  // thread count.
  int64_t grad_slices = 8;
  bool augment = true;
};

// Images (8-bit, 1 or 3 channels; gray is replicated to RGB as an image file would be) and labels.
struct LabeledImages {
  std::vector<cv::Mat> images;
  std::vector<int64_t> labels;
  size_t size() const { return images.size(); }
};

// A random affine warp (±2 px shift, ±12° rotation, ±10% scale, small shear), sometimes a slight
// blur, and a random contrast, on an 8-bit image: what a digit cut out of a photo or a drawing
// might look like. Deterministic for a seed.
cv::Mat augment_digit(const cv::Mat& image, uint64_t seed);

// The pixel tensor the model folder's processor makes of an 8-bit image ([C, S, S] at out).
void image_to_pixels(const cv::Mat& image, const PreprocessConfig& pre, float* out);

struct EpochStats {
  double loss = 0;      // mean training loss over the epoch (augmented samples)
  double accuracy = 0;  // training accuracy over the epoch (augmented samples)
  double learning_rate = 0;  // at the epoch's last step
  int64_t steps = 0;
};

class VitTrainer {
 public:
  // pre: the processor that the exported folder declares; every training and evaluation image
  // goes through it, as it would at inference.
  VitTrainer(const TrainVitConfig& config, const TrainOptions& options, const PreprocessConfig& pre);

  // One pass over `data` in a seeded random order (the last partial batch is dropped).
  EpochStats train_epoch(const LabeledImages& data, int64_t epoch);
  // Logits [N, K] of the images, no augmentation.
  Tensor logits(const std::vector<cv::Mat>& images) const;
  double accuracy(const LabeledImages& data) const;
  // Learning rate at optimizer step `step` of `total` steps.
  double learning_rate(int64_t step, int64_t total) const;

  const TrainVitConfig& config() const { return config_; }
  const PreprocessConfig& preprocess_config() const { return pre_; }
  std::span<const float> parameters() const { return params_; }
  std::span<float> parameters() { return params_; }

 private:
  TrainVitConfig config_;
  TrainOptions options_;
  PreprocessConfig pre_;
  std::vector<float> params_, grads_, adam_m_, adam_v_;
  std::vector<std::vector<float>> slice_grads_;
  std::vector<VitActivations<float>> slice_acts_;
  int64_t step_ = 0;
};

// ---------------------------------------------------------------------------------------------
// OpenCV's handwritten digits (samples/data/digits.png): 5000 cells of 20x20, white on black,
// 50 rows x 100 columns; row r holds digit r / 5.
LabeledImages load_opencv_digits(const std::string& png_path);
// A stratified split: for each class, a seeded shuffle, the first test_fraction go to `second`.
std::pair<LabeledImages, LabeledImages> split_stratified(const LabeledImages& data,
                                                         double test_fraction, uint64_t seed);

// ---------------------------------------------------------------------------------------------
// Export to a Hugging Face ViTForImageClassification folder.

std::string hf_vit_config_json(const TrainVitConfig& config, const std::vector<std::string>& labels);
// ViTImageProcessor: resize to image_size (bilinear), rescale 1/255, normalize mean = std = 0.5.
std::string hf_vit_preprocessor_json(const TrainVitConfig& config);
// The weights under Hugging Face's names and shapes (query/key/value split, patch weight [D,C,p,p]).
std::vector<std::pair<std::string, Tensor>> hf_vit_tensors(const TrainVitConfig& config,
                                                           std::span<const float> params);
// Writes config.json, model.safetensors and preprocessor_config.json into the folder `dir`.
void write_hf_vit(const std::string& dir, const TrainVitConfig& config,
                  std::span<const float> params, const std::vector<std::string>& labels);
// Replaces the folder `to` by the folder `from` (a sibling): renames, so `to` is never half written.
void replace_folder(const std::string& from, const std::string& to);

}  // namespace tessera
