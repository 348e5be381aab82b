#pragma once
// Evaluation metrics, each computed as the tool people quote computes it:
//   - detection: COCO box mAP exactly as pycocotools' COCOeval (iouType "bbox"): IoU thresholds
//     0.50:0.05:0.95, 101-point interpolated precision, maxDets 1/10/100, area ranges
//     all/small/medium/large from the ground truth's `area` field, crowd boxes matched but ignored;
//   - segmentation: a confusion matrix over pooled pixels (label 255 ignored): per-class IoU,
//     mIoU as the mean over classes that occur in the ground truth or the prediction (mmseg's
//     nanmean), pixel accuracy;
//   - classification: top-1 / top-5.
// The COCO instances loader checks a file before anything runs on it (one-line errors naming it).
#include <opencv2/core.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

// One ground-truth annotation or one detection, in COCO's terms.
struct CocoObject {
  int64_t image_id = 0;
  int64_t category_id = 0;
  double x = 0, y = 0, w = 0, h = 0;  // pixels, COCO [x, y, w, h]
  double area = 0;                    // ground truth: the annotation's area; detection: w * h
  bool crowd = false;                 // ground truth only
  double score = 0;                   // detection only
};

struct CocoEvalResult {
  // pycocotools' summarize() order: AP, AP50, AP75, AP small, AP medium, AP large, AR@1, AR@10,
  // AR@100, AR small, AR medium, AR large. -1 where nothing could be measured (as pycocotools).
  std::array<double, 12> stats{};
  std::vector<int64_t> category_ids;  // sorted
  std::vector<double> category_ap;    // AP@[.5:.95] per category (-1: no ground truth)
  double ap() const { return stats[0]; }
  double ap50() const { return stats[1]; }
  double ap75() const { return stats[2]; }
};

// COCOeval over images `image_ids` and categories `category_ids` (both as given to COCO: the
// ground truth's), ground truth `gt` and detections `dt` (detections on other images or
// categories are ignored, as they are when COCOeval is given imgIds/catIds).
CocoEvalResult coco_evaluate(std::vector<int64_t> image_ids, std::vector<int64_t> category_ids,
                             const std::vector<CocoObject>& gt, const std::vector<CocoObject>& dt);

// IoU of two [x, y, w, h] boxes as pycocotools' bbIou (crowd: intersection over the detection's area).
double coco_box_iou(const CocoObject& d, const CocoObject& g, bool crowd);

// A COCO instances file.
struct CocoImage {
  int64_t id = 0;
  std::string file_name;  // as written in the file
  std::string path;       // resolved against the JSON's folder
  int width = 0, height = 0;
};
struct CocoCategory {
  int64_t id = 0;
  std::string name;
};
struct CocoDataset {
  std::string json_path;
  std::vector<CocoImage> images;          // in file order
  std::vector<CocoObject> annotations;    // in file order
  std::vector<CocoCategory> categories;   // sorted by id
};
// Reads and checks a COCO instances JSON: images (unique ids, positive sizes), annotations (an
// existing image, a known category, a finite [x, y, w, h] with w, h >= 0 that does not leave the
// image by more than a pixel, area >= 0; a missing area is w * h), categories (unique ids).
// Errors name the file and the offending entry. Image files are not opened here.
CocoDataset load_coco_instances(const std::string& json_path);

// Pixel confusion of a segmentation run, classes [0, num_classes); ignore_label pixels skipped.
class SegmentationConfusion {
 public:
  explicit SegmentationConfusion(int64_t num_classes, int ignore_label = 255);
  // truth and predicted: same size, CV_8UC1 or CV_16UC1. A truth label that is neither a class
  // nor ignore_label is an Error (naming `source`).
  void add(const cv::Mat& truth, const cv::Mat& predicted, const std::string& source);
  int64_t num_classes() const { return n_; }
  int64_t count(int64_t truth, int64_t predicted) const { return counts_[truth * n_ + predicted]; }
  std::vector<double> class_iou() const;  // NaN for a class in neither truth nor prediction
  double mean_iou() const;                // mean over the non-NaN classes
  double pixel_accuracy() const;          // correct / counted pixels
  int64_t pixels() const;                 // counted pixels

 private:
  int64_t n_;
  int ignore_;
  std::vector<int64_t> counts_;
};

}  // namespace tessera
