#pragma once
// DETR-style detection on the ViT core: a fixed set of slots (YOLOS detection tokens, or DETR
// decoder queries), each with class logits over num_labels + 1 ("no object" last) and a box
// (cx, cy, w, h) in [0, 1] relative to the network input. No anchors, no NMS by default.
#include <opencv2/core.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

// ------------------------------------------------------------------------------ the heads

// DETR / YOLOS MLPPredictionHead: Linear layers with ReLU between them (none after the last).
struct MlpHead {
  std::vector<PackedLinear> layers;
};

// One DETR decoder layer (transformers DetrDecoderLayer), post-norm:
//   h = LN(h + out(attn(q(h + qpos), k(h + qpos), v(h))))                self-attention
//   h = LN(h + out(attn(q(h + qpos), k(mem + pos), v(mem))))             cross-attention
//   h = LN(h + fc2(relu(fc1(h))))
struct DetrDecoderLayer {
  PackedLinear self_qk;   // [2D, D]: q_proj, k_proj stacked (both read h + qpos)
  PackedLinear self_v, self_out;
  Tensor self_norm_weight, self_norm_bias;
  PackedLinear cross_q, cross_k, cross_v, cross_out;
  Tensor cross_norm_weight, cross_norm_bias;
  PackedLinear fc1, fc2;
  Tensor final_norm_weight, final_norm_bias;
};

enum class DetectionKind {
  Yolos,  // detection tokens of the encoder → class MLP (3 layers) and box MLP (3 layers)
  Detr,   // encoder patch tokens → input projection → DETR decoder → class linear, box MLP
};

// A detector folder's own post-processing (config.json "post_process", Tessera's field:
// {"labels_per_query": k, "nms_iou": t} or {..., "soft_nms_sigma": s}): what detect, view and eval
// use unless told otherwise.
// The defaults are Hugging Face's post_process_object_detection (one label per query, no NMS).
struct DetectionPostProcess {
  int64_t labels_per_query = 1;
  float nms_iou = 0.0f;  // > 0: class-wise non-maximum suppression above this IoU
  float soft_nms_sigma = 0.0f;  // > 0: class-wise Gaussian soft-NMS instead (PostProcessOptions)
};

// Everything after the encoder: weights are data, detection_forward is the function.
struct DetectionHead {
  uint64_t id = new_weights_id();  // which head a DetectionWorkspace is sized for (vit.hpp)
  DetectionKind kind = DetectionKind::Yolos;
  int64_t num_labels = 0;  // real classes; the logits have num_labels + 1 ("no object" last)
  int64_t num_slots = 0;   // detection tokens / object queries
  MlpHead class_head;      // → num_labels + 1
  MlpHead box_head;        // → 4, then sigmoid
  // DETR decoder
  int64_t d_model = 0, decoder_heads = 0, decoder_ffn = 0;
  float decoder_eps = 1e-5f;
  float sine_temperature = 10000.0f;
  PackedLinear input_projection;  // [d_model, encoder hidden]
  Tensor query_pos;               // [num_slots, d_model] learned query position embeddings
  std::vector<DetrDecoderLayer> layers;
  Tensor decoder_norm_weight, decoder_norm_bias;
  // config auxiliary_loss: Hugging Face's DetrDecoder then applies its final layer norm after
  // every layer (the normed output is the next layer's input and the auxiliary heads' input), and
  // once more at the end, in inference too.
  bool norm_every_layer = false;
  // config "encoder_window": {"size", "stride"} (Tessera's windowed DETR encoder): the encoder (its
  // backbone image_size = size) reads size x size windows of the input every stride pixels, each
  // patch's feature is the mean of its normed rows over the windows that hold it (merge_windows),
  // and, since those rows know only their place in their window, the memory's values get the sine
  // code as its keys do. 0 = the whole image in one pass (DETR's memory values without it).
  int64_t window = 0, window_stride = 0;
  bool window_centre = false;  // encoder_window "merge": "centre" (merge_windows' weighted mean)
  DetectionPostProcess post;  // config "post_process"
};

// DETR's DetrSinePositionEmbedding(d_model / 2, normalize=True, scale 2π) of an all-ones mask
// over a grid_h x grid_w feature map: [grid_h * grid_w, d_model] in raster order, y half first.
Tensor detr_sine_position_embedding(int64_t grid_h, int64_t grid_w, int64_t d_model,
                                    float temperature = 10000.0f);

// ------------------------------------------------------------------- windowed encoders
// Window origins along a side of `size` pixels: 0, stride, 2·stride, … while short of the last
// one, which is flush with the end (size − window), as Segmenter's sliding windows.
std::vector<int64_t> window_anchors(int64_t size, int64_t window, int64_t stride);

// pixel_values [B, C, H, W] → [B·n, C, window, window], image by image, windows in raster order
// of (window_anchors(H), window_anchors(W)). H, W ≥ window.
Tensor cut_windows(const Tensor& pixel_values, int64_t window, int64_t stride);

// Per-window patch rows back onto the image's patch grid: rows [B·n windows, T, d] (each window's
// (window/patch)² patch rows start at row `first`) → out [B, (H/patch)·(W/patch), d], each grid cell
// the mean of the rows of the windows that cover it. window, stride, H and W multiples of patch.
// centre: a weighted mean instead, each row weighted by how central its patch lies in its window
// (a tent, (min(i, g-1-i) + 1) along each axis of the window's g patches, the product of both),
// so a patch is read mostly by the windows that see the most around it.
void merge_windows(const float* rows, int64_t batch, int64_t height, int64_t width, int64_t window, int64_t stride,
                   int64_t patch, int64_t tokens, int64_t first, int64_t d, float* out, bool centre = false);

// A windowed DETR model's encoder over pixel_values [B, C, H, W]: cut_windows, the encoder on
// them, merge_windows → [B, (H/patch)·(W/patch), d] (no prefix rows). An Error naming the folder
// when the input is under the window or not a multiple of the patch.
Tensor windowed_encoder_forward(const Model& model, const Tensor& pixel_values, ModelWorkspace& ws);

// pixel_values [B, C, H, W] → logits [B, slots, num_labels + 1], pred_boxes [B, slots, 4],
// last_hidden_state (YOLOS: the encoder's [B, T, D]; DETR: the decoder's [B, slots, d_model]).
NamedTensors detection_forward(const Model& model, const Tensor& pixel_values, ModelWorkspace& ws);

// FLOPs (2 per multiply-add, as vit_flops) of one image through the head, after the encoder, at an
// input of height x width: the class and box MLPs on every slot; for DETR also the input projection
// and the decoder layers (projections, attention products, FFN). Layer norms, softmax and the
// sigmoid are not matrix products and are not counted (nor are they in vit_flops).
double detection_head_flops(const DetectionHead& head, const VitConfig& encoder, int64_t height,
                            int64_t width);

// ------------------------------------------------------------------------------ detections

struct Detection {
  int64_t label = 0;        // class id (index into Model::labels)
  std::string name;         // its label
  float score = 0;          // softmax probability of that class
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // pixels in the original image (not clipped)
  int64_t slot = 0;         // which detection token / query produced it
};

struct PostProcessOptions {
  float threshold = 0.5f;            // keep score > threshold (strict, as Hugging Face)
  int64_t top_k = 0;                 // 0 = all that pass; else the k best by score
  std::vector<int64_t> classes;      // empty = every class; else only these ids
  bool nms = false;                  // class-wise non-maximum suppression (off by default)
  float nms_iou = 0.5f;
  // With nms, > 0: Gaussian soft-NMS instead of removal (Bodla et al., 2017): class by class, the
  // best detection is kept and the others' scores multiplied by exp(-IoU^2 / sigma), repeatedly;
  // those that fall to the threshold or below go. nms_iou is then unused.
  float soft_nms_sigma = 0.0f;
  // Each slot gives its k most probable real classes as k detections (k = 1: Hugging Face's
  // post-processing). A slot unsure between two digits then offers both, each at its probability.
  int64_t labels_per_slot = 1;
};

// The options a detector's folder asks for (DetectionHead::post): threshold 0.5, its labels per
// query and NMS.
struct Model;
PostProcessOptions model_post_process(const Model& model);

// Hugging Face post_process_object_detection for one image: softmax over num_labels + 1, score and
// label = max/argmax over the real classes, keep score > threshold, boxes cx,cy,w,h → x0,y0,x1,y1
// scaled by (width, height). With labels_per_slot k > 1, each slot's k most probable real classes
// (not "N/A" placeholders) instead, each its own detection at its own probability. Results in slot
// order (a slot's labels by probability) unless top_k or nms reorder them (by score).
std::vector<Detection> post_process_detections(const float* logits, const float* boxes,
                                               int64_t slots, int64_t num_classes_plus_one,
                                               int64_t width, int64_t height,
                                               const std::vector<std::string>& labels,
                                               const PostProcessOptions& options);

// One image's raw detector output, kept so a viewer can re-filter without re-running the model.
struct RawDetections {
  Tensor logits;  // [slots, num_labels + 1]
  Tensor boxes;   // [slots, 4] cx, cy, w, h in [0, 1]
  int64_t width = 0, height = 0;  // original image size
};

// Runs a detector model on RGB images, each pre-processed on its own (no padding: a batch never
// changes an image's result); images that come out the same size share a forward pass.
std::vector<RawDetections> run_detector(const Model& model, const Preprocessor& pre,
                                        const std::vector<cv::Mat>& rgb_images, ModelWorkspace& ws);

// post_process_detections over one RawDetections.
std::vector<Detection> post_process(const RawDetections& raw, const std::vector<std::string>& labels,
                                    const PostProcessOptions& options);

// An Error naming the folder unless the model is a detector (YOLOS, DETR head).
void require_detector(const Model& model);

}  // namespace tessera
