#pragma once
// The training pass of a Hugging Face YolosForObjectDetection folder (transformers 4.40
// modeling_yolos.py), on vit_train.hpp's encoder pass over one flat weight buffer:
//
//   pixels [B, C, H, W] ──patch embed──► [cls, patches, det tokens] + pos (grid resized bicubically
//   to (H/p, W/p), always) ──L blocks──► final LN of the last `det` tokens h [B·det, D]
//   ──class_labels_classifier: Linear·ReLU·Linear·ReLU·Linear──► logits [B·det, K + 1] (no-object last)
//   ──bbox_predictor: Linear·ReLU·Linear·ReLU·Linear·sigmoid──► boxes [B·det, 4] (cx, cy, w, h)
//
// The loss is set_loss.hpp's Hungarian set loss with the config's costs and coefficients
// (class 1, eos_coefficient, bbox_loss_coefficient, giou_loss_coefficient). With
// use_mid_position_embeddings (yolos-small / base) one more table per block but the last is added
// to that block's output, resampled as the first (vit.encoder.mid_position_embeddings). Not
// supported (an Error on load): auxiliary_loss true (YOLOS has no decoder layers). A model is saved as the
// Hugging Face folder it was read from (save_vit_train_model), which load_model and
// `tessera detect` read unchanged.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tessera/set_loss.hpp"
#include "tessera/vit_train.hpp"

namespace tessera {

// Reads a YolosForObjectDetection folder (config.json + model.safetensors), every tensor checked
// by name and shape. num_labels is the class head's output count minus one (no-object).
VitTrainModel load_yolos_train_model(const std::string& dir);

// A new YolosForObjectDetection of `config` (config.num_detection_tokens > 0; image_height x
// image_width its training size) for `labels` (label i is class id i; COCO category ids are the
// label ids, so id 0 is usually "N/A" for data whose categories start at 1), deterministic for a
// seed: the encoder as make_vit_train_model initialises it (Xavier-uniform matrices, LeCun-normal
// patch projection, 2-D sin-cos position table for the grid), detection tokens truncated
// N(0, 0.02²) as YOLOS, their position rows the grid's sin-cos code of points on a lattice over the
// image (so the queries start apart, each with a region of its own, as anchors; N(0, 0.02²) when
// hidden_size is not a multiple of 4), heads Xavier-uniform with zero biases.
VitTrainModel make_yolos_train_model(const VitConfig& config, const std::vector<std::string>& labels,
                                     uint64_t seed);

// --arch presets at height x width: "yolos-ti" (D 192, 12 layers, 3 heads, MLP 768, patch 16,
// 100 detection tokens, eps 1e-12, as hustvl/yolos-tiny) and "yolos-digits" (for small images of
// a few objects: patch 8, D 128, 6 layers, 4 heads, MLP 384, 20 detection tokens, eps 1e-6).
VitConfig yolos_train_preset(const std::string& arch, int64_t height, int64_t width);
std::vector<std::string> yolos_train_presets();

// preprocessor_config.json of a YolosImageProcessor that resizes every image to exactly
// height x width (bilinear), rescales by 1/255 and normalises with ImageNet's mean and std, no
// padding: what train_detector feeds the model, so inference sees the same pixels.
std::string yolos_preprocessor_json(int64_t height, int64_t width);

// The loss configuration of the model's config.json (YolosConfig's defaults where absent).
SetLossConfig yolos_set_loss_config(const VitTrainModel& model);

// pixel_values [B, C, H, W] (H/p x W/p patches, floored as the convolution) → acts.logits [B·det, K + 1] and
// acts.boxes [B·det, 4] (after the sigmoid), image-major.
void yolos_train_forward(const VitTrainModel& model, const Tensor& pixel_values, VitTrainActivations& acts);
// After yolos_train_forward on the same acts: ADDS dLoss/dweight into grads given dlogits
// [B·det, K + 1] and dboxes [B·det, 4] (the gradient with respect to the boxes after the sigmoid).
void yolos_train_backward(const VitTrainModel& model, VitTrainActivations& acts, const float* dlogits,
                          const float* dboxes, std::span<float> grads);

// Forward, set loss over the batch (one target per image), backward into grads (added). The
// loss's terms and matches go to *detail when given. num_boxes > 0: the box terms' divisor
// (SetLossConfig::num_boxes), else the batch's box count.
double yolos_train_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                                 const std::vector<DetectionTarget>& targets, VitTrainActivations& acts,
                                 std::span<float> grads, SetLossResult* detail = nullptr, double num_boxes = 0);

// One optimiser step on one batch: zero the gradients, yolos_train_loss_and_grad, then
// vit_train_apply_gradients (clipping, SGD or AdamW; label_smoothing is not used). With SGD, lr 1,
// momentum 0, weight decay 0 and clip 0 the weights become exactly w − g.
// TrainStepResult::correct counts the matched queries whose best real class is the target's.
TrainStepResult yolos_train_step(VitTrainModel& model, VitTrainState& state, const Tensor& pixel_values,
                                 const std::vector<DetectionTarget>& targets, const TrainStepOptions& options,
                                 SetLossResult* detail = nullptr);

}  // namespace tessera
