#pragma once
// The training pass of a Segmenter (rstrudel/segmenter), linear or mask-transformer decoder: the same
// config.json and checkpoint names that load_model reads for inference (segmenter.cpp), trained
// on the ViT training pass (vit_train.hpp) and written back in Segmenter's layout.
//
//   pixels [B, 3, H, W] ──encoder (vit_train_encoder_forward)──► x [B·T, D]
//   ──drop the class token──► patch rows [B·N, D] ──encoder.norm──► decoder.head (D → K)
//       or the mask transformer: proj_dec (D → dm), [patches, cls_emb] through its blocks,
//       decoder_norm, patches·proj_patch and classes·proj_classes L2-normalised, their cosines
//       [N, K] through mask_norm
//   ──► masks [B, K, H/p, W/p] ──bilinear ×p (align_corners=False)──► logits [B, K, H, W]
//   ──per-pixel cross-entropy (ignore 255)──► loss
//
// The encoder lives in a VitTrainModel under Hugging Face ViT names (the flat buffer, optimiser,
// and checkpoints of vit_train.hpp work unchanged); its classifier [K, D] is decoder.head. Names
// map one to one, except that Segmenter's attn.qkv [3D, D] is HF's adjacent query, key, value.
// Training runs at the config's image_size only: Segmenter resamples its position table
// (bilinear resize_pos_embed) at other sizes, and that resampling has no backward here yet.
// Supported: the linear decoder and the mask transformer, on Segmenter's own encoder without a
// distillation token or on a Hugging Face ViT / DeiT / DINOv2 backbone (encoder.backbone_config);
// anything else is an Error naming what is not supported.
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "tessera/datasets.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/tensor.hpp"
#include "tessera/vit_train.hpp"

namespace tessera {

// Segmenter's MaskTransformer decoder (segm/model/decoder.py); layers == 0: the linear decoder.
struct MaskDecoderShape {
  int64_t layers = 0, d_model = 0, heads = 0, d_ff = 0;
  float eps = 1e-5f;  // its blocks', decoder_norm's and mask_norm's
};

struct SegmenterTrainModel {
  // encoder (HF names) + classifier = decoder.head [K, D] for the linear decoder; with the mask
  // transformer the classifier is dropped (vit.headless) and its parameters follow under Segmenter's
  // own names (decoder.proj_dec, decoder.cls_emb, decoder.blocks.N.…, decoder.decoder_norm,
  // decoder.proj_patch, decoder.proj_classes, decoder.mask_norm).
  VitTrainModel vit;
  MaskDecoderShape mask;
  // encoder.backbone_config: a Hugging Face ViT / DeiT / DINOv2 encoder whose tensors keep their
  // own names under "encoder." (vit.base is "encoder."); else Segmenter's own (timm-named) encoder.
  bool hf_backbone = false;
  std::string config_json;  // Segmenter's config.json text (written back on save)
  int64_t num_classes = 0;
  std::vector<std::string> labels;  // id2label, one per class
  // > 0: trained on random window_size crops at the image's own resolution (Segmenter's recipe)
  // and run with sliding windows of that size (config.json "inference", segmentation.hpp);
  // 0: trained and run on the whole image resized to image_size.
  int64_t window_size = 0;
};

// Reads a Segmenter folder (config.json model_type "segmenter" with the linear decoder or the
// mask transformer and Segmenter's own encoder, model.safetensors); every tensor checked by name and shape. The
// pre-trained ImageNet head (encoder.head), if present, is not trained and not written back.
SegmenterTrainModel load_segmenter_train_model(const std::string& dir);

// A new Segmenter with the linear decoder over an encoder of `encoder` (image size, patch size,
// hidden_size = d_model, layers, heads, intermediate_size = d_ff, layer_norm_eps) for `labels`,
// initialised as make_vit_train_model does (decoder.head zero), deterministic for a seed.
// window_size > 0 (it must be the image size): a model trained on crops, whose config.json carries
// "inference": {"window_size", "window_stride": 2/3 of it}.
// mask.layers > 0: the mask-transformer decoder instead, initialised as Segmenter does (linear
// weights truncated N(0, 0.02²), biases 0, norms 1, cls_emb truncated N(0, 0.02²), proj_patch and
// proj_classes d_model^-0.5·N(0, 1)).
SegmenterTrainModel make_segmenter_train_model(const VitConfig& encoder,
                                               const std::vector<std::string>& labels, uint64_t seed,
                                               int64_t window_size = 0, const MaskDecoderShape& mask = {});

// Segmenter's own recipe, an encoder pre-trained as a classifier: a new Segmenter whose encoder
// is `vit` (a ViTForImageClassification, or DeiT without a distillation token, as
// load_vit_train_model reads it; GELU MLPs) at image_size x image_size, its position table
// resized as Segmenter's resize_pos_embed does (bilinear, align_corners False, the class token's
// row kept), the classifier dropped and decoder.head zero for `labels`. window_size as
// make_segmenter_train_model.
SegmenterTrainModel segmenter_from_vit(const VitTrainModel& vit, int64_t image_size,
                                       const std::vector<std::string>& labels, int64_t window_size = 0,
                                       const MaskDecoderShape& mask = {});

// Fine-tuning a Segmenter on data of other classes: a new class head for `labels` (class id i →
// labels[i]): the linear decoder's head [K, D] zero (as a new classifier head), or the mask
// transformer's class embeddings truncated N(0, 0.02²) (as Segmenter initialises them, seeded)
// with mask_norm 1 / 0; config.json's n_cls and id2label rewritten. Everything else is kept.
void replace_segmentation_classes(SegmenterTrainModel& model, const std::vector<std::string>& labels, uint64_t seed);

// --arch presets at image_size x image_size: "segmenter-ti" (Segmenter's ViT-Ti/16: D 192, 12
// layers, 3 heads, MLP 768, patch 16) and "segmenter-digits" (for small scenes: patch 4, D 96,
// 6 layers, 3 heads, MLP 384). layer_norm_eps 1e-6 as timm's ViTs. Unknown: an Error listing them.
VitConfig segmenter_train_preset(const std::string& arch, int64_t image_size);
std::vector<std::string> segmenter_train_presets();

// The model's parameters (or a buffer laid out as them: gradients, moments) under Segmenter's
// names and shapes, e.g. "encoder.blocks.0.attn.qkv.weight" [3D, D], "decoder.head.weight" [K, D].
std::vector<std::pair<std::string, Tensor>> segmenter_named_tensors(const SegmenterTrainModel& model,
                                                                    std::span<const float> buffer);

// Writes config.json (Segmenter's), model.safetensors (Segmenter's names) and, when given,
// preprocessor_config.json. The folder loads in load_model / `tessera segment` unchanged.
void save_segmenter_train_model(const SegmenterTrainModel& model, const std::string& dir,
                                const std::string& preprocessor_json = "");

// What the decoder keeps for its backward (the encoder's own activations are in `encoder`).
struct SegmenterTrainActivations {
  VitTrainActivations encoder;
  // The mask transformer: its blocks' activations and scratch (decoder.layers, .dx ...) over
  // [B·(N + K), d_model]; z after the blocks, zn after decoder_norm; the projected and normalised
  // patch and class features [B·N, dm] / [B·K, dm] with their norms; the cosine scores [B·N, K]
  // before mask_norm with its mean and rstd.
  VitTrainActivations decoder;
  std::vector<float> z, zn, zmean, zrstd, proj_patch_t, proj_classes_t, pfeat, cfeat, pnorm, cnorm, cos, smean, srstd;
  std::vector<float> dz, dpfeat, dcfeat, dcos, dproj_t;
  std::vector<float> patches, normed, mean, rstd;  // patch rows [B·N, D], after the norm, [B·N]
  std::vector<float> scores;                       // head output [B·N, K]
  std::vector<float> masks;                        // [B, K, gh, gw]
  Tensor logits;                                   // [B, K, H, W]
  std::vector<float> dmasks, dscores, dnormed, dpatches;
  bool from_features = false;  // run by segmenter_train_forward_features: `encoder` is not this batch's
};

// pixel_values [B, C, H, W] at the config's image size → acts.logits [B, K, H, W].
const Tensor& segmenter_train_forward(const SegmenterTrainModel& model, const Tensor& pixel_values,
                                      SegmenterTrainActivations& acts);
// --freeze-encoder's feature cache. With the encoder frozen, the decoder reads only the encoder's
// final norm on the patch rows: segmenter_encode_features writes that [B, N, D] block;
// segmenter_train_forward_features runs the decoder alone from it (a frozen-encoder model; the
// backward then stops at the decoder, as it does after segmenter_train_forward). The logits are
// the same as segmenter_train_forward's on the same pixels.
void segmenter_encode_features(const SegmenterTrainModel& model, const Tensor& pixel_values,
                               SegmenterTrainActivations& acts, float* features);
const Tensor& segmenter_train_forward_features(const SegmenterTrainModel& model, const float* features,
                                               int64_t batch, SegmenterTrainActivations& acts);
// After the forward on the same acts: ADDS dLoss/dweight into grads (laid out as model.vit.params),
// given dlogits [B, K, H, W].
// dfeatures (optional, [B·N, D]): a further gradient on the normed patch features (acts.normed),
// e.g. the patch-box head's, added to the decoder's before the encoder's backward.
void segmenter_train_backward(const SegmenterTrainModel& model, SegmenterTrainActivations& acts,
                              const Tensor& dlogits, std::span<float> grads,
                              std::span<const float> dfeatures = {});

// Per-pixel cross-entropy (mean over pixels not labelled ignore_label, segmentation_loss.hpp) of
// the batch: forward, loss, backward into grads (added). labels: B·H·W values.
double segmenter_train_loss_and_grad(const SegmenterTrainModel& model, const Tensor& pixel_values,
                                     const std::vector<int32_t>& labels,
                                     SegmenterTrainActivations& acts, std::span<float> grads,
                                     int32_t ignore_label = 255);

// ------------------------------------------------------------------ the patch-box loss
// A training-only auxiliary task (`train --task segment --box-loss W`) that teaches the encoder's
// patch tokens the box of the object they lie in, so that a DETR head trained later on the frozen
// encoder (train --task detect --init SEGMENTER --freeze-encoder) can read boxes off them: a
// linear head on the normed patch features (what the decoder reads), sigmoid(x·Wᵀ + b) → the box
// (cx, cy, w, h) relative to the input's width and height (with --crops the centre relative to the
// patch's: patch_box_targets), regressed with L1 on every patch whose
// centre lies inside an object's box (FCOS's assignment; boxes that overlap: the smallest):
//   loss = W · Σ_{patches inside a box} Σ_4 |sigmoid(z) − target| / max(1, patches inside a box).
// The head is not part of the model: it is dropped when the model is written.
struct PatchBoxHead {
  int64_t dim = 0;
  std::vector<float> params;  // weight [4, dim] then bias [4]
  std::vector<float> grads, m, v;
};
// weight ~ N(0, 0.02²) (seeded), bias 0: every patch starts at the centred half-size box.
PatchBoxHead make_patch_box_head(int64_t dim, uint64_t seed);
// The targets of one image: boxes [x0, y0, x1, y1] in the model input's pixels (H x W), patch
// `patch`; targets [N, 4] (cx/W, cy/H, w/W, h/H) and weights [N] (1 inside a box, else 0), N the
// patch grid's size in row-major order. relative (a model trained on crops, whose windows' place
// in the scene the encoder never knows, and whose rows a windowed detector averages over windows):
// the centre as an offset from the patch's own centre instead, (0.5 + (cx − px)/W, 0.5 + (cy − py)/H).
void patch_box_targets(const std::vector<std::array<float, 4>>& boxes, int64_t height, int64_t width, int64_t patch,
                       float* targets, float* weights, bool relative = false);
// Over R rows of features [R, dim]: returns the L1 term (Σ|sigmoid(z) − target| over the rows
// with weight > 0, over max(1, their count)); when dfeatures / dparams (laid out as head.params)
// are given, ADDS the gradients of loss_weight times it into them.
double patch_box_loss_and_grad(const PatchBoxHead& head, const float* features, int64_t rows, const float* targets,
                               const float* weights, double loss_weight, float* dfeatures, float* dparams);
struct PatchBoxBatch {
  double loss_weight = 0;
  std::vector<float> targets, weights;  // [B·N, 4], [B·N]
};

// The optimiser state (vit_train.hpp's: its acts stay unused), the decoder's activations and,
// with the patch-box loss, its head (made at the first step that needs it).
struct SegmenterTrainState {
  VitTrainState opt;
  SegmenterTrainActivations acts;
  PatchBoxHead box;
};
struct SegmenterStepResult {
  double loss = 0, grad_norm = 0;   // loss: cross-entropy plus the weighted box loss
  double box_loss = 0;              // the patch-box L1 (unweighted), 0 without it
  int64_t pixels = 0, correct = 0;  // labelled pixels, and those whose argmax is the label
};
// One optimiser step on one batch, as vit_train_step (zero, forward, loss, backward, clip, SGD or
// AdamW with decay on matrices only). SGD, lr 1, momentum 0, no decay, no clip: w − g exactly.
// boxes (optional): the patch-box loss's targets for this batch; its head (state.box, from
// make_patch_box_head) takes the same optimiser step (no weight decay on its bias), and the
// gradient clipping is over the model's and the head's gradients together.
SegmenterStepResult segmenter_train_step(SegmenterTrainModel& model, SegmenterTrainState& state,
                                         const Tensor& pixel_values,
                                         const std::vector<int32_t>& labels,
                                         const TrainStepOptions& options, const PatchBoxBatch* boxes = nullptr);
// The same step from cached features (segmenter_encode_features) of a frozen-encoder model.
SegmenterStepResult segmenter_train_step_features(SegmenterTrainModel& model, SegmenterTrainState& state,
                                                  const float* features, int64_t batch,
                                                  const std::vector<int32_t>& labels, const TrainStepOptions& options);

// ------------------------------------------------------------------ the training loop

// A segmentation folder (datasets.hpp) ready for batches: the pairs, and the processor that turns
// an image into the model's input (its output size must be the model's image size).
struct SegmenterTrainOptions {
  int64_t epochs = 1;
  int64_t max_steps = 0;  // > 0: stop after this many steps in all
  int64_t batch = 8;      // the last partial batch of an epoch is dropped
  bool shuffle = true;
  bool augment = true;    // random scale / translate, the same for image and mask; colour jitter
  bool hflip = false;     // with augment: flip half the samples (off: digits are not mirror-symmetric)
  uint64_t seed = 0;
  int64_t warmup_steps = 0;
  double min_lr = 0.0;
  TrainStepOptions step;
  // A frozen encoder without augmentation encodes each sample once and the decoder trains on the
  // cached features (the same steps) when features and label maps fit here.
  bool cache_features = true;
  double cache_limit_bytes = 8.0 * (1ull << 30);
  // > 0: the patch-box loss's weight (above); every pair needs its boxes (attach_segmentation_boxes)
  // and the encoder must train.
  double box_loss = 0;
  // Data-parallel training (step.comm): rank `shard` of `shards` takes positions
  // [shard·B/shards, (shard + 1)·B/shards) of every global batch, each augmented as in a
  // one-process run; the step averages the ranks' gradients (each its slice's mean over valid
  // pixels: the one-process mean when every slice has as many valid pixels, e.g. crops without
  // ignored pixels), and the progress reports the global batch's loss and pixel accuracy.
  int shard = 0, shards = 1;
};

struct SegmenterProgress {
  int64_t step = 0, total = 0, epoch = 0;  // step from 1
  double loss = 0, lr = 0, grad_norm = 0, pixel_accuracy = 0;
  int64_t batch = 0;
  double box_loss = 0;  // the patch-box L1 (unweighted), with box_loss > 0
};

int64_t segmenter_total_steps(size_t samples, const SegmenterTrainOptions& options);
// The samples of step s (from 0): a seeded permutation of (seed, epoch), as classify_trainer.
std::vector<size_t> segmenter_batch_indices(size_t samples, const SegmenterTrainOptions& options,
                                            int64_t step);

// Image and label map of one sample through the processor (mask: nearest neighbour to the same
// size), after the augmentation of (seed, step, index in batch) when `augment`: a random scale in
// [0.8, 1.25] and translation of up to 10% of each side, one affine for both (bilinear for the
// image, nearest for the mask, borders replicated). Fills pixels [3, H, W] and labels [H·W].
//
// crop > 0 (a model with a window, whose processor keeps the size): instead, the image at its own
// resolution (when augmenting, scaled by a random factor in [0.8, 1.25]; enlarged, as segm
// resize(), when its short side is under `crop`) and one crop x crop window of it, centred (±crop/4)
// on a random pixel of a class chosen uniformly among those in the image, so that a small object
// (a digit's ink in a large scene) is as often the centre of a window as the background is, and
// mostly whole in it; without augmentation the centred window.
// Augmentation then jitters the colours (contrast about mid-grey ×[0.8, 1.2], brightness
// ±0.2·255, saturating) and with hflip flips half the samples, image and mask together.
//
// boxes (optional): pair.boxes through the same geometry, as [x0, y0, x1, y1] in the output's
// pixels, clipped to it; boxes left empty are dropped.
void segmentation_sample(const SegmentationPair& pair, const PreprocessConfig& processor,
                         bool augment, uint64_t augment_seed, float* pixels, int32_t* labels,
                         int64_t height, int64_t width, int64_t crop = 0, bool hflip = false,
                         std::vector<std::array<float, 4>>* boxes = nullptr);

// Whether train_segmenter trains on cached encoder features (see SegmenterTrainOptions).
bool segmenter_caches_features(const SegmenterTrainModel& model, size_t samples, const SegmenterTrainOptions& options);

// Runs steps state.opt.step .. total − 1 (the rest after a restored checkpoint), calling on_step
// after each; stop_before > 0 stops at that step (the schedule stays the whole run's). Every
// batch follows from (seed, step) alone, so a resumed run ends bit-identical.
void train_segmenter(SegmenterTrainModel& model, SegmenterTrainState& state,
                     const std::vector<SegmentationPair>& data, const PreprocessConfig& processor,
                     const SegmenterTrainOptions& options,
                     const std::function<void(const SegmenterProgress&)>& on_step = {},
                     int64_t stop_before = 0);

}  // namespace tessera
