#pragma once
// Labelled data for training and evaluation. Classification, as issue 13's `--data` names it: a folder laid out as
// torchvision's ImageFolder, or OpenCV's handwritten digits with the tutorial's split. Samples stay
// files (or small in-memory images) until a batch asks for them; a batch goes through the model's
// own pre-processing (preprocess.hpp), so training sees what inference will.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "tessera/metrics.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/set_loss.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

struct ClassificationData {
  std::string source;                // what it was read from, for messages
  std::vector<std::string> classes;  // label id → class name
  std::vector<int64_t> labels;       // one per sample
  std::vector<std::string> paths;    // one per sample (files), or empty (in-memory images)
  std::vector<cv::Mat> images;       // one per sample (8-bit gray or RGB), or empty (files)
  size_t size() const { return labels.size(); }
  // Sample i as 8-bit RGB (decoded from its file, or the in-memory image, gray replicated).
  cv::Mat rgb(size_t i) const;
};

// torchvision's ImageFolder: one sub-folder per class, classes sorted by name (label = index),
// every image file below a class folder (recursively; .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
// .webp, any case), sorted by path. Errors name the folder: not a folder, no class folders, a
// class folder without images.
ClassificationData image_folder(const std::string& dir);

// OpenCV's samples/data/digits.png (50 rows × 100 columns of 20×20 cells, row r holds digit r/5)
// with the tutorial's split: "train" the left 50 columns of every row, "test" the right 50, ""
// all 5000. Classes "0" … "9".
ClassificationData opencv_digits(const std::string& png_path, const std::string& split = "");

// The samples of training step `step` (from 0) over `samples` samples in batches of `batch`
// (the last partial batch of an epoch dropped): batch step mod (samples / batch) of epoch
// step / (samples / batch), the epoch's order a Fisher-Yates permutation from a mt19937_64 seeded
// by (seed, epoch) when shuffling, else 0, 1, 2, ... The same on every platform, and a function of
// the step alone, so a resumed run sees the batches an uninterrupted one would. Every trainer
// (classify, detect, segment) draws its batches here. `what` names the data in the error when
// no full batch fits.
std::vector<size_t> epoch_batch(size_t samples, int64_t batch, bool shuffle, uint64_t seed, int64_t step,
                                const std::string& what);

// Decodes every file sample once (in parallel) so that a corrupt, truncated or unreadable image is
// an Error naming it (the first in path order) before training starts. In-memory data passes.
void verify_images(const ClassificationData& data);

// `--data`: "digits", "digits:train" or "digits:test" (read from digits_png), else an ImageFolder.
ClassificationData load_classification_data(const std::string& spec, const std::string& digits_png);

// The samples at `indices` through the processor, stacked into [B, 3, H, W] (every sample must come
// out the same size: an Error names the first that does not); their labels into *labels if given.
Tensor classification_batch(const ClassificationData& data, const std::vector<size_t>& indices,
                            const PreprocessConfig& processor, std::vector<int64_t>* labels = nullptr);

// ------------------------------------------------------------------ detection and segmentation

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
  // Object boxes, COCO [x, y, w, h] in the image's pixels (attach_segmentation_boxes); empty: none.
  std::vector<std::array<double, 4>> boxes;
};
std::vector<SegmentationPair> load_segmentation_folder(const std::string& dir, int64_t num_classes = 0);
// Each pair's boxes from a COCO instances JSON of the same images (matched by file name, folders
// ignored; crowd annotations skipped, categories ignored): what `train --task segment --box-loss`
// regresses. An image of the folder that the JSON does not list is an Error naming both files.
void attach_segmentation_boxes(std::vector<SegmentationPair>& pairs, const std::string& coco_json);

}  // namespace tessera
