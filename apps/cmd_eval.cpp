// tessera eval: a model's accuracy on a labelled data set, as the usual tools compute it
// (tessera/metrics.hpp). The task follows the model: classifiers get top-1 / top-5 on an
// ImageFolder or OpenCV's digits, detectors COCO box mAP on a COCO instances file, segmenters mIoU,
// per-class IoU and pixel accuracy on a folder with images/ and masks/. Everything is checked
// before the model runs; a broken entry is a one-line error naming its file.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <set>

#include "commands.hpp"
#include "tessera/atomic_file.hpp"
#include "tessera/datasets.hpp"
#include "tessera/detect_trainer.hpp"
#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/metrics.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/scenes.hpp"
#include "tessera/segmentation.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

std::string percent(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f%%", 100 * x);
  return b;
}
std::string fixed(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.4f", x);
  return b;
}

nlohmann::json eval_classify(const Model& model, const std::string& data, const std::string& digits_png, int64_t limit) {
  const ClassificationData set = load_classification_data(data, digits_png);
  size_t count = set.size();
  if (limit > 0 && static_cast<int64_t>(count) > limit) count = static_cast<size_t>(limit);
  // The data's classes are the model's labels of the same names.
  std::map<std::string, int64_t> label_id;
  for (size_t i = 0; i < model.labels.size(); ++i) label_id[model.labels[i]] = static_cast<int64_t>(i);
  std::vector<int64_t> to_model;
  for (const std::string& name : set.classes) {
    check(label_id.count(name) != 0, data + ": class '" + name + "' is not a label of " + model.dir + " (its id2label)");
    to_model.push_back(label_id[name]);
  }
  const Preprocessor pre = model_preprocessor(model);
  ModelWorkspace ws;
  int64_t top1 = 0, top5 = 0;
  const size_t batch = 64;
  for (size_t b0 = 0; b0 < count; b0 += batch) {
    const size_t n = std::min(batch, count - b0);
    std::vector<Tensor> xs;
    for (size_t i = 0; i < n; ++i) {
      xs.push_back(pre.image(set.rgb(b0 + i)));
      check(xs.back().shape() == xs.front().shape(),
            (set.paths.empty() ? set.source : set.paths[b0 + i]) + ": pre-processed to another size than the rest of its batch");
    }
    const Shape s = xs.front().shape();
    Tensor x({static_cast<int64_t>(n), s[0], s[1], s[2]});
    for (size_t i = 0; i < n; ++i) std::copy_n(xs[i].data(), xs[i].numel(), x.data() + i * xs[i].numel());
    const auto predictions = top_k(output(model_forward(model, x, ws), "logits"), model.labels, 5);
    for (size_t i = 0; i < n; ++i) {
      const int64_t truth = to_model[set.labels[b0 + i]];
      const auto& p = predictions[i];
      top1 += !p.empty() && p[0].label == truth;
      top5 += std::any_of(p.begin(), p.end(), [&](const Prediction& q) { return q.label == truth; });
    }
  }
  const double n = static_cast<double>(count);
  std::printf("top-1 %s (%lld of %zu), top-5 %s\n", percent(top1 / n).c_str(), static_cast<long long>(top1), count,
              percent(top5 / n).c_str());
  return {{"task", "classify"}, {"images", count}, {"top1", top1 / n}, {"top5", top5 / n}};
}

nlohmann::json eval_detect(const Model& model, const std::string& data, int64_t limit) {
  CocoDataset coco = load_coco_instances(data);
  if (limit > 0 && static_cast<int64_t>(coco.images.size()) > limit) coco.images.resize(static_cast<size_t>(limit));
  const CocoEvalResult r = evaluate_detector(model, coco, data);
  static const char* names[12] = {"AP",    "AP50",   "AP75",   "AP_small", "AP_medium", "AP_large",
                                  "AR1",   "AR10",   "AR100",  "AR_small", "AR_medium", "AR_large"};
  std::printf("COCO box mAP@[.5:.95] %s, AP50 %s, AP75 %s, AP small/medium/large %s / %s / %s (%zu images)\n",
              fixed(r.stats[0]).c_str(), fixed(r.stats[1]).c_str(), fixed(r.stats[2]).c_str(), fixed(r.stats[3]).c_str(),
              fixed(r.stats[4]).c_str(), fixed(r.stats[5]).c_str(), coco.images.size());
  nlohmann::json j = {{"task", "detect"}, {"images", coco.images.size()}};
  for (int i = 0; i < 12; ++i) j[names[i]] = r.stats[i];
  nlohmann::json per = nlohmann::json::object();
  for (size_t k = 0; k < r.category_ids.size(); ++k) {
    const int64_t id = r.category_ids[k];
    const auto it = std::find_if(coco.categories.begin(), coco.categories.end(), [&](const CocoCategory& c) { return c.id == id; });
    per[it->name] = r.category_ap[k];
  }
  j["per_category_AP"] = per;
  return j;
}

nlohmann::json eval_segment(const Model& model, const std::string& data, int64_t limit) {
  check(model.segmentation != nullptr, model.dir + ": not a segmentation model (tessera eval on a folder of "
                                                    "images/ and masks/ needs a Segmenter)");
  const int64_t n_cls = model.segmentation->num_classes;
  std::vector<SegmentationPair> pairs = load_segmentation_folder(data, n_cls);
  if (limit > 0 && static_cast<int64_t>(pairs.size()) > limit) pairs.resize(static_cast<size_t>(limit));
  SegmentationConfusion confusion(n_cls);
  const Preprocessor pre = model_preprocessor(model);
  ModelWorkspace ws;
  for (const SegmentationPair& pair : pairs) {
    const cv::Mat rgb = load_image_rgb(pair.image);
    const cv::Mat truth = load_label_map(pair.mask);
    check(truth.size() == rgb.size(), pair.mask + ": changed while being read");
    confusion.add(truth, segment_pixels(model, pre.image(rgb), rgb.rows, rgb.cols, ws), pair.mask);
  }
  const std::vector<double> iou = confusion.class_iou();
  std::printf("mIoU %s over %lld classes present, pixel accuracy %s (%zu images, %lld pixels)\n",
              fixed(confusion.mean_iou()).c_str(),
              static_cast<long long>(std::count_if(iou.begin(), iou.end(), [](double v) { return !std::isnan(v); })),
              percent(confusion.pixel_accuracy()).c_str(), pairs.size(), static_cast<long long>(confusion.pixels()));
  nlohmann::json per = nlohmann::json::object();
  for (int64_t c = 0; c < n_cls; ++c) {
    const std::string name = c < static_cast<int64_t>(model.labels.size()) ? model.labels[c] : std::to_string(c);
    if (!std::isnan(iou[c])) per[name] = iou[c];
    std::printf("  %-16s %s\n", name.c_str(), std::isnan(iou[c]) ? "   -  " : fixed(iou[c]).c_str());
  }
  return {{"task", "segment"}, {"images", pairs.size()}, {"mIoU", confusion.mean_iou()},
          {"pixel_accuracy", confusion.pixel_accuracy()}, {"per_class_IoU", per}};
}

}  // namespace

void add_eval(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("eval", "A model's accuracy on labelled data: top-1/top-5, COCO mAP, or mIoU");
  static std::string model_dir, data, json_file, dtype = "fp32", digits_png = default_digits_png();
  static int threads = 0;
  static int64_t limit = 0;
  cmd->add_option("--model", model_dir, "Model folder")->required();
  cmd->add_option("--data", data,
                  "classify: digits[:train|test] or an ImageFolder; detect: a COCO instances JSON; segment: a folder "
                  "with images/ and masks/")
      ->required();
  cmd->add_option("--json", json_file, "Also write the numbers to this JSON file");
  cmd->add_option("--dtype", dtype, "Weights: fp32, bf16 or int8")->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  cmd->add_option("--limit", limit, "Only the first N images");
  cmd->add_option("--digits-png", digits_png, "OpenCV's samples/data/digits.png (for --data digits)");
  cmd->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS, else every core)");
  cmd->callback([&action] {
    action = [] {
      apply_threads(threads);
      const WeightType wt = dtype == "bf16" ? WeightType::BF16 : dtype == "int8" ? WeightType::INT8 : WeightType::F32;
      const auto model = load_model(model_dir, wt);
      const auto start = std::chrono::steady_clock::now();
      std::printf("%s on %s (%s)\n", model_dir.c_str(), data.c_str(), dtype.c_str());
      nlohmann::json j;
      if (model->detection) j = eval_detect(*model, data, limit);
      else if (model->segmentation) j = eval_segment(*model, data, limit);
      else {
        check(model->classifier.kind != HeadKind::None, model_dir + ": has no classification head to evaluate");
        j = eval_classify(*model, data, digits_png, limit);
      }
      j["model"] = model_dir;
      j["data"] = data;
      j["dtype"] = dtype;
      j["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!json_file.empty()) {
        const std::string text = j.dump(1) + "\n";
        write_file_atomic(json_file, text.data(), text.size());
      }
      return 0;
    };
  });
}

}  // namespace tessera::cli
