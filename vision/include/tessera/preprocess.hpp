#pragma once
// Pre-processing is part of the model: the exact pixel tensor that the checkpoint's own processor
// (Hugging Face `preprocessor_config.json`, or timm's eval transform from `pretrained_cfg`) computes.
//
//   RGB uint8 ──resize (Pillow filter, bit-exact)──► center crop ──► rescale ──► normalize ──► [3, H, W] f32
//
// Arithmetic follows upstream to the bit: Hugging Face rescales with a float64 multiply then casts
// to float32 (numpy), then normalizes (x - mean) / std in float32; torchvision's ToTensor divides by
// 255 in float32. Fields that would change the result and that Tessera does not implement are an
// Error naming the file and the field, never ignored.
#include <opencv2/core.hpp>

#include <array>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/pil_resize.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

// How the output size of the resize step follows from the input size.
enum class ResizeRule {
  exact,          // size {"height", "width"}: to exactly height x width (aspect ratio not kept)
  shortest_edge,  // short side = shortest_edge, long = int(shortest_edge * long / short)
                  // (HF get_resize_output_image_size(default_to_square=False) == torchvision Resize(int))
  detr,           // DETR: short side = shortest_edge unless the long side would pass longest_edge
  yolos,          // YOLOS: DETR's rule, then both sides rounded down to multiples of 16
  longest_edge,   // long side = longest_edge, short = int(short * longest_edge / long + 0.5)
  keep_ratio,     // timm ResizeKeepRatio to (height, width): each side round(side / r), Python rounding, with
                  // r = min(h / height, w / width) (cover), or the max with keep_ratio_longest (fit inside)
};

enum class CropRule {
  floor_half,  // Hugging Face center_crop: top = (h - crop_h) // 2; pads with zeros if the crop is larger
  round_half,  // torchvision CenterCrop: top = int(round((h - crop_h) / 2.0)) (ties to even); pads with zeros
};

enum class RescaleRule {
  multiply_f64,  // numpy: float32(float64(x) * rescale_factor)             (Hugging Face)
  divide_f32,    // torch: float32(x) / 255.0f                              (torchvision ToTensor)
};

struct PreprocessConfig {
  std::string source;     // the file it came from, for messages
  std::string processor;  // "ViTImageProcessor", ..., or "timm"

  bool do_resize = true;
  ResizeRule resize_rule = ResizeRule::exact;
  int height = 224, width = 224;        // ResizeRule::exact, keep_ratio
  bool keep_ratio_longest = false;      // ResizeRule::keep_ratio: fit the longest side (timm crop_mode "border")
  int shortest_edge = 0, longest_edge = 0;  // the aspect-keeping rules (0 = not set)
  Resample resample = Resample::bilinear;

  bool do_center_crop = false;
  int crop_height = 0, crop_width = 0;
  CropRule crop_rule = CropRule::floor_half;
  std::array<uint8_t, 3> crop_fill{0, 0, 0};  // RGB of the padding when the crop is larger (timm "border")

  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  RescaleRule rescale_rule = RescaleRule::multiply_f64;

  bool do_normalize = true;
  std::array<float, 3> image_mean{0.5f, 0.5f, 0.5f};
  std::array<float, 3> image_std{0.5f, 0.5f, 0.5f};

  bool do_convert_rgb = true;  // always true in effect: load_image_rgb gives RGB
  // DETR / YOLOS: a batch is zero-padded bottom/right to its largest image (preprocess_batch).
  bool do_pad = false;

  std::string describe() const;  // one line: "resize shortest_edge=256 bicubic, center crop 224x224, ..."
};

// A Hugging Face preprocessor_config.json: ViTImageProcessor, DeiTImageProcessor, BitImageProcessor,
// CLIPImageProcessor, DetrImageProcessor, YolosImageProcessor (and their *FeatureExtractor names).
// Missing fields take the defaults of that processor class.
PreprocessConfig load_preprocess_config(const std::string& path);
PreprocessConfig parse_preprocess_config(std::string_view json_text, const std::string& source);

// timm's eval transform (resolve_data_config + transforms_imagenet_eval): Resize(floor(img_size /
// crop_pct)) of the short side with `interpolation`, CenterCrop(img_size), ToTensor, Normalize.
// crop_mode "center" (default; a non-square size uses ResizeKeepRatio, bilinear as in timm), "squash"
// (both sides to floor(size / crop_pct)) and "border" (fit inside, pad with round(255 * mean)).
// `json_text` is a timm config.json (with "pretrained_cfg") or the pretrained_cfg object itself.
// img_height/img_width = 0: pretrained_cfg's input_size.
PreprocessConfig from_timm_pretrained_cfg(std::string_view json_text, const std::string& source,
                                          int img_height = 0, int img_width = 0);

// Size (width x height) after the resize step, and after resize + crop (= the tensor's H, W).
cv::Size resize_output_size(cv::Size input, const PreprocessConfig& cfg);
cv::Size preprocess_output_size(cv::Size input, const PreprocessConfig& cfg);

// The center-crop window in the resized image's coordinates (it reaches outside when the crop pads);
// the whole resized image when there is no crop. Maps model pixels back onto the original picture.
cv::Rect crop_window(cv::Size resized, const PreprocessConfig& cfg);

// Resize + center crop on the 8-bit RGB image (CV_8UC3), as the processor does it.
cv::Mat resize_and_crop(const cv::Mat& rgb, const PreprocessConfig& cfg);

// Rescale + normalize of an already resized/cropped 8-bit RGB image into [3, H, W] at `out`.
void rgb_to_chw(const cv::Mat& rgb, const PreprocessConfig& cfg, float* out);

// The whole processor on one RGB image (CV_8UC3): float32 [3, H, W].
Tensor preprocess(const cv::Mat& rgb, const PreprocessConfig& cfg);

// Several images into [B, 3, H, W]. With do_pad, images are zero-padded bottom/right to the largest
// height and width (DETR/YOLOS); `sizes` (if given) receives each image's unpadded (width, height).
// Without do_pad, all images must come out the same size.
Tensor preprocess_batch(const std::vector<cv::Mat>& rgbs, const PreprocessConfig& cfg,
                        std::vector<cv::Size>* sizes = nullptr);

}  // namespace tessera
