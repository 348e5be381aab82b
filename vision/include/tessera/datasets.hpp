#pragma once
// Labelled data sets as training and evaluation read them. Each loader checks everything it can
// before any model runs, and an error names the file (and the entry) and what is wrong.
//   - ImageFolder: one sub-folder per class, classes sorted by name (torchvision's ImageFolder);
//   - OpenCV's digits (digits.png, the tutorial's split: scenes.hpp's load_digit_cells);
//   - COCO instances JSON (metrics.hpp's load_coco_instances) → per-image detection targets as
//     transformers' DETR / YOLOS processors make them;
//   - segmentation folders: images/ and masks/ with the same stems, 8- or 16-bit label PNGs.
#include <opencv2/core.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/metrics.hpp"
#include "tessera/set_loss.hpp"

namespace tessera {

struct LabelledImage {
  std::string path;    // the file, or "digits.png[row,column]" for a digit cell
  cv::Mat rgb;         // set when the image is already in memory (digit cells), else empty
  int64_t label = 0;   // index into the data set's classes
};
struct ClassificationData {
  std::vector<std::string> classes;  // class names, index = label
  std::vector<LabelledImage> images;
};
// "digits", "digits:train", "digits:test" (OpenCV's digits.png at `digits_png`; "digits" = test),
// or an ImageFolder. Error for a folder without class sub-folders or images.
ClassificationData load_classification_data(const std::string& data, const std::string& digits_png);

// A COCO image's annotations as the DETR / YOLOS processors prepare them
// (prepare_coco_detection_annotation): crowd annotations dropped, [x, y, w, h] turned into corners
// and clipped to the image, empty boxes dropped, then (normalize_annotation) centre boxes divided by
// the image's width and height. Labels are the category ids, as in DETR and YOLOS.
DetectionTarget coco_detection_target(const CocoDataset& coco, int64_t image_id);

// images/ and masks/ of a segmentation data set, paired by stem (sorted). Error (naming the file)
// for an empty images/, an image without a mask, a mask that is not a one-channel 8- or 16-bit
// PNG, or one whose size differs from its image's; `num_classes` > 0 also checks every label is a
// class or 255 (ignore). Decodes every pair once to check it.
struct SegmentationPair {
  std::string image, mask;
};
std::vector<SegmentationPair> load_segmentation_folder(const std::string& dir, int64_t num_classes = 0);

}  // namespace tessera
