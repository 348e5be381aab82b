#pragma once
// The detection training loop (`tessera train --task detect`): batches from a COCO instances JSON
// through the model's processor, optional augmentation, a seeded shuffle per epoch, warm-up +
// cosine, one yolos_train_step per batch. Every batch is one fixed size: the processor must resize
// every image to exactly its size {"height", "width"} (yolos_preprocessor_json), not keep aspect
// ratios (the real YOLOS processors' shortest_edge rule makes images of different sizes, which a
// batch would pad). Targets are normalised centre boxes, so the aspect change leaves them as they are.
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/metrics.hpp"
#include "tessera/model.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/set_loss.hpp"
#include "tessera/vit_train.hpp"

namespace tessera {

// A COCO instances file as training reads it: every image (in file order) with its target as the
// processors make it (coco_detection_target: crowd dropped, clipped, empty boxes dropped, centre
// boxes normalised by the image size, label = category id).
struct DetectionData {
  std::string source;                    // the JSON's path
  std::vector<std::string> paths;        // image files, resolved against the JSON's folder
  std::vector<DetectionTarget> targets;  // one per image
  std::vector<std::string> labels;       // label id → category name ("N/A" for ids no category has)
  size_t size() const { return paths.size(); }
};
// Errors (naming the file) for a missing image file, no images, or no categories.
DetectionData load_detection_data(const std::string& coco_json);

// Augmentation (off: the processor alone). Each image, with its own generator seeded by
// (seed, step, position in the batch): scaled by a factor in [1 − scale, 1 + scale] about its centre
// (smaller when the boxes would not fit) and shifted by up to `translate` of its size, as far as
// every box stays inside the image; uncovered borders replicate the edge. Boxes move with it.
// Then, with hflip, a horizontal flip of half the images (boxes mirrored; off by default: digits
// and text are not mirror-symmetric), and colour jitter: contrast about mid-grey by a factor in
// [1 − contrast, 1 + contrast], brightness by ±brightness·255, saturating.
struct DetectionAugment {
  bool enabled = true;
  double scale = 0.25, translate = 0.2;
  bool hflip = false;
  double brightness = 0.2, contrast = 0.2;
};

struct DetectorTrainOptions {
  int64_t epochs = 1;
  int64_t max_steps = 0;  // > 0: stop after this many steps in all
  int64_t batch = 16;     // the last partial batch of an epoch is dropped
  bool shuffle = true;
  uint64_t seed = 0;
  int64_t warmup_steps = 0;
  double min_lr = 0.0;
  DetectionAugment augment;
  TrainStepOptions step;  // optimizer, peak lr, weight decay, clipping
  // A DETR head on a frozen encoder without augmentation encodes each image once and trains on
  // the cached features (the same steps, the encoder's forward not repeated) when they fit here.
  bool cache_features = true;
  double cache_limit_bytes = 8.0 * (1ull << 30);
  // Data-parallel training (step.comm): rank `shard` of `shards` takes positions
  // [shard·B/shards, (shard + 1)·B/shards) of every global batch, each augmented as in a
  // one-process run. As DETR's distributed SetCriterion: the box terms are divided by the global
  // batch's box count / ranks (so the averaged box gradients are the global batch's), the class
  // term is each rank's own weighted mean, and the step averages the ranks' gradients.
  int shard = 0, shards = 1;
};

struct DetectorProgress {
  int64_t step = 0, total = 0, epoch = 0;  // step counts from 1; epoch from 0
  double loss = 0, lr = 0, grad_norm = 0;
  double class_loss = 0, l1_loss = 0, giou_loss = 0;  // the set loss's terms (unweighted)
  int64_t matched = 0, correct = 0, batch = 0;  // matched queries; those whose best class is right
};

int64_t detector_steps_per_epoch(const DetectionData& data, const DetectorTrainOptions& options);
int64_t detector_total_steps(const DetectionData& data, const DetectorTrainOptions& options);
// The images of step `step` (from 0): a Fisher-Yates shuffle seeded by (seed, epoch), as
// classify_trainer's batch_indices.
std::vector<size_t> detector_batch_indices(const DetectionData& data, const DetectorTrainOptions& options,
                                           int64_t step);

// The images at `indices` (augmented for step `step` when options.augment.enabled; the i-th by
// its position first_position + i in the global batch) through the processor into [B, 3, H, W],
// their targets into *targets. Error if the processor does not make
// one size for all (see above).
Tensor detection_batch(const DetectionData& data, const std::vector<size_t>& indices,
                       const PreprocessConfig& processor, const DetectorTrainOptions& options, int64_t step,
                       std::vector<DetectionTarget>* targets, int64_t first_position = 0);

// Fine-tuning a YOLOS or vit-detr model on data of other classes: a new class head for `labels`
// (label id i → labels[i], "N/A" for ids no category has): YOLOS's last class MLP layer or the
// DETR head's class linear, [len + 1, D] (the last row no-object), zero-initialised (every class
// equally likely at first, as a new classifier head); config.json's num_labels, id2label and
// label2id rewritten. Every other weight is kept; start a new optimiser state.
void replace_detection_labels(VitTrainModel& model, const std::vector<std::string>& labels);

// Whether train_detector trains on cached encoder features (see DetectorTrainOptions).
bool detector_caches_features(const VitTrainModel& model, const DetectionData& data, const PreprocessConfig& processor,
                              const DetectorTrainOptions& options);

// Runs steps state.step .. total − 1 (the rest after a restored checkpoint: bit-identical to an
// uninterrupted run), calling on_step after each; stop_before > 0 stops at that step.
void train_detector(VitTrainModel& model, VitTrainState& state, const DetectionData& data,
                    const PreprocessConfig& processor, const DetectorTrainOptions& options,
                    const std::function<void(const DetectorProgress&)>& on_step, int64_t stop_before = 0);

// COCO box evaluation of an inference model (load_model) on a COCO instances file, as `tessera
// eval` runs it: each image through the model's own processor and its own post-processing
// (model_post_process: labels per query, NMS; threshold 0, at most 100 per image), COCOeval over
// the file's images and categories.
// limit > 0: only the first `limit` images.
// Every image is checked first (present, and of the size the file says), as an Error naming it.
CocoEvalResult evaluate_detector(const Model& model, const std::string& coco_json, int64_t limit = 0);
// The same on a loaded file (`source` names it in errors), all of its images.
CocoEvalResult evaluate_detector(const Model& model, const CocoDataset& coco, const std::string& source);

}  // namespace tessera
