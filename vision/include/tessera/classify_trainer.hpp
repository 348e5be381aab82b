#pragma once
// The classification training loop on the training pass (vit_train.hpp): epochs of shuffled
// batches from a ClassificationData through the model's processor, one vit_train_step each, with
// warm-up + cosine. The order of every epoch is a seeded permutation of (seed, epoch), so the batch
// of step s follows from s alone: a run resumed at a checkpoint's step (save_train_checkpoint)
// sees the same batches and ends bit-identical, for any thread count.
#include <cstdint>
#include <functional>

#include "tessera/datasets.hpp"
#include "tessera/model.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/vit_train.hpp"

namespace tessera {

// Training-time augmentation of one 8-bit RGB sample, before the model's processor: an affine
// warp about the centre (rotation, scale, shear, translation as a fraction of the side; borders
// replicated), an optional horizontal flip, brightness/contrast jitter and an occasional light
// blur. Every draw comes from a generator seeded by `seed` alone, so a sample's augmentation
// depends only on (run seed, step, position in the batch): any thread count, any resume point.
struct AugmentOptions {
  bool enabled = false;  // off unless asked for (tessera train turns it on; --no-augment keeps it off)
  double rotate_degrees = 10, scale = 0.10, shear = 0.15, translate = 0.08;
  bool hflip = false;  // off by default: digits and text are not mirror-symmetric
  double brightness = 0.2, contrast = 0.2, blur_probability = 0.25;
  // Elastic distortion (Simard et al. 2003, the classic handwriting augmentation): a random
  // displacement field, uniform in [-1, 1] per pixel, smoothed by a Gaussian of σ = 0.15·side and
  // scaled by elastic·side pixels. 0: off.
  double elastic = 0.0;
  // > 0: a random resized crop (torchvision's RandomResizedCrop: area fraction in
  // [rrc_min_scale, 1], aspect ratio in [3/4, 4/3]) stretched back over the image replaces the
  // affine warp (the usual ImageNet-style fine-tuning augmentation, e.g. 0.08). 0: off.
  double rrc_min_scale = 0.0;
};
cv::Mat augment_image(const cv::Mat& rgb, const AugmentOptions& options, uint64_t seed);

struct ClassifierTrainOptions {
  int64_t epochs = 1;
  int64_t max_steps = 0;  // > 0: stop after this many steps in all (else epochs decide)
  int64_t batch = 32;     // the last partial batch of an epoch is dropped
  bool shuffle = true;
  uint64_t seed = 0;
  int64_t warmup_steps = 0;  // linear warm-up, then cosine to min_lr (warmup_cosine_lr)
  double min_lr = 0.0;
  TrainStepOptions step;  // optimizer, peak lr (step.lr), weight decay, clipping, smoothing ...
  AugmentOptions augment;  // augment.enabled false: every sample goes through the processor only
  // A DeiT with teacher (DeiTForImageClassificationWithTeacher) trains on DeiT's hard-distillation
  // loss, ½·CE(class head, label) + ½·CE(distillation head, the teacher's label): the teacher's
  // label is the argmax of this classifier (any folder load_model reads, with the data's classes
  // as its labels) on the same augmented image through its own processor. Without one, the
  // distillation head learns the true labels (a teacher that is always right).
  const Model* teacher = nullptr;
  // Data-parallel training (step.comm): this process is rank `shard` of `shards` and takes
  // positions [shard·B/shards, (shard + 1)·B/shards) of every global batch of `batch` (B must be a
  // multiple of shards), each augmented as in a one-process run; the gradients are averaged over
  // the ranks by the step, and the progress reports the global batch's loss and count.
  int shard = 0, shards = 1;
};

// The teacher's labels for the batch of step s (training_batch's samples, augmented alike):
// the argmax of `teacher` on each through its own processor.
std::vector<int64_t> teacher_batch_labels(const ClassificationData& data, const ClassifierTrainOptions& options,
                                          int64_t step, const Model& teacher);

// The batch of step s as training sees it: the samples of batch_indices(s), augmented (when
// enabled) with seeds from (seed, s, position), through the processor.
Tensor training_batch(const ClassificationData& data, const PreprocessConfig& processor,
                      const ClassifierTrainOptions& options, int64_t step, std::vector<int64_t>* labels);

struct TrainProgress {
  int64_t step = 0, total = 0, epoch = 0;  // step counts from 1 here
  double loss = 0, lr = 0, grad_norm = 0;
  int64_t correct = 0, batch = 0;
};

int64_t steps_per_epoch(const ClassificationData& data, const ClassifierTrainOptions& options);
int64_t total_steps(const ClassificationData& data, const ClassifierTrainOptions& options);
// The samples of step s (from 0): batch s mod steps_per_epoch of epoch s / steps_per_epoch.
std::vector<size_t> batch_indices(const ClassificationData& data, const ClassifierTrainOptions& options,
                                  int64_t step);

// Runs steps state.step .. total_steps − 1 (all of them for a fresh state; the rest after a
// restored checkpoint), calling on_step after each (the next batch is decoded and augmented on
// another thread meanwhile); `stop_before` > 0 stops earlier, at that step,
// as a killed run would (the schedule stays the whole run's). Labels must be below the model's
// num_labels.
void train_classifier(VitTrainModel& model, VitTrainState& state, const ClassificationData& data,
                      const PreprocessConfig& processor, const ClassifierTrainOptions& options,
                      const std::function<void(const TrainProgress&)>& on_step = {},
                      int64_t stop_before = 0);

// --freeze-encoder: a linear probe. Every sample goes through the frozen encoder once (no
// augmentation: the features are cached, [N, head input]) and only the classifier (weight and
// bias) trains on them, with the same batches, schedule, optimiser and clipping as
// train_classifier; every other weight stays bit-identical. Resumes from a checkpoint like
// train_classifier (the features are recomputed). Not for a DeiT with teacher. *encode_seconds
// (when given): the wall time of the encoding pass.
void train_linear_probe(VitTrainModel& model, VitTrainState& state, const ClassificationData& data,
                        const PreprocessConfig& processor, const ClassifierTrainOptions& options,
                        const std::function<void(const TrainProgress&)>& on_step = {},
                        int64_t stop_before = 0, double* encode_seconds = nullptr);

}  // namespace tessera
