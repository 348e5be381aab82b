// The detection training loop (tessera/detect_trainer.hpp).
#include "tessera/detect_trainer.hpp"

#include <algorithm>
#include <array>
#include <future>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>
#include <opencv2/imgproc.hpp>

#include "tessera/datasets.hpp"
#include "tessera/detection.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/image.hpp"
#include "tessera/metrics.hpp"
#include "tessera/optim.hpp"
#include "tessera/parallel.hpp"
#include "tessera/detr_train.hpp"
#include "tessera/yolos_train.hpp"
#include "train_internal.hpp"

namespace fs = std::filesystem;

namespace tessera {

DetectionData load_detection_data(const std::string& coco_json) {
  const CocoDataset coco = load_coco_instances(coco_json);
  check(!coco.images.empty(), coco_json + ": no images");
  check(!coco.categories.empty(), coco_json + ": no categories");
  DetectionData d;
  d.source = coco_json;
  for (const CocoImage& im : coco.images) {
    std::error_code ec;
    check(fs::is_regular_file(im.path, ec), im.path + ": image listed in " + coco_json + " not found");
    d.paths.push_back(im.path);
    d.targets.push_back(coco_detection_target(coco, im.id));
  }
  const int64_t max_id = coco.categories.back().id;  // sorted by id
  check(coco.categories.front().id >= 0, coco_json + ": negative category id");
  d.labels.assign(static_cast<size_t>(max_id + 1), "N/A");
  for (const CocoCategory& c : coco.categories) d.labels[static_cast<size_t>(c.id)] = c.name;
  return d;
}

int64_t detector_steps_per_epoch(const DetectionData& data, const DetectorTrainOptions& o) {
  check(o.batch > 0, "train: the batch size must be positive");
  return static_cast<int64_t>(data.size()) / o.batch;
}

int64_t detector_total_steps(const DetectionData& data, const DetectorTrainOptions& o) {
  const int64_t per_epoch = detector_steps_per_epoch(data, o);
  check(per_epoch > 0, data.source + ": " + std::to_string(data.size()) + " images make no batch of " +
                           std::to_string(o.batch));
  const int64_t all = per_epoch * o.epochs;
  return o.max_steps > 0 ? std::min(all > 0 ? all : o.max_steps, o.max_steps) : all;
}

std::vector<size_t> detector_batch_indices(const DetectionData& data, const DetectorTrainOptions& o, int64_t step) {
  return epoch_batch(data.size(), o.batch, o.shuffle, o.seed, step, data.source);
}

namespace {

// Scale about the centre and shift, keeping every box inside the image; boxes follow.
cv::Mat augment(const cv::Mat& rgb, DetectionTarget& t, const DetectionAugment& a, std::mt19937_64& rng) {
  const double W = rgb.cols, H = rgb.rows;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double s = 1.0 + a.scale * (2 * u(rng) - 1);
  // The boxes' union in pixels.
  double x0 = W, y0 = H, x1 = 0, y1 = 0;
  for (const auto& b : t.boxes) {
    x0 = std::min(x0, (b[0] - b[2] / 2) * W), x1 = std::max(x1, (b[0] + b[2] / 2) * W);
    y0 = std::min(y0, (b[1] - b[3] / 2) * H), y1 = std::max(y1, (b[1] + b[3] / 2) * H);
  }
  if (t.boxes.empty()) x0 = y0 = 0, x1 = W, y1 = H;
  if (x1 > x0 && y1 > y0) s = std::min(s, std::min(W / (x1 - x0), H / (y1 - y0)));
  const double cx = W / 2, cy = H / 2;
  // Shifts that keep the scaled union inside [0, W] x [0, H], within ±translate of the size.
  auto shift = [&](double lo_edge, double hi_edge, double c, double size) {
    const double lo = std::max(-(s * (lo_edge - c) + c), -a.translate * size);
    const double hi = std::min(size - (s * (hi_edge - c) + c), a.translate * size);
    return hi > lo ? lo + (hi - lo) * u(rng) : 0.0;
  };
  const double tx = shift(x0, x1, cx, W), ty = shift(y0, y1, cy, H);
  const cv::Matx23d m(s, 0, (1 - s) * cx + tx, 0, s, (1 - s) * cy + ty);
  // Drawn after the geometry's draws, so the geometry of a seed does not depend on them.
  const bool flip = a.hflip && u(rng) < 0.5;
  const double gain = 1.0 + a.contrast * (2 * u(rng) - 1), bias = a.brightness * (2 * u(rng) - 1) * 255.0;
  cv::Mat out;
  cv::warpAffine(rgb, out, m, rgb.size(), cv::INTER_LINEAR, cv::BORDER_REPLICATE);
  if (flip) cv::flip(out, out, 1);
  // Contrast about mid-grey, then brightness; saturating (as the classifier's augmentation).
  out.convertTo(out, -1, gain, bias + 127.5 * (1 - gain));
  for (auto& b : t.boxes) {
    const double bx = (s * (b[0] * W - cx) + cx + tx) / W, by = (s * (b[1] * H - cy) + cy + ty) / H;
    double bw = s * b[2], bh = s * b[3];
    // Clip to the image (rounding can push an edge box past it by a hair).
    double l = std::max(0.0, bx - bw / 2), r = std::min(1.0, bx + bw / 2);
    double tp = std::max(0.0, by - bh / 2), bt = std::min(1.0, by + bh / 2);
    if (flip) std::tie(l, r) = std::make_pair(1.0 - r, 1.0 - l);
    b = {static_cast<float>((l + r) / 2), static_cast<float>((tp + bt) / 2), static_cast<float>(r - l),
         static_cast<float>(bt - tp)};
  }
  return out;
}

}  // namespace

Tensor detection_batch(const DetectionData& data, const std::vector<size_t>& indices,
                       const PreprocessConfig& processor, const DetectorTrainOptions& o, int64_t step,
                       std::vector<DetectionTarget>* targets, int64_t first_position) {
  check(processor.resize_rule == ResizeRule::exact && processor.do_resize,
        "detection training resizes every image of a batch to one size: the processor must have size "
        "{\"height\", \"width\"} (yolos_preprocessor_json)");
  const int64_t B = static_cast<int64_t>(indices.size());
  const int64_t H = processor.height, W = processor.width;
  Tensor out({B, 3, H, W});
  std::vector<DetectionTarget> t(indices.size());
  parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const size_t k = indices[static_cast<size_t>(i)];
      cv::Mat rgb = load_image_rgb(data.paths[k]);
      t[i] = data.targets[k];
      if (o.augment.enabled) {
        std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull) ^
                            (static_cast<uint64_t>(first_position + i) + 0x94D049BB133111EBull));
        rgb = augment(rgb, t[i], o.augment, rng);
      }
      const Tensor x = preprocess(rgb, processor);
      check(x.dim(1) == H && x.dim(2) == W, data.paths[k] + ": pre-processed to another size than the batch's");
      std::copy_n(x.data(), x.numel(), out.data() + i * x.numel());
    }
  });
  if (targets) *targets = std::move(t);
  return out;
}

void replace_detection_labels(VitTrainModel& m, const std::vector<std::string>& labels) {
  check(m.detection || m.is_detr(), "replace_detection_labels: not a YOLOS or vit-detr model");
  check(!labels.empty(), "replace_detection_labels: no labels");
  const int64_t k1 = static_cast<int64_t>(labels.size()) + 1;
  const std::string layer = m.is_detr() ? "class_labels_classifier." : "class_labels_classifier.layers.2.";
  detail::relayout_params(
      m,
      [&](TrainParam& p) {
        if (p.name == layer + "weight") p.shape = {k1, p.shape[1]};
        if (p.name == layer + "bias") p.shape = {k1};
        return p.name.starts_with(layer);
      },
      [](const TrainParam&, float*) {});  // the new class layer stays zero
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(m.config_json);
  nlohmann::ordered_json id2label = nlohmann::ordered_json::object(), label2id = nlohmann::ordered_json::object();
  for (size_t i = 0; i < labels.size(); ++i) {
    id2label[std::to_string(i)] = labels[i];
    if (labels[i] != "N/A") label2id[labels[i]] = i;
  }
  cfg["id2label"] = id2label;
  cfg["label2id"] = label2id;
  if (cfg.contains("num_labels")) cfg["num_labels"] = labels.size();
  m.config_json = cfg.dump(2) + "\n";
  m.num_labels = static_cast<int64_t>(labels.size());
}

bool detector_caches_features(const VitTrainModel& model, const DetectionData& data, const PreprocessConfig& processor,
                               const DetectorTrainOptions& o) {
  if (!model.is_detr() || !model.frozen_encoder || o.augment.enabled || !o.cache_features) return false;
  const int64_t per_image = (processor.height / model.config.patch_size) * (processor.width / model.config.patch_size) *
                            model.config.hidden_size;
  return static_cast<double>(per_image) * 4.0 * static_cast<double>(data.size()) <= o.cache_limit_bytes;
}

namespace {

DetectorProgress detector_progress(int64_t s, int64_t total, int64_t per_epoch, double lr, const TrainStepResult& r,
                                   const SetLossResult& detail, int64_t batch) {
  DetectorProgress p;
  p.step = s + 1, p.total = total, p.epoch = s / per_epoch;
  p.loss = r.loss, p.lr = lr, p.grad_norm = r.grad_norm;
  p.class_loss = detail.layers.back().class_loss, p.l1_loss = detail.layers.back().l1_loss;
  p.giou_loss = detail.layers.back().giou_loss;
  for (const auto& m : detail.layers.back().matches) p.matched += static_cast<int64_t>(m.size());
  p.correct = r.correct, p.batch = batch;
  return p;
}

}  // namespace

void train_detector(VitTrainModel& model, VitTrainState& state, const DetectionData& data,
                    const PreprocessConfig& processor, const DetectorTrainOptions& o,
                    const std::function<void(const DetectorProgress&)>& on_step, int64_t stop_before) {
  for (const DetectionTarget& t : data.targets)
    for (int64_t label : t.labels)
      check(label >= 0 && label < model.num_labels, data.source + ": category id " + std::to_string(label) +
                                                        " but the model has " + std::to_string(model.num_labels) +
                                                        " labels");
  const int64_t total = detector_total_steps(data, o), per_epoch = detector_steps_per_epoch(data, o);
  const int64_t end = stop_before > 0 ? std::min(stop_before, total) : total;
  if (state.step < end && detector_caches_features(model, data, processor, o)) {
    // --freeze-encoder without augmentation: every image through the frozen encoder once, in file
    // order; each step then gathers its images' rows and trains the head alone.
    const int64_t gh = processor.height / model.config.patch_size, gw = processor.width / model.config.patch_size;
    const int64_t per_image = gh * gw * model.config.hidden_size, n = static_cast<int64_t>(data.size());
    std::vector<float> cache(static_cast<size_t>(n * per_image));
    {
      // The features inference gives the head (fp32 model); the head itself trains at --precision.
      DetrTrainActivations encode_acts;
      const TrainingGemmScope fp32(WeightType::F32);
      for (int64_t i0 = 0; i0 < n; i0 += o.batch) {
        std::vector<size_t> idx;
        for (int64_t i = i0; i < std::min(n, i0 + o.batch); ++i) idx.push_back(static_cast<size_t>(i));
        const Tensor x = detection_batch(data, idx, processor, o, 0, nullptr);  // no augmentation here
        detr_encode_features(model, x, encode_acts, cache.data() + i0 * per_image);
      }
    }
    std::vector<float> features(static_cast<size_t>(o.batch * per_image));
    while (state.step < end) {
      const int64_t s = state.step;
      const std::vector<size_t> idx = detector_batch_indices(data, o, s);
      std::vector<DetectionTarget> targets;
      for (size_t i = 0; i < idx.size(); ++i) {
        std::copy_n(cache.data() + static_cast<int64_t>(idx[i]) * per_image, per_image,
                    features.data() + static_cast<int64_t>(i) * per_image);
        targets.push_back(data.targets[idx[i]]);
      }
      TrainStepOptions step = o.step;
      step.lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
      SetLossResult detail;
      const TrainStepResult r = detr_train_step_features(model, state, features.data(),
                                                         static_cast<int64_t>(idx.size()), gh, gw, targets, step, &detail);
      if (on_step) on_step(detector_progress(s, total, per_epoch, step.lr, r, detail, o.batch));
    }
    return;
  }
  struct Batch {
    Tensor pixels;
    std::vector<DetectionTarget> targets;
  };
  // Every batch follows from (seed, step) alone: decoding and augmentation of batch s + 1 overlap
  // the step on batch s.
  // Data-parallel: this rank's positions of each global batch, and DETR's box normaliser.
  check(o.shards >= 1 && o.shard >= 0 && o.shard < o.shards && o.batch % o.shards == 0,
        "train: the batch of " + std::to_string(o.batch) + " does not split evenly over " + std::to_string(o.shards) +
            " ranks");
  check(o.shards == 1 || !detector_caches_features(model, data, processor, o),
        "train: cached frozen-encoder features are for one process");
  const int64_t lo = o.batch / o.shards * o.shard, nb = o.batch / o.shards;
  struct Loaded {
    Tensor pixels;
    std::vector<DetectionTarget> targets;
    double box_normaliser = 0;
  };
  auto load = [&](int64_t s) {
    Loaded b;
    const std::vector<size_t> all = detector_batch_indices(data, o, s);
    const std::vector<size_t> mine(all.begin() + lo, all.begin() + lo + nb);
    b.pixels = detection_batch(data, mine, processor, o, s, &b.targets, lo);
    if (o.shards > 1) {
      int64_t boxes = 0;  // the global batch's (augmentation keeps every box)
      for (size_t k : all) boxes += static_cast<int64_t>(data.targets[k].labels.size());
      b.box_normaliser = std::max(static_cast<double>(boxes) / o.shards, 1.0);
    }
    return b;
  };
  std::future<Loaded> next;
  if (state.step < end) next = std::async(std::launch::async, load, state.step);
  while (state.step < end) {
    const int64_t s = state.step;
    const Loaded batch = next.get();
    if (s + 1 < end) next = std::async(std::launch::async, load, s + 1);
    const Tensor& pixels = batch.pixels;
    const std::vector<DetectionTarget>& targets = batch.targets;
    TrainStepOptions step = o.step;
    step.lr = static_cast<float>(warmup_cosine_lr(s, total, o.warmup_steps, o.step.lr, o.min_lr));
    step.box_normaliser = batch.box_normaliser;
    SetLossResult detail;
    const TrainStepResult r = model.is_detr() ? detr_train_step(model, state, pixels, targets, step, &detail)
                                               : yolos_train_step(model, state, pixels, targets, step, &detail);
    DetectorProgress p = detector_progress(s, total, per_epoch, step.lr, r, detail, o.batch);
    if (o.step.comm && o.step.comm->size() > 1) {  // the global batch's loss, terms and counts (every rank)
      std::array<double, 6> v = {p.loss, p.class_loss, p.l1_loss, p.giou_loss, static_cast<double>(p.matched),
                                 static_cast<double>(p.correct)};
      o.step.comm->allreduce_sum(v);
      const double n = o.step.comm->size();
      p.loss = v[0] / n, p.class_loss = v[1] / n, p.l1_loss = v[2] / n, p.giou_loss = v[3] / n;
      p.matched = static_cast<int64_t>(v[4]), p.correct = static_cast<int64_t>(v[5]);
    }
    if (on_step) on_step(p);
  }
}

CocoEvalResult evaluate_detector(const Model& model, const std::string& coco_json, int64_t limit) {
  CocoDataset coco = load_coco_instances(coco_json);
  if (limit > 0 && static_cast<int64_t>(coco.images.size()) > limit) coco.images.resize(static_cast<size_t>(limit));
  return evaluate_detector(model, coco, coco_json);
}

CocoEvalResult evaluate_detector(const Model& model, const CocoDataset& coco, const std::string& coco_json) {
  require_detector(model);
  for (const CocoCategory& c : coco.categories)
    check(c.id < static_cast<int64_t>(model.labels.size()),
          coco_json + ": category id " + std::to_string(c.id) + " is not a class of " + model.dir + " (" +
              std::to_string(model.labels.size()) + " labels)");
  for (const CocoImage& im : coco.images) {
    std::error_code ec;
    check(std::filesystem::is_regular_file(im.path, ec), im.path + ": image listed in " + coco_json + " not found");
  }
  const Preprocessor pre = model_preprocessor(model);
  ModelWorkspace ws;
  PostProcessOptions o = model_post_process(model);  // the folder's labels per query and NMS
  o.threshold = 0.0f;
  o.top_k = 100;
  std::vector<CocoObject> dets;
  std::vector<int64_t> image_ids, category_ids;
  for (const CocoImage& im : coco.images) {
    const cv::Mat rgb = load_image_rgb(im.path);
    check(rgb.cols == im.width && rgb.rows == im.height,
          im.path + ": is " + std::to_string(rgb.cols) + "x" + std::to_string(rgb.rows) + ", " + coco_json + " says " +
              std::to_string(im.width) + "x" + std::to_string(im.height));
    const RawDetections raw = run_detector(model, pre, {rgb}, ws).at(0);
    for (const Detection& d : post_process(raw, model.labels, o)) {
      CocoObject obj;
      obj.image_id = im.id;
      obj.category_id = d.label;
      obj.x = d.x0, obj.y = d.y0, obj.w = d.x1 - d.x0, obj.h = d.y1 - d.y0;
      obj.area = obj.w * obj.h;
      obj.score = d.score;
      dets.push_back(obj);
    }
    image_ids.push_back(im.id);
  }
  for (const CocoCategory& c : coco.categories) category_ids.push_back(c.id);
  return coco_evaluate(image_ids, category_ids, coco.annotations, dets);
}

}  // namespace tessera
