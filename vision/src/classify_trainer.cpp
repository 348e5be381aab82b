// The classification training loop (tessera/classify_trainer.hpp).
#include "tessera/classify_trainer.hpp"

#include <algorithm>
#include <numeric>
#include <random>

#include "tessera/error.hpp"
#include "tessera/optim.hpp"

namespace tessera {

int64_t steps_per_epoch(const ClassificationData& data, const ClassifierTrainOptions& o) {
  check(o.batch > 0, "train: the batch size must be positive");
  return static_cast<int64_t>(data.size()) / o.batch;
}

int64_t total_steps(const ClassificationData& data, const ClassifierTrainOptions& o) {
  const int64_t per_epoch = steps_per_epoch(data, o);
  check(per_epoch > 0, data.source + ": " + std::to_string(data.size()) +
                           " samples make no batch of " + std::to_string(o.batch));
  const int64_t all = per_epoch * o.epochs;
  return o.max_steps > 0 ? std::min(all > 0 ? all : o.max_steps, o.max_steps) : all;
}

std::vector<size_t> batch_indices(const ClassificationData& data, const ClassifierTrainOptions& o,
                                  int64_t step) {
  const int64_t per_epoch = steps_per_epoch(data, o);
  check(per_epoch > 0, data.source + ": no full batch");
  const int64_t epoch = step / per_epoch, first = (step % per_epoch) * o.batch;
  std::vector<size_t> order(data.size());
  std::iota(order.begin(), order.end(), size_t{0});
  if (o.shuffle) {
    // Fisher-Yates on a mt19937_64 seeded by (seed, epoch): the same on every platform.
    std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch) + 1);
    for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
  }
  return {order.begin() + first, order.begin() + first + o.batch};
}

void train_classifier(VitTrainModel& model, VitTrainState& state, const ClassificationData& data,
                      const PreprocessConfig& processor, const ClassifierTrainOptions& o,
                      const std::function<void(const TrainProgress&)>& on_step,
                      int64_t stop_before) {
  for (int64_t label : data.labels)
    check(label >= 0 && label < model.num_labels,
          data.source + ": class " + std::to_string(label) + " but the model has " +
              std::to_string(model.num_labels) + " labels");
  const int64_t total = total_steps(data, o), per_epoch = steps_per_epoch(data, o);
  std::vector<int64_t> labels;
  const int64_t end = stop_before > 0 ? std::min(stop_before, total) : total;
  while (state.step < end) {
    const int64_t s = state.step;
    const Tensor pixels = classification_batch(data, batch_indices(data, o, s), processor, &labels);
    TrainStepOptions step = o.step;
    step.lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
    const TrainStepResult r = vit_train_step(model, state, pixels, labels, step);
    if (on_step)
      on_step({s + 1, total, s / per_epoch, r.loss, step.lr, r.grad_norm, r.correct, o.batch});
  }
}

}  // namespace tessera
