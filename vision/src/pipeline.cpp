#include "tessera/pipeline.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>

#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/vit.hpp"

namespace fs = std::filesystem;

namespace tessera {

Preprocessor Preprocessor::from_file(const std::string& path) {
  return {load_preprocess_config(path), path};
}

Tensor Preprocessor::image(const cv::Mat& rgb) const { return preprocess(rgb, config); }

void Preprocessor::check_tokens(cv::Size size, const std::string& name) const {
  const cv::Size resized = resize_output_size(size, config);
  if (static_cast<double>(resized.width) * resized.height > static_cast<double>(kMaxImagePixels))
    fail(name + ": " + source + " resizes this " + std::to_string(size.width) + "x" + std::to_string(size.height) +
         " image to " + std::to_string(resized.width) + "x" + std::to_string(resized.height) +
         ", more than the limit of " + std::to_string(kMaxImagePixels) + " pixels");
  if (patch_size <= 0) return;
  const cv::Size out = preprocess_output_size(size, config);
  check_token_budget(patch_size, out.height, out.width, name);
}

Tensor Preprocessor::load(const std::string& path) const {
  const cv::Mat rgb = load_image_rgb(path);
  check_tokens(rgb.size(), path);
  return preprocess(rgb, config);
}

Tensor Preprocessor::batch(const std::vector<std::string>& paths) const {
  check(!paths.empty(), "no images given");
  std::vector<cv::Mat> images;
  for (const auto& p : paths) {
    images.push_back(load_image_rgb(p));
    check_tokens(images.back().size(), p);
  }
  return preprocess_batch(images, config);
}

Preprocessor model_preprocessor(const Model& model) {
  const fs::path hf = fs::path(model.dir) / "preprocessor_config.json";
  std::error_code ec;
  if (!model.dir.empty() && fs::exists(hf, ec)) {
    Preprocessor pre = Preprocessor::from_file(hf.string());
    pre.patch_size = model.encoder.config.patch_size;
    return pre;
  }
  const VitConfig& c = model.encoder.config;
  switch (model.family) {
    case ModelFamily::Timm:
      return {from_timm_pretrained_cfg(model.config_json, model.dir + "/config.json"),
              model.dir + "/config.json (pretrained_cfg)", c.patch_size};
    case ModelFamily::Torchvision: {
      // torchvision's ImageClassification preset: resize the short side (256 for 224), crop,
      // ImageNet mean/std. A preprocessor_config.json in the folder overrides it.
      PreprocessConfig p;
      p.source = model.dir + " (torchvision ImageNet defaults)";
      p.processor = "torchvision";
      p.resize_rule = ResizeRule::shortest_edge;
      p.shortest_edge = static_cast<int>(std::lround(c.image_height * 256.0 / 224.0));
      p.resample = Resample::bilinear;
      p.do_center_crop = true;
      p.crop_height = static_cast<int>(c.image_height), p.crop_width = static_cast<int>(c.image_width);
      p.crop_rule = CropRule::round_half;
      p.rescale_rule = RescaleRule::divide_f32;
      p.image_mean = {0.485f, 0.456f, 0.406f};
      p.image_std = {0.229f, 0.224f, 0.225f};
      return {p, p.source, c.patch_size};
    }
    case ModelFamily::HuggingFace:
    case ModelFamily::Detector:
    case ModelFamily::Segmenter:
      break;
  }
  // A Hugging Face folder without preprocessor_config.json: the processor class's defaults at the
  // model's own image size (transformers would refuse; say what is assumed).
  check(!model.detection || model.detection->window == 0,
        model.dir + ": no preprocessor_config.json: a windowed DETR encoder's image_size is its window's, not the "
        "input's; the folder needs its processor");
  PreprocessConfig p;
  p.processor = "defaults";
  p.height = static_cast<int>(c.image_height), p.width = static_cast<int>(c.image_width);
  if (model.model_type == "dinov2") {  // BitImageProcessor as published with DINOv2
    p.resize_rule = ResizeRule::shortest_edge;
    p.shortest_edge = static_cast<int>(std::lround(c.image_height * 256.0 / 224.0));
    p.resample = Resample::bicubic;
    p.do_center_crop = true;
    p.crop_height = p.height, p.crop_width = p.width;
    p.image_mean = {0.485f, 0.456f, 0.406f};
    p.image_std = {0.229f, 0.224f, 0.225f};
  }
  p.source = model.dir + " (no preprocessor_config.json: assumed " + p.describe() + ")";
  std::fprintf(stderr, "tessera: note: %s\n", p.source.c_str());
  return {p, p.source, c.patch_size};
}

std::vector<std::vector<Prediction>> top_k(const Tensor& logits, const std::vector<std::string>& labels,
                                           int64_t k) {
  check(logits.ndim() == 2, "logits must be [batch, classes], got " + shape_str(logits.shape()));
  const int64_t B = logits.dim(0), n = logits.dim(1);
  k = std::min(k, n);
  std::vector<std::vector<Prediction>> out(B);
  std::vector<double> prob(n);
  std::vector<int64_t> order(n);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = logits.data() + b * n;
    const float mx = *std::max_element(row, row + n);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += prob[i] = std::exp(static_cast<double>(row[i]) - mx);
    for (auto& p : prob) p /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t c) {
      return prob[a] != prob[c] ? prob[a] > prob[c] : a < c;
    });
    for (int64_t i = 0; i < k; ++i) {
      int64_t id = order[i];
      out[b].push_back({id, id < static_cast<int64_t>(labels.size()) ? labels[id] : std::to_string(id),
                        static_cast<float>(prob[id])});
    }
  }
  return out;
}

}  // namespace tessera
