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
};

// Hugging Face post_process_object_detection for one image: softmax over num_labels + 1, score and
// label = max/argmax over the real classes, keep score > threshold, boxes cx,cy,w,h → x0,y0,x1,y1
// scaled by (width, height). Results in slot order unless top_k or nms reorder them (by score).
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

}  // namespace tessera
