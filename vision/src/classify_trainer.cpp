// The classification training loop (tessera/classify_trainer.hpp).
#include "tessera/classify_trainer.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <future>
#include <numeric>
#include <random>

#include <opencv2/imgproc.hpp>

#include "tessera/backward.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
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
  return epoch_batch(data.size(), o.batch, o.shuffle, o.seed, step, data.source);
}

cv::Mat augment_image(const cv::Mat& rgb, const AugmentOptions& o, uint64_t seed) {
  check(rgb.depth() == CV_8U, "augment_image: 8-bit images only");
  std::mt19937_64 rng(seed);
  // Uniform draws from the raw 64-bit stream (std::uniform_real_distribution is not the same on
  // every standard library).
  auto uniform = [&](double lo, double hi) {
    return lo + (hi - lo) * static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
  };
  const double angle = uniform(-o.rotate_degrees, o.rotate_degrees) * M_PI / 180.0;
  const double scale = uniform(1 - o.scale, 1 + o.scale);
  const double shear = uniform(-o.shear, o.shear);
  const double tx = uniform(-o.translate, o.translate) * rgb.cols;
  const double ty = uniform(-o.translate, o.translate) * rgb.rows;
  const bool flip = o.hflip && uniform(0, 1) < 0.5;
  const double gain = uniform(1 - o.contrast, 1 + o.contrast);
  const double bias = uniform(-o.brightness, o.brightness) * 255.0;
  const bool blur = uniform(0, 1) < o.blur_probability;
  const double sigma = uniform(0.3, 0.9);
  // Random resized crop (torchvision's RandomResizedCrop, scale [rrc_min_scale, 1], ratio
  // [3/4, 4/3] log-uniform, 10 tries, then the central crop of the clamped ratio), drawn after
  // the scalar draws so that a run without it keeps its stream.
  cv::Rect2d crop(0, 0, rgb.cols, rgb.rows);
  if (o.rrc_min_scale > 0) {
    const double W = rgb.cols, H = rgb.rows, area = W * H;
    const double lr0 = std::log(3.0 / 4.0), lr1 = std::log(4.0 / 3.0);
    bool found = false;
    for (int attempt = 0; attempt < 10 && !found; ++attempt) {
      const double target = area * uniform(o.rrc_min_scale, 1.0);
      const double ratio = std::exp(uniform(lr0, lr1));
      const double w = std::round(std::sqrt(target * ratio)), h = std::round(std::sqrt(target / ratio));
      const double x = std::floor(uniform(0, 1) * (W - w + 1)), y = std::floor(uniform(0, 1) * (H - h + 1));
      if (w > 0 && h > 0 && w <= W && h <= H) crop = cv::Rect2d(x, y, w, h), found = true;
    }
    if (!found) {
      const double r = W / H;
      const double w = r < 3.0 / 4.0 ? W : r > 4.0 / 3.0 ? std::round(H * 4.0 / 3.0) : W;
      const double h = r < 3.0 / 4.0 ? std::round(W * 4.0 / 3.0) : r > 4.0 / 3.0 ? H : H;
      crop = cv::Rect2d(std::floor((W - w) / 2), std::floor((H - h) / 2), w, h);
    }
  }
  // The displacement field's noise comes from the same stream, after the scalar draws.
  cv::Mat dx, dy;
  if (o.elastic > 0) {
    const int side = std::min(rgb.rows, rgb.cols);
    dx.create(rgb.size(), CV_32F), dy.create(rgb.size(), CV_32F);
    for (cv::Mat* d : {&dx, &dy})
      for (int r = 0; r < d->rows; ++r)
        for (int c = 0; c < d->cols; ++c) d->at<float>(r, c) = static_cast<float>(uniform(-1, 1));
    const double s = 0.15 * side;
    const int k = 2 * static_cast<int>(std::ceil(3 * s)) + 1;
    for (cv::Mat* d : {&dx, &dy}) {
      cv::GaussianBlur(*d, *d, cv::Size(k, k), s, s, cv::BORDER_REFLECT101);
      // Normalised so the field's largest displacement is elastic·side (a smoothed uniform field's
      // amplitude shrinks with σ; this keeps the strength independent of the image size).
      double lo, hi;
      cv::minMaxLoc(*d, &lo, &hi);
      const double peak = std::max(std::abs(lo), std::abs(hi));
      if (peak > 0) *d *= o.elastic * side / peak;
    }
  }
  // dst = A·(src − c) + c + t about the centre c, A = scale · rotation · shear (· flip).
  const double cx = (rgb.cols - 1) / 2.0, cy = (rgb.rows - 1) / 2.0;
  const double ca = std::cos(angle) * scale, sa = std::sin(angle) * scale, f = flip ? -1.0 : 1.0;
  const double a00 = ca * f, a01 = ca * shear - sa, a10 = sa * f, a11 = sa * shear + ca;
  cv::Matx23d m(a00, a01, cx + tx - a00 * cx - a01 * cy,  //
                a10, a11, cy + ty - a10 * cx - a11 * cy);
  if (o.rrc_min_scale > 0) {
    // The crop stretched over the whole image (pixel edges to pixel edges) instead of the affine
    // warp, mirrored with the flip.
    const double sx = rgb.cols / crop.width, sy = rgb.rows / crop.height;
    const double ox = 0.5 * sx - 0.5 - sx * crop.x, oy = 0.5 * sy - 0.5 - sy * crop.y;  // dst = s·src + o
    m = flip ? cv::Matx23d(-sx, 0, rgb.cols - 1 - ox, 0, sy, oy) : cv::Matx23d(sx, 0, ox, 0, sy, oy);
  }
  cv::Mat out;
  cv::warpAffine(rgb, out, m, rgb.size(), cv::INTER_LINEAR, cv::BORDER_REPLICATE);
  if (o.elastic > 0) {
    cv::Mat mapx(rgb.size(), CV_32F), mapy(rgb.size(), CV_32F);
    for (int r = 0; r < rgb.rows; ++r)
      for (int c = 0; c < rgb.cols; ++c)
        mapx.at<float>(r, c) = static_cast<float>(c) + dx.at<float>(r, c),
        mapy.at<float>(r, c) = static_cast<float>(r) + dy.at<float>(r, c);
    cv::Mat warped;
    cv::remap(out, warped, mapx, mapy, cv::INTER_LINEAR, cv::BORDER_REPLICATE);
    out = warped;
  }
  if (blur) cv::GaussianBlur(out, out, cv::Size(3, 3), sigma);
  // Contrast about mid-grey, then brightness; saturating.
  out.convertTo(out, -1, gain, bias + 127.5 * (1 - gain));
  return out;
}

namespace {

// The batch of step s as in-memory images (augmented when enabled), in batch order: this rank's
// slice of it (o.shard of o.shards), each sample augmented by its position in the whole batch.
ClassificationData augmented_view(const ClassificationData& data, const ClassifierTrainOptions& o, int64_t step);

// This rank's positions [lo, hi) of a global batch.
std::pair<size_t, size_t> shard_range(const ClassifierTrainOptions& o, size_t batch) {
  check(o.shards >= 1 && o.shard >= 0 && o.shard < o.shards && batch % static_cast<size_t>(o.shards) == 0,
        "train: the batch of " + std::to_string(batch) + " does not split evenly over " + std::to_string(o.shards) +
            " ranks");
  const size_t per = batch / static_cast<size_t>(o.shards);
  return {per * static_cast<size_t>(o.shard), per * static_cast<size_t>(o.shard + 1)};
}

std::vector<size_t> shard_indices(const ClassificationData& data, const ClassifierTrainOptions& o, int64_t step) {
  const std::vector<size_t> all = batch_indices(data, o, step);
  const auto [lo, hi] = shard_range(o, all.size());
  return std::vector<size_t>(all.begin() + static_cast<std::ptrdiff_t>(lo), all.begin() + static_cast<std::ptrdiff_t>(hi));
}

}  // namespace

Tensor training_batch(const ClassificationData& data, const PreprocessConfig& processor,
                      const ClassifierTrainOptions& o, int64_t step, std::vector<int64_t>* labels) {
  const std::vector<size_t> indices = shard_indices(data, o, step);
  if (!o.augment.enabled) return classification_batch(data, indices, processor, labels);
  const ClassificationData view = augmented_view(data, o, step);
  std::vector<size_t> order(view.size());
  std::iota(order.begin(), order.end(), size_t{0});
  return classification_batch(view, order, processor, labels);
}

std::vector<int64_t> teacher_batch_labels(const ClassificationData& data, const ClassifierTrainOptions& o,
                                          int64_t step, const Model& teacher) {
  const std::vector<size_t> indices = shard_indices(data, o, step);
  const PreprocessConfig pre = model_preprocessor(teacher).config;
  Tensor x;
  if (o.augment.enabled) {
    const ClassificationData view = augmented_view(data, o, step);
    std::vector<size_t> order(view.size());
    std::iota(order.begin(), order.end(), size_t{0});
    x = classification_batch(view, order, pre);
  } else {
    x = classification_batch(data, indices, pre);
  }
  ModelWorkspace ws;
  const NamedTensors out = model_forward(teacher, x, ws);
  const Tensor& logits = output(out, "logits");
  const int64_t B = logits.dim(0), K = logits.dim(1);
  std::vector<int64_t> labels(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const float* row = logits.data() + b * K;
    labels[static_cast<size_t>(b)] = std::max_element(row, row + K) - row;
  }
  return labels;
}

namespace {

ClassificationData augmented_view(const ClassificationData& data, const ClassifierTrainOptions& o, int64_t step) {
  const std::vector<size_t> indices = batch_indices(data, o, step);
  const auto [lo, hi] = shard_range(o, indices.size());
  ClassificationData view;  // the batch's samples, augmented, as in-memory images
  view.source = data.source;
  view.classes = data.classes;
  for (size_t i = lo; i < hi; ++i) {
    const uint64_t seed = (o.seed * 0x9E3779B97F4A7C15ull) ^ (static_cast<uint64_t>(step) << 20) ^ i ^
                          0xA0761D6478BD642Full;
    view.images.push_back(augment_image(data.rgb(indices[i]), o.augment, seed));
    view.labels.push_back(data.labels[indices[i]]);
  }
  return view;
}

}  // namespace

void train_classifier(VitTrainModel& model, VitTrainState& state, const ClassificationData& data,
                      const PreprocessConfig& processor, const ClassifierTrainOptions& o,
                      const std::function<void(const TrainProgress&)>& on_step,
                      int64_t stop_before) {
  for (int64_t label : data.labels)
    check(label >= 0 && label < model.num_labels,
          data.source + ": class " + std::to_string(label) + " but the model has " +
              std::to_string(model.num_labels) + " labels");
  const int64_t total = total_steps(data, o), per_epoch = steps_per_epoch(data, o);
  const int64_t end = stop_before > 0 ? std::min(stop_before, total) : total;
  check(!o.teacher || model.teacher, "a teacher is for a DeiT with a distillation head (DeiTForImageClassificationWithTeacher)");
  if (o.teacher)
    check(static_cast<int64_t>(o.teacher->labels.size()) == model.num_labels,
          o.teacher->dir + ": the teacher has " + std::to_string(o.teacher->labels.size()) + " labels, the student " +
              std::to_string(model.num_labels));
  struct Batch {
    Tensor pixels;
    std::vector<int64_t> labels, teacher_labels;
  };
  auto load = [&](int64_t s) {
    Batch b;
    {
      // The batch's loops run on this thread alone, beside the step. Through the arena, its
      // loop waited for a slot there and was run by the step's own threads, e.g. at the end of
      // the sub-batch halves, which each keep one thread to themselves (parallel_tasks) and so
      // took it up only as they finished, the other thread waiting. Digits ViT (0.4 ms of
      // loading a 22 ms step), 2 threads, 10 alternating rounds: +2% images/s, 1 thread -1%.
      const SerialScope on_this_thread;
      b.pixels = training_batch(data, processor, o, s, &b.labels);
    }
    if (model.teacher) b.teacher_labels = o.teacher ? teacher_batch_labels(data, o, s, *o.teacher) : b.labels;
    return b;
  };
  // Decoding and augmentation of batch s + 1 overlap the step on batch s.
  std::future<Batch> next;
  if (state.step < end) next = std::async(std::launch::async, load, state.step);
  while (state.step < end) {
    const int64_t s = state.step;
    Batch batch = next.get();
    if (s + 1 < end) next = std::async(std::launch::async, load, s + 1);
    const Tensor& pixels = batch.pixels;
    const std::vector<int64_t>& labels = batch.labels;
    TrainStepOptions step = o.step;
    step.lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
    const TrainStepResult r =
        vit_train_step(model, state, pixels, labels, step, model.teacher ? &batch.teacher_labels : nullptr);
    double loss = r.loss, correct = static_cast<double>(r.correct);
    if (o.step.comm && o.step.comm->size() > 1) {  // the global batch's loss and count, for the log
      std::array<double, 2> both = {loss, correct};
      o.step.comm->allreduce_sum(both);
      loss = both[0] / o.step.comm->size(), correct = both[1];
    }
    if (on_step)
      on_step({s + 1, total, s / per_epoch, loss, step.lr, r.grad_norm, static_cast<int64_t>(correct), o.batch});
  }
}

void train_linear_probe(VitTrainModel& model, VitTrainState& state, const ClassificationData& data,
                        const PreprocessConfig& processor, const ClassifierTrainOptions& o,
                        const std::function<void(const TrainProgress&)>& on_step, int64_t stop_before, double* encode_seconds) {
  check(!model.teacher, "--freeze-encoder: a DeiT with teacher has two heads; fine-tune it whole, or load it as "
                        "DeiTForImageClassification");
  for (int64_t label : data.labels)
    check(label >= 0 && label < model.num_labels,
          data.source + ": class " + std::to_string(label) + " but the model has " +
              std::to_string(model.num_labels) + " labels");
  const int64_t K = model.num_labels, N = static_cast<int64_t>(data.size());
  const int64_t F = (model.class_mean ? 2 : 1) * model.config.hidden_size;
  // The encoder runs once per sample: the classifier's input, cached.
  std::vector<float> features(static_cast<size_t>(N * F));
  const auto encode_start = std::chrono::steady_clock::now();
  {
    const TrainingGemmScope fp32(WeightType::F32);  // the features inference gives the head (fp32 model)
    VitTrainActivations acts;
    for (int64_t lo = 0; lo < N; lo += 64) {
      std::vector<size_t> idx;
      for (int64_t i = lo; i < std::min(N, lo + 64); ++i) idx.push_back(static_cast<size_t>(i));
      const Tensor x = classification_batch(data, idx, processor);
      (void)vit_train_forward(model, x, acts);
      std::copy_n(acts.head_in.data(), idx.size() * F, features.data() + lo * F);
    }
  }
  if (encode_seconds)
    *encode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - encode_start).count();
  const size_t n = model.weights.size();
  if (state.grads.size() != n) state.grads.assign(n, 0.0f), state.m.assign(n, 0.0f), state.v.assign(n, 0.0f);
  if (state.v.size() != n) state.v.assign(n, 0.0f);
  VitTrainView w = bind_view(model, model.weights.data());
  const size_t w_off = static_cast<size_t>(w.head_w - model.weights.data());
  const size_t b_off = static_cast<size_t>(w.head_b - model.weights.data());
  const size_t w_len = static_cast<size_t>(K * F), b_len = static_cast<size_t>(K);
  const int64_t total = total_steps(data, o), per_epoch = steps_per_epoch(data, o);
  const int64_t end = stop_before > 0 ? std::min(stop_before, total) : total;
  std::vector<float> logits, dlogits;
  std::vector<int64_t> labels;
  while (state.step < end) {
    const int64_t s = state.step;
    const std::vector<size_t> idx = batch_indices(data, o, s);
    const int64_t B = static_cast<int64_t>(idx.size());
    labels.resize(B);
    logits.assign(static_cast<size_t>(B * K), 0.0f);
    dlogits.assign(static_cast<size_t>(B * K), 0.0f);
    int64_t correct = 0;
    for (int64_t b = 0; b < B; ++b) {
      labels[b] = data.labels[idx[b]];
      const float* x = features.data() + idx[b] * F;
      for (int64_t k = 0; k < K; ++k) {
        double z = w.head_b[k];
        for (int64_t f = 0; f < F; ++f) z += static_cast<double>(w.head_w[k * F + f]) * x[f];
        logits[b * K + k] = static_cast<float>(z);
      }
      const float* row = logits.data() + b * K;
      correct += std::max_element(row, row + K) - row == labels[b];
    }
    const double loss = cross_entropy_forward_backward(logits.data(), labels.data(), B, K, o.step.label_smoothing,
                                                       dlogits.data());
    std::span<float> g(state.grads);
    std::fill(g.begin(), g.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t b = 0; b < B; ++b) {
        const float d = dlogits[b * K + k];
        const float* x = features.data() + idx[b] * F;
        g[b_off + k] += d;
        for (int64_t f = 0; f < F; ++f) g[w_off + k * F + f] += d * x[f];
      }
    const double norm = clip_grad_norm(g, o.step.clip_grad);  // only the head's entries are non-zero
    const float lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
    ++state.step;
    std::span<float> weights(model.weights), m(state.m), v(state.v);
    if (o.step.optimizer == Optimizer::AdamW) {
      AdamWOptions a;
      a.lr = lr, a.beta1 = o.step.beta1, a.beta2 = o.step.beta2, a.eps = o.step.eps;
      a.weight_decay = o.step.weight_decay;
      AdamWOptions bias = a;
      bias.weight_decay = 0.0f;  // biases take no decay
      adamw_step(weights, g, m, v, state.step,
                 std::vector<AdamWSegment>{{static_cast<int64_t>(w_off), static_cast<int64_t>(w_len), a},
                                           {static_cast<int64_t>(b_off), static_cast<int64_t>(b_len), bias}});
    } else {
      const bool mom = o.step.momentum != 0.0f;
      sgd_step(weights.subspan(w_off, w_len), g.subspan(w_off, w_len), mom ? m.subspan(w_off, w_len) : std::span<float>{},
               lr, o.step.momentum, o.step.weight_decay, state.step == 1);
      sgd_step(weights.subspan(b_off, b_len), g.subspan(b_off, b_len), mom ? m.subspan(b_off, b_len) : std::span<float>{},
               lr, o.step.momentum, 0.0f, state.step == 1);
    }
    if (on_step) on_step({s + 1, total, s / per_epoch, loss, lr, norm, correct, B});
  }
}

}  // namespace tessera
