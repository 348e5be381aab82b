#pragma once
// The training pass of Tessera's ViT + DETR decoder detector ("vit-detr" folders, detr.cpp's
// forward: Hugging Face ViTModel + transformers 4.36 DetrDecoder and heads), on vit_train.hpp's
// encoder pass and one flat weight buffer:
//
//   pixels ──ViT encoder (vit_train_encoder_forward)──► final LN ──drop the prefix tokens──►
//   patch rows [B·N, denc] ──input_projection──► memory [B·N, D] (+ DETR's 2-D sine code for keys)
//   queries x₀ = 0 [B·Q, D], query_pos [Q, D] ──L × { x = LN(x + self_attn(q,k: x + qpos; v: x));
//       x = LN(x + cross_attn(q: x + qpos; k: memory + sine; v: memory)); x = LN(x + fc2(relu(fc1 x))) }
//   ──decoder LN──► class_labels_classifier (D → K + 1) and bbox_predictor (3-layer ReLU MLP, sigmoid)
//
// With auxiliary_loss (DetrConfig), as transformers' DetrDecoder: the decoder LN runs after every
// layer (its output is the next layer's input and the auxiliary heads' input) and once more at the
// end; the set loss (set_loss.hpp) is the sum over every layer's heads, each matched on its own.
// Parameters carry the folder's own names (vit.…, input_projection.…, model.decoder.layers.N.…,
// class_labels_classifier.…, bbox_predictor.layers.N.…), so save_vit_train_model writes a folder
// that load_model and `tessera detect` read unchanged.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tessera/set_loss.hpp"
#include "tessera/vit_train.hpp"

namespace tessera {

// Reads a vit-detr folder (config.json with a ViT, DeiT or DINOv2 backbone_config, model.safetensors);
// every tensor checked by name and shape. Anything training does not support is an Error naming it.
VitTrainModel load_detr_train_model(const std::string& dir);

// The DETR head's size for a new model: d_model, queries, decoder layers, heads, FFN.
struct DetrHeadConfig {
  int64_t d_model = 128, queries = 20, layers = 3, heads = 4, ffn = 256;
  bool auxiliary_loss = true;
  // > 0: the encoder reads window x window crops every window_stride pixels (DetrHeadShape::window);
  // detr_from_vit then keeps the encoder at the window's size.
  int64_t window = 0, window_stride = 0;
  bool window_centre = false;  // merge the windows' rows by a centre-weighted mean (merge_windows)
};

// A new vit-detr model: the encoder of `encoder` as make_vit_train_model initialises it (seed),
// then the head: matrices Xavier-uniform (as DETR's transformer), biases 0, norms 1, query
// position embeddings N(0, 1) (nn.Embedding's default, as DETR), for `labels` (label i is class id
// i; COCO category ids are the label ids). Its config.json is a vit-detr one with DetrConfig's loss
// fields (costs 1/5/2, coefficients 5/2, eos 0.1).
VitTrainModel make_detr_train_model(const VitConfig& encoder, const DetrHeadConfig& head,
                                    const std::vector<std::string>& labels, uint64_t seed);

// The same head on a pre-trained ViT / DeiT classifier (load_vit_train_model, Hugging Face layout,
// no distillation token) at height x width: the encoder's weights kept (the classifier dropped;
// the position table resized to the new grid, or with head.window to the window's), the head new.
VitTrainModel detr_from_vit(const VitTrainModel& vit, const DetrHeadConfig& head,
                            const std::vector<std::string>& labels, int64_t height, int64_t width,
                            uint64_t seed);

// --arch presets: "detr-digits" (ViT patch 8, D 128, 6 layers, 4 heads, MLP 384; head d_model 128,
// 20 queries, 3 layers, 4 heads, FFN 256, auxiliary loss) at height x width.
VitConfig detr_train_preset(const std::string& arch, int64_t height, int64_t width, DetrHeadConfig* head);
std::vector<std::string> detr_train_presets();

// preprocessor_config.json of a DetrImageProcessor that resizes every image to height x width
// (bilinear), rescales and normalises with ImageNet's mean and std, no padding.
std::string detr_preprocessor_json(int64_t height, int64_t width);

// The loss configuration of the model's config.json (DetrConfig's defaults where absent).
SetLossConfig detr_set_loss_config(const VitTrainModel& model);

// What the head keeps for its backward (the encoder's own activations are in `encoder`).
struct DetrTrainActivations {
  VitTrainActivations encoder;
  int64_t batch = -1, grid_h = -1, grid_w = -1;
  std::vector<float> enc_rows, enc_norm, enc_mean, enc_rstd;  // patch rows [B·N, denc], [B·N]
  bool from_features = false;  // run by detr_train_forward_features: acts.encoder is not this batch's
  std::vector<float> memory, memory_pos, pos;                 // [B·N, D]; pos [N, D]
  struct Layer {
    // s1, s2, s3: the sums before each post-norm; x1, x2, x3 after it
    std::vector<float> x, q, k, v, ctx, lse, s1, x1, mean1, rstd1;   // self-attention
    std::vector<float> cq, ck, cv, cctx, clse, s2, x2, mean2, rstd2;  // cross-attention
    std::vector<float> hidden, s3, x3, mean3, rstd3;                  // FFN (hidden after ReLU)
    std::vector<float> out, mean_a, rstd_a;                      // auxiliary: the decoder norm of x3
  };
  std::vector<Layer> layers;
  std::vector<float> final_out, mean_f, rstd_f;  // the decoder norm at the end [B·Q, D]
  // Per supervised output (auxiliary layers first, the model's output last): head activations.
  struct Head {
    const float* input = nullptr;  // [B·Q, D]
    std::vector<float> logits, box1, box2, boxes;  // [B·Q, K+1], [B·Q, D] ×2 after ReLU, [B·Q, 4]
  };
  std::vector<Head> heads;
  // backward scratch
  std::vector<float> dx, dx_prev, ds, da, dq, dk, dv, dctx, dhidden, dmem, dmem_pos, dck, dcv, dh1, dh2, dhead,
      denc_norm, denc_rows, scratch;
};

// pixel_values [B, C, H, W] → acts.heads (the last one is the model's logits / pred_boxes).
void detr_train_forward(const VitTrainModel& model, const Tensor& pixel_values, DetrTrainActivations& acts);

// --freeze-encoder's feature cache. With the encoder frozen, the head reads only the encoder's
// final norm on the patch rows, so each image can be encoded once:
// detr_encode_features writes that [B, N, denc] block (N = the patch grid) to features;
// detr_train_forward_features runs the head alone from such a block (a model whose encoder is
// frozen; the backward then stops at input_projection, as it does after detr_train_forward).
// The outputs are the same as detr_train_forward's on the same pixels.
void detr_encode_features(const VitTrainModel& model, const Tensor& pixel_values, DetrTrainActivations& acts,
                          float* features);
void detr_train_forward_features(const VitTrainModel& model, const float* features, int64_t batch, int64_t grid_h,
                                 int64_t grid_w, DetrTrainActivations& acts);
// After the forward on the same acts: ADDS dLoss/dweight into grads given, per supervised output,
// dlogits [B·Q, K + 1] and dboxes [B·Q, 4] (after the sigmoid).
void detr_train_backward(const VitTrainModel& model, DetrTrainActivations& acts,
                         const std::vector<const float*>& dlogits, const std::vector<const float*>& dboxes,
                         std::span<float> grads);

// Forward, set loss over every supervised output (one target per image), backward into grads.
double detr_train_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                                const std::vector<DetectionTarget>& targets, DetrTrainActivations& acts,
                                std::span<float> grads, SetLossResult* detail = nullptr);

// One optimiser step (as yolos_train_step): with SGD, lr 1, no decay, no clip, w − g exactly.
TrainStepResult detr_train_step(VitTrainModel& model, VitTrainState& state, const Tensor& pixel_values,
                                const std::vector<DetectionTarget>& targets, const TrainStepOptions& options,
                                SetLossResult* detail = nullptr);

// detr_train_step from cached features (detr_encode_features) of a frozen-encoder model.
TrainStepResult detr_train_step_features(VitTrainModel& model, VitTrainState& state, const float* features,
                                         int64_t batch, int64_t grid_h, int64_t grid_w,
                                         const std::vector<DetectionTarget>& targets, const TrainStepOptions& options,
                                         SetLossResult* detail = nullptr);

}  // namespace tessera
