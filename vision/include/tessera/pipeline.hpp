#pragma once
// From files to model inputs and from logits to answers: the pre-processing a model folder
// declares (preprocessor_config.json, timm's pretrained_cfg, torchvision's defaults), and top-k.
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "tessera/model.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

struct Preprocessor {
  PreprocessConfig config;
  std::string source;  // where the config came from, for messages
  // The model's patch size: load() refuses, before pre-processing, an image whose pre-processed
  // size would exceed the token budget (check_token_budget). 0: not checked here (vit_forward
  // still checks). model_preprocessor sets it; set it yourself after from_file.
  int64_t patch_size = 0;

  // Throws (naming `name`) if an input image of `size` pre-processes to more tokens than allowed.
  void check_tokens(cv::Size size, const std::string& name) const;

  static Preprocessor from_file(const std::string& preprocessor_config_json);
  Tensor image(const cv::Mat& rgb) const;          // RGB8 → [3, H, W]
  Tensor load(const std::string& path) const;      // decode + pre-process
  // Every image decoded and pre-processed, stacked into [B, 3, H, W]; all must come out the
  // same size (an Error names the first that does not).
  Tensor batch(const std::vector<std::string>& paths) const;
};

// The pre-processing the model folder declares: preprocessor_config.json (Hugging Face), the
// pretrained_cfg of a timm config, or torchvision's ImageNet defaults for its ViTs.
Preprocessor model_preprocessor(const Model& model);

struct Prediction {
  int64_t label = 0;
  std::string name;
  float probability = 0;
};

// softmax(logits[b]) → the k most probable classes of each row, most probable first (ties: lower
// class id first).
std::vector<std::vector<Prediction>> top_k(const Tensor& logits, const std::vector<std::string>& labels,
                                           int64_t k);

}  // namespace tessera
