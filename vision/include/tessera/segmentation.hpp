#pragma once
// Semantic segmentation heads on ViT patch tokens: Segmenter (Strudel et al. 2021), its linear
// decoder and its mask transformer, on Segmenter's own ViT or on another encoder Tessera loads
// (a Hugging Face ViT / DINOv2 given as "backbone_config").
//
//   pixels [B,3,H,W] ──zero-pad to a multiple of p──► encoder ──drop cls/dist──► decoder
//   ──► masks [B, n_cls, Hp/p, Wp/p] ──bilinear to (Hp, Wp)──► crop to (H, W) = logits
//
// model_forward returns "logits" [B, n_cls, H, W] exactly as segm/model/segmenter.py does. For
// label maps, segmentation_labels() goes from the patch-level masks straight to a label map at any
// output size, one row at a time, so a 4000x3000 photo with 150 classes never holds its full-size
// logits (150 x 12 Mpx floats) in memory.
#include <cstdint>
#include <memory>
#include <vector>

#include <opencv2/core.hpp>

#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/tensor.hpp"
#include "tessera/vit.hpp"

namespace tessera {

enum class SegmenterDecoder { Linear, MaskTransformer };

struct SegmentationHead {
  SegmenterDecoder decoder = SegmenterDecoder::Linear;
  int64_t num_classes = 0;       // n_cls
  int64_t encoder_dim = 0;       // d_encoder
  int64_t num_extra_tokens = 1;  // encoder tokens before the patches (cls, dist, registers)
  // config.json "inference": {"window_size", "window_stride"} (Segmenter's inference_kwargs): the
  // model segments with sliding windows of this size at the image's own resolution (what it was
  // trained on: crops); 0 when absent (one pass at the processor's size).
  int64_t window_size = 0, window_stride = 0;

  // DecoderLinear: head = Linear(d_encoder, n_cls).
  PackedLinear head;

  // MaskTransformer: proj_dec, [patches; cls_emb] through pre-norm blocks, decoder_norm,
  // L2-normalised (patches @ proj_patch) · (classes @ proj_classes)ᵀ, mask_norm over classes.
  int64_t d_model = 0, n_heads = 0, d_ff = 0;
  float layer_norm_eps = 1e-5f;
  PackedLinear proj_dec;          // [d_model, d_encoder]
  Tensor cls_emb;                 // [n_cls, d_model]
  std::vector<VitLayer> blocks;   // timm-style pre-norm blocks (norm1, qkv, proj, norm2, fc1, fc2)
  Tensor decoder_norm_weight, decoder_norm_bias;
  PackedLinear proj_patch;        // x @ proj_patch, packed as Linear(proj_patchᵀ), no bias
  PackedLinear proj_classes;      // x @ proj_classes, likewise
  Tensor mask_norm_weight, mask_norm_bias;  // [n_cls]
};

// Patch-level decoder output for a batch, with the geometry needed to bring it to pixels.
struct SegmentationMasks {
  Tensor masks;                 // [B, n_cls, Hp/p, Wp/p]
  int64_t height = 0, width = 0;                // the input (H, W)
  int64_t padded_height = 0, padded_width = 0;  // (Hp, Wp): H, W rounded up to the patch size
};

// pixels [B, C, H, W] → patch-level masks (zero padding, encoder, decoder).
SegmentationMasks segmentation_masks(const Model& model, const Tensor& pixel_values,
                                     ModelWorkspace& ws);

// FLOPs (2 per multiply-add, as vit_flops) of one image of height x width through the decoder, to
// the patch-level masks segmentation_masks returns (the grid of the input padded up to the patch
// size): the linear head, or the mask transformer's proj_dec, blocks (projections and attention
// products), proj_patch, proj_classes and the patches · classesᵀ product. Not counted: layer norms,
// the L2 normalisation, and the bilinear upsampling to the input size (segmentation_logits,
// segmentation_labels), which is interpolation rather than a matrix product and depends on the
// output size asked for.
double segmentation_head_flops(const SegmentationHead& head, const VitConfig& encoder,
                               int64_t height, int64_t width);

// Segmenter's logits [B, n_cls, H, W]: masks bilinearly upsampled to (Hp, Wp), cropped to (H, W).
Tensor segmentation_logits(const SegmentationMasks& masks);

// The label map of image b at out_height x out_width: argmax over classes of the logits
// bilinearly resized (align_corners=False) from (H, W) to the output size (lowest class id on
// ties). CV_8U when n_cls <= 255, else CV_16U (label PNGs: 16-bit past 255 classes). Computed row by row: memory O(n_cls * (gh + 2) * W).
cv::Mat segmentation_labels(const SegmentationMasks& masks, int64_t b, int out_height,
                            int out_width);
// The same from full logits [B, n_cls, H, W] (e.g. merged sliding windows).
cv::Mat segmentation_labels(const Tensor& logits, int64_t b, int out_height, int out_width);

// Segmenter's sliding-window inference (segm/model/utils.py inference, without flip): the image
// [1, C, H, W] is bilinearly enlarged so its short side is at least `window` (as segm resize()),
// cut into window x window crops every `stride` pixels (last crop flush with the border), each
// crop segmented, overlapping logits averaged. Returns logits [1, n_cls, H', W'] at the enlarged
// size (H', W'); bring them to any size with segmentation_labels. batch = crops per forward pass.
Tensor segmentation_sliding_window(const Model& model, const Tensor& pixel_values, int64_t window,
                                   int64_t stride, ModelWorkspace& ws, int64_t batch = 4);

// The label map (out_height x out_width) of one pre-processed image [C, H, W] as the model's own
// inference does it: sliding windows of the config's inference.window_size / window_stride when
// it has them (a model trained on crops), else one pass over the whole input. What `tessera
// segment` runs by default, `tessera eval` measures and training validates.
cv::Mat segment_pixels(const Model& model, const Tensor& pixel_values, int out_height, int out_width,
                       ModelWorkspace& ws);

}  // namespace tessera
