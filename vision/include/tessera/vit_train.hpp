#pragma once
// The training pass of a Hugging Face ViTForImageClassification or DeiTForImageClassification
// folder: the same config.json and checkpoint names that load_model reads for inference, with the
// weights kept unpacked in one flat buffer (llm.c style) and a forward that saves what the
// backward needs, beside the backward.
//
//   pixels [B, C, H, W] ──im2col──► patches [B·Np, C·p·p] ──linear──► [B·Np, D]
//   ──[cls, (dist), patches] + position embedding──► x₀ [B·T, D]       (T = prefix + Np)
//   ──L × { x += attn_out(attention(qkv(LN₁ x)));  x += fc2(gelu(fc1(LN₂ x))) }──►
//   ──final LN of the class tokens──► classifier ──► logits [B, K]
//
// Any input size trains: away from the training size (config image_size) the position table is
// resampled as Hugging Face's interpolate_pos_encoding does (and as model_forward does), and its
// gradient goes back through that resampling's adjoint. Supported: model_type "vit"
// (ViTForImageClassification), "deit" (DeiTForImageClassification: a distillation token beside
// the class token, the classifier on the class token; ...WithTeacher: a second head on the
// distillation token, trained on the hard-distillation loss) and "dinov2" (Dinov2ForImageClassification:
// layer scale, the classifier on [class token, mean of the patch tokens]; not SwiGLU yet),
// hidden_act "gelu", with or without qkv_bias. Anything else is an Error naming what is not supported.
//
// YolosForObjectDetection (model.detection, yolos_train.hpp) shares this encoder pass: its
// detection tokens follow the patches, x₀ = [cls, patches, detection tokens] + pos, the table's
// rows [cls, grid, detection] with the grid resized bicubically to the input's grid
// (PosResample::SizeBicubic, as yolos.cpp loads it), and the two MLP heads replace the classifier.
#include "tessera/communicator.hpp"
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tessera/optim.hpp"
#include "tessera/tensor.hpp"
#include "tessera/vit.hpp"

namespace tessera {

// One checkpoint tensor's place in the flat buffer.
struct TrainParam {
  std::string name;  // the checkpoint's own name, e.g. "vit.encoder.layer.0.attention.attention.query.weight"
  Shape shape;       // as in the checkpoint
  int64_t offset = 0;  // elements from the start of the buffer
  bool decay = false;  // weight decay applies: matrices; not biases, norms, tokens, position embeddings
  int64_t numel() const { return shape_numel(shape); }
};

// The DETR decoder head of a "vit-detr" folder (detr_train.hpp); layers == 0: none.
struct DetrHeadShape {
  int64_t d_model = 0, queries = 0, layers = 0, heads = 0, ffn = 0;
  float eps = 1e-5f;
  bool conv_projection = false;  // input_projection stored as a 1x1 convolution [D, denc, 1, 1]
  bool auxiliary_loss = false;   // the set loss on every decoder layer (and its norm after each)
  // > 0: a windowed encoder (config "encoder_window", detection.hpp's DetectionHead::window): the
  // encoder (config image size = window) reads windows every window_stride pixels, its normed rows
  // merged onto the input's grid, the memory's values with the sine code. Trains frozen only.
  int64_t window = 0, window_stride = 0;
  bool window_centre = false;  // encoder_window "merge": "centre" (merge_windows' weighted mean)
};

struct VitTrainModel {
  std::string architecture = "ViTForImageClassification";  // or DeiTForImageClassification
  std::string base = "vit.";  // the encoder's name prefix: "vit.", "deit." or "dinov2."
  // Dinov2ForImageClassification: the classifier [K, 2D] reads [h[:, 0], mean(h[:, 1:])] (the
  // final norm then runs on every token); otherwise classifier [K, D] reads h[:, 0].
  bool class_mean = false;
  // DeiTForImageClassificationWithTeacher: cls_classifier on h[:, 0], distillation_classifier on
  // h[:, 1], logits their mean; it trains on the hard-distillation loss.
  bool teacher = false;
  // torchvision's representation_size: the class token's feature goes through heads.pre_logits
  // (internally "pre_logits": [representation_size, D]) and tanh before the classifier
  // [K, representation_size]. 0: none.
  int64_t representation_size = 0;
  // timm global_pool "avg": the classifier reads the mean of the patch tokens (the final norm on
  // every token first), or with fc_norm the norm on that mean (the model's "layernorm" parameters
  // are then timm's fc_norm; timm has no final norm then). With "token" pooling fc_norm is the
  // norm on the class token, the same computation as a final norm.
  bool pool_avg = false;
  bool fc_norm = false;
  // YolosForObjectDetection: config.num_detection_tokens tokens after the patches, the final norm
  // on them and the heads class_labels_classifier (num_labels + 1 outputs, no-object last) and
  // bbox_predictor (4), 3-layer MLPs, instead of a classifier (yolos_train.hpp).
  bool detection = false;
  std::string config_json;  // the folder's config.json text (written back on export)
  // The checkpoint names the folder was read in and is written back in: "hf" (transformers),
  // "timm" (timm's VisionTransformer: blocks.N.attn.qkv …, head) or "torchvision" (conv_proj,
  // encoder.layers.encoder_layer_N …, heads.head). Inside, parameters always carry the Hugging
  // Face names below.
  std::string layout = "hf";
  // VitDetrForObjectDetection (detr_train.hpp): the encoder's final norm on every token, its patch
  // tokens through input_projection into the DETR decoder and its heads, instead of a classifier.
  DetrHeadShape detr;
  bool is_detr() const { return detr.layers > 0; }
  // The head's parameters follow the encoder's but are bound by the head's own pass (the DETR
  // head, Segmenter's mask transformer): bind_view leaves head_w / head_b null.
  bool headless = false;
  // --freeze-encoder for a head with its own pass (the DETR head, Segmenter's decoders): the
  // encoder's parameters (those under `base`) keep their values, its backward is skipped, and
  // only the head trains.
  bool frozen_encoder = false;
  bool is_frozen(const TrainParam& p) const { return frozen_encoder && p.name.rfind(base, 0) == 0; }
  VitConfig config;
  int64_t num_labels = 0;
  std::vector<TrainParam> params;  // in buffer order; query/key/value weights (and biases) adjacent
  std::vector<float> weights;      // every parameter, one flat buffer

  const TrainParam& param(const std::string& name) const;  // Error if missing
  std::span<float> view(std::span<float> buffer, const std::string& name) const;
  std::span<const float> view(std::span<const float> buffer, const std::string& name) const;
};

// The parameters of one layer / the model, as pointers into a buffer laid out as
// VitTrainModel::params (the weights, or a gradient buffer of the same size).
struct VitTrainLayerView {
  float *norm1_w, *norm1_b;    // layernorm_before [D]
  float *qkv_w, *qkv_b;        // query, key, value weights [3D, D] (adjacent), biases [3D] or null
  float *attn_out_w, *attn_out_b;  // attention.output.dense [D, D], [D]
  float *norm2_w, *norm2_b;    // layernorm_after [D]
  float *fc1_w, *fc1_b;        // intermediate.dense [F, D], [F]
  float *fc2_w, *fc2_b;        // output.dense [D, F], [D]
  float *ls1, *ls2;            // DINOv2 layer scale [D] (attention, MLP branch), or null
};
struct VitTrainView {
  float *cls_token, *dist_token;  // [D]; the class token (null without one: timm class_token False),
                                  // the distillation token (DeiT) or null
  float* reg_tokens = nullptr;    // timm's register tokens [registers, D], or null
  float *pre_norm_w = nullptr, *pre_norm_b = nullptr;  // timm's norm_pre (CLIP) [D], or null
  float *pos_embed;               // [prefix + N (+ detection tokens), D]
  float *patch_w, *patch_b;      // [D, C·p·p] (the convolution [D, C, p, p]), [D]
  std::vector<VitTrainLayerView> layers;
  float *norm_w, *norm_b;        // final layernorm [D]
  float *head_w, *head_b;        // classifier [K, D], [K] (with a teacher head: cls_classifier)
  float *head2_w, *head2_b;      // distillation_classifier [K, D], [K], or null
  float *pre_w = nullptr, *pre_b = nullptr;  // torchvision's pre_logits [rep, D], [rep], or null
  // YOLOS (else null / empty): detection tokens [det, D]; per MLP layer i the weight and bias of
  // class_labels_classifier.layers.i ([D, D], last [K + 1, D]) and bbox_predictor.layers.i (last [4, D]).
  float* det_tokens = nullptr;
  std::vector<float*> class_w, class_b, box_w, box_b;
};
VitTrainView bind_view(const VitTrainModel& model, float* buffer);

// Reads a ViTForImageClassification / DeiTForImageClassification folder (config.json + model.safetensors), every tensor checked
// by name and shape as load_model does. Also a timm VisionTransformer folder (config.json with
// architecture + pretrained_cfg, as load_model reads it) with a head, global_pool "token" or
// "avg", with or without a class token, fc_norm, register tokens (no_embed_class or not) and
// LayerScale, GELU; not distilled, not norm_pre (CLIP); and a torchvision VisionTransformer folder (with or without
// representation_size). Anything else is an Error naming it.
VitTrainModel load_vit_train_model(const std::string& dir);

// A new ViTForImageClassification of `config` (its hidden_act, qkv_bias, layer_norm_eps ... as
// given) for `labels`, with the original (JAX) ViT's initialisation, deterministic for a seed:
// linear weights Xavier-uniform, the patch projection LeCun-normal (truncated at ±2σ), class
// token, classifier and biases 0, norms 1, the position embedding MAE's 2-D sin-cos table (when
// hidden_size is a multiple of 4; else N(0, 0.02²)). Its config.json is Hugging Face's.
VitTrainModel make_vit_train_model(const VitConfig& config, const std::vector<std::string>& labels,
                                   uint64_t seed);

// --init with data of other classes: a new classification head (both heads for a DeiT with
// teacher) for `labels`, zero-initialised (as the ViT paper fine-tunes), and config.json's
// id2label / label2id rewritten to them. Every other weight is kept; the optimiser state of an
// earlier layout no longer fits (start a new VitTrainState).
void replace_classifier(VitTrainModel& model, const std::vector<std::string>& labels);

// Fine-tuning at another resolution: the position table of a Hugging Face ViT / DeiT / DINOv2
// classifier resized once to the grid of height x width (the grid rows bicubic, align_corners
// False, by size, as DeiT and timm resize a table for fine-tuning at 384; the class and
// distillation rows kept), and config.json's image_size set to it, so the written folder runs at
// that size in transformers without interpolate_pos_encoding. Both must be multiples of the patch.
void resize_position_table(VitTrainModel& model, int64_t height, int64_t width);

// The architecture of an --arch preset at image_size x image_size: "vit-ti16", "vit-s16",
// "vit-b16" (the ViT/DeiT sizes: D 192/384/768, 12 layers, 3/6/12 heads, MLP 4D, patch 16,
// layer_norm_eps 1e-12 as Hugging Face's configs) and "vit-digits" (the toy trainer's small model:
// patch 4, D 64, 4 layers, 4 heads, MLP 256, eps 1e-6). An unknown name is an Error listing them.
VitConfig vit_train_preset(const std::string& arch, int64_t image_size);
std::vector<std::string> vit_train_presets();

// Writes the model as a folder of the family it was read from: config.json (the text it was read
// with), model.safetensors (every parameter under its checkpoint name and shape) and, when
// `preprocessor_json` is not empty, preprocessor_config.json. The folder loads in load_model.
void save_vit_train_model(const VitTrainModel& model, const std::string& dir,
                          const std::string& preprocessor_json = "");

// What the forward keeps for the backward, and the backward's scratch, for one batch size and one
// model shape (resized when either changes, e.g. after replace_classifier).
// T = prefix + patches (+ detection tokens for YOLOS); with model.detection the final-norm rows
// (cls, cls_norm, ...) are the B·det detection tokens and `mlp` holds the heads' activations.
struct VitTrainActivations {
  int64_t batch = -1, height = -1, width = -1;
  std::vector<int64_t> model_shape;  // what the buffers were sized for (sizes, tokens, labels)
  std::vector<float> patches;  // [B·Np, C·p·p]
  std::vector<float> pos;      // [T, D] the position embedding at this size
  std::vector<std::vector<float>> mid_pos;  // YOLOS's mid position embeddings at this size, [T, D] each
  std::vector<float> x_pre, mean_pre, rstd_pre;  // timm's norm_pre: its input [M, D], mean and rstd [M]
  struct Layer {
    std::vector<float> x, ln1, mean1, rstd1, qkv, ctx, lse, x_mid, ln2, mean2, rstd2, h, a;
    std::vector<float> z1, z2;  // layer scale: the branches before λ [M, D] (else empty)
  };
  std::vector<Layer> layers;   // x [M,D] input, ln1 [M,D], qkv [M,3D], ctx [M,D], lse [B,H,T],
                               // x_mid [M,D], ln2 [M,D], h [M,F] pre-GELU, a [M,F] post-GELU
  std::vector<float> x_out;    // [M, D] the last layer's output
  // The final norm's rows (the class tokens [B, D], or every token [M, D] with class_mean), its
  // output, mean and rstd; the classifier's input [B, D or 2D].
  std::vector<float> cls, cls_norm, mean_f, rstd_f, head_in;
  std::vector<float> logits;   // [B, K]
  std::vector<float> head_logits;  // with a teacher head: class head's [B, K], then distillation head's
  std::vector<float> pre, dpre;    // torchvision's representation layer after tanh [B, rep], its gradient
  // backward scratch
  std::vector<float> dx, dln, dqkv, dctx, dh, da, dcls, dcls_norm, dhead_in, dembedded, dz;
  // YOLOS heads: post-ReLU hidden layers of class_labels_classifier (class1, class2) and
  // bbox_predictor (box1, box2) [B·det, D]; boxes [B·det, 4] after the sigmoid (logits above holds
  // [B·det, K + 1]); scratch for their backward.
  std::vector<float> class1, class2, box1, box2, boxes, dmlp1, dmlp2, dmlp_in;
  void resize(const VitTrainModel& model, int64_t batch, int64_t height, int64_t width);
};

// The encoder alone, for heads other than the classifier (detection, segmentation): embeddings and
// every block, pixel_values [B, C, H, W] → acts.x_out [B·T, D], the last block's output before the
// final norm (T = prefix tokens + patches).
void vit_train_encoder_forward(const VitTrainModel& model, const Tensor& pixel_values,
                               VitTrainActivations& acts);
// Its backward: acts.dx holds dL/dx_out [B·T, D] (it is overwritten); ADDS the gradients of every
// block and of the embeddings (tokens, position table through its resampling, patch projection).
void vit_train_encoder_backward(const VitTrainModel& model, VitTrainActivations& acts,
                                std::span<float> grads);

// pixel_values [B, C, H, W] → acts.logits [B, K] (returned as a view).
std::span<const float> vit_train_forward(const VitTrainModel& model, const Tensor& pixel_values,
                                         VitTrainActivations& acts);
// After vit_train_forward on the same acts: ADDS dLoss/dweight into grads (laid out as
// model.params), given dlogits [B, K] (with a teacher head: [2B, K], the class head's logits'
// gradient, then the distillation head's).
void vit_train_backward(const VitTrainModel& model, VitTrainActivations& acts,
                        const float* dlogits, std::span<float> grads);

// DeiT's hard-distillation loss (DeiTForImageClassificationWithTeacher):
//   ½·CE_ε(cls_classifier(h0), labels) + ½·CE(distillation_classifier(h1), teacher_labels),
// teacher_labels the teacher's argmax per image. Forward, loss, backward into grads (added).
double vit_train_distillation_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                                            const std::vector<int64_t>& labels,
                                            const std::vector<int64_t>& teacher_labels,
                                            float label_smoothing, VitTrainActivations& acts,
                                            std::span<float> grads);

// Mean cross-entropy (label smoothing ε) of the batch: forward, loss, backward into grads (added).
double vit_train_loss_and_grad(const VitTrainModel& model, const Tensor& pixel_values,
                               const std::vector<int64_t>& labels, float label_smoothing,
                               VitTrainActivations& acts, std::span<float> grads);

// Layer-wise learning-rate decay for fine-tuning (BEiT / MAE): parameter p trains at
// lr·decay^(L + 1 − layer(p)), layer 0 the embeddings (tokens, position table, patch projection),
// layer i + 1 encoder block i, layer L + 1 the final norm and the classifier.
int64_t vit_train_layer(const VitTrainModel& model, const TrainParam& param);
double vit_train_lr_scale(const VitTrainModel& model, const TrainParam& param, double layer_decay);

// One AdamW step over every parameter (optim.hpp's adamw_step), with options.weight_decay on the
// TrainParams marked decay (matrices) and none on the rest (biases, norms, tokens, position
// embeddings), and options.lr scaled per layer when layer_decay != 1. m and v are laid out as the
// weights; `step` counts from 1.
void vit_train_adamw_step(VitTrainModel& model, std::span<const float> grads, std::span<float> m,
                          std::span<float> v, int64_t step, const AdamWOptions& options,
                          double layer_decay = 1.0);

// One optimiser step of the whole model on one batch, as `tessera train` will run it: zero the
// gradients, forward, mean cross-entropy (label smoothing ε), backward, clip by global norm
// (clip_grad > 0), then SGD or AdamW at this step's lr (the caller runs the schedule, e.g.
// warmup_cosine_lr). Weight decay applies to matrices only: AdamW's decoupled decay, SGD's L2 term.
// With SGD, lr 1, momentum 0, weight decay 0 and clip 0 the weights become exactly w − g.
enum class Optimizer { AdamW, Sgd };
struct TrainStepOptions {
  Optimizer optimizer = Optimizer::AdamW;
  float lr = 1e-3f;
  float weight_decay = 0.0f;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;  // AdamW
  float momentum = 0.0f;                             // SGD
  float clip_grad = 0.0f;                            // max global norm; 0: no clipping
  double layer_decay = 1.0;                          // layer-wise lr decay; 1: off
  float label_smoothing = 0.0f;
  // Data-parallel training: each rank computes the gradient of its own slice of the global batch;
  // before clipping and the optimiser the gradients are averaged over the ranks (summed in rank
  // order, so every rank takes the same step). nullptr: one process.
  Communicator* comm = nullptr;
  // Detection (DETR / YOLOS set loss): > 0 divides the box terms by this instead of the batch's
  // box count (SetLossConfig::num_boxes; the data-parallel loop's global count / ranks).
  double box_normaliser = 0;
  // Classification steps (vit_train_step): the batch in this many equal sub-batches, each with its
  // own activations and gradient, run side by side (parallel_tasks) and their gradients summed in
  // sub-batch order. 0: vit_train_sub_batches decides; 1: the whole batch at once. The count never
  // depends on the thread count, so neither do the results.
  int64_t sub_batches = 0;
};
// The automatic sub-batch count of a classification step: 2 halves of at least 16 images when the
// step is small (batch x tokens x width <= 2^19 floats, e.g. the digits ViT at batch 64: 160k),
// where the step's many short GEMMs and element-wise loops scale badly over threads and
// independent sub-batches do better; else 1.
int64_t vit_train_sub_batches(const VitTrainModel& model, int64_t batch, int64_t height, int64_t width);
// The optimiser's state and the step's buffers, laid out as the model's weights.
struct DetrTrainActivations;  // detr_train.hpp
struct VitTrainState {
  int64_t step = 0;  // steps taken
  std::vector<float> grads, m, v;  // v unused by SGD; m is SGD's momentum buffer
  VitTrainActivations acts;
  std::shared_ptr<DetrTrainActivations> detr_acts;  // a DETR head's, made by its first step
  struct SubBatch {  // vit_train_step's sub-batches (TrainStepOptions::sub_batches)
    VitTrainActivations acts;
    std::vector<float> grads;
  };
  std::vector<SubBatch> sub;
};
struct TrainStepResult {
  double loss = 0;       // the batch's mean loss, before the step
  double grad_norm = 0;  // global gradient norm, before clipping
  int64_t correct = 0;   // rows whose argmax is the label
};
// A DeiT with teacher (model.teacher) steps on the hard-distillation loss and needs the teacher's
// labels; other models take none.
TrainStepResult vit_train_step(VitTrainModel& model, VitTrainState& state, const Tensor& pixel_values,
                               const std::vector<int64_t>& labels, const TrainStepOptions& options,
                               const std::vector<int64_t>* teacher_labels = nullptr);

// The optimiser half of vit_train_step, for other losses (yolos_train_step): state.grads holds the
// batch's gradient; clip by global norm (clip_grad > 0), count the step, then SGD or AdamW as
// vit_train_step does. Returns the gradient norm before clipping.
double vit_train_apply_gradients(VitTrainModel& model, VitTrainState& state, const TrainStepOptions& options);

// A training checkpoint, for --resume: the weights under their checkpoint names ("weight.NAME"),
// the optimiser state ("m.NAME", and "v.NAME" for AdamW) and its step count, plus the caller's
// own entries (data position, seed ...) as metadata, in one safetensors file written atomically
// (a temporary file, then a rename). A run resumed from it continues bit for bit.
// `extra`: flat float buffers saved beside the model under their own names (a training-only
// head's weights and optimiser moments: segmenter_train.hpp's PatchBoxHead), 1-D tensors.
using CheckpointExtras = std::vector<std::pair<std::string, std::vector<float>*>>;
void save_train_checkpoint(const std::string& path, const VitTrainModel& model,
                           const VitTrainState& state,
                           const std::map<std::string, std::string>& metadata = {},
                           const CheckpointExtras& extra = {});
// Restores weights and optimiser state into a model of the same layout (an Error names the first
// tensor that is missing or of another shape); returns the metadata (with "step"). Each of
// `extra` must be in the file (an Error names it); its buffer is resized to the tensor's length.
std::map<std::string, std::string> load_train_checkpoint(const std::string& path,
                                                         VitTrainModel& model, VitTrainState& state,
                                                         const CheckpointExtras& extra = {});

}  // namespace tessera
