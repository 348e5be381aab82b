// tessera detect: boxes for each image. Per image: a summary on stdout and (with --out) an
// annotated copy; with --json, one COCO results file for all images. A bad image is reported and
// skipped; the others still get their answer, and the exit code says that something failed.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <set>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "commands.hpp"
#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

// Minimal box drawing (tessera/draw.hpp's draw_detections replaces it once it is merged):
// a rectangle per detection and a filled "label 0.87" tag above it, colour by class id.
void draw_boxes(cv::Mat& bgr, const std::vector<Detection>& dets) {
  const double font = std::max(0.4, std::min(bgr.cols, bgr.rows) / 800.0);
  const int thick = std::max(1, static_cast<int>(std::lround(std::min(bgr.cols, bgr.rows) / 300.0)));
  for (const Detection& d : dets) {
    const uint32_t h = static_cast<uint32_t>(d.label) * 2654435761u;
    const cv::Scalar colour(64 + (h & 0x7f), 64 + ((h >> 8) & 0x7f), 64 + ((h >> 16) & 0x7f));
    cv::Point p0(static_cast<int>(std::lround(d.x0)), static_cast<int>(std::lround(d.y0)));
    cv::Point p1(static_cast<int>(std::lround(d.x1)), static_cast<int>(std::lround(d.y1)));
    cv::rectangle(bgr, p0, p1, colour, thick);
    char tag[256];
    std::snprintf(tag, sizeof tag, "%s %.2f", d.name.c_str(), d.score);
    int base = 0;
    cv::Size ts = cv::getTextSize(tag, cv::FONT_HERSHEY_SIMPLEX, font, 1, &base);
    cv::Point t0(std::max(0, p0.x), std::max(ts.height + base, p0.y));
    cv::rectangle(bgr, t0 - cv::Point(0, ts.height + base), t0 + cv::Point(ts.width, 0), colour, cv::FILLED);
    cv::putText(bgr, tag, t0 - cv::Point(0, base), cv::FONT_HERSHEY_SIMPLEX, font, cv::Scalar(255, 255, 255), 1,
                cv::LINE_AA);
  }
}

// Writes via a temporary file in the same folder and a rename: no partial file is ever left.
void write_atomically(const fs::path& path, const std::function<bool(const std::string&)>& write) {
  std::error_code ec;
  if (!path.parent_path().empty()) fs::create_directories(path.parent_path(), ec);
  fs::path tmp = path.parent_path() / (".tmp-" + std::to_string(::getpid()) + "-" + path.filename().string());
  bool ok = false;
  try {
    ok = write(tmp.string());
  } catch (const std::exception&) {
    ok = false;
  }
  if (!ok) {
    fs::remove(tmp, ec);
    fail(path.string() + ": cannot write");
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(path.string() + ": cannot write (" + ec.message() + ")");
  }
}

// The folder all inputs share, so --out mirrors their relative paths.
fs::path common_parent(const std::vector<std::string>& paths) {
  if (paths.empty()) return {};
  fs::path common = fs::path(paths[0]).lexically_normal().parent_path();
  for (const auto& p : paths) {
    fs::path parent = fs::path(p).lexically_normal().parent_path();
    while (!common.empty() && parent.lexically_relative(common).string().rfind("..", 0) == 0)
      common = common.parent_path();
  }
  return common;
}

bool all_numeric_stems(const std::vector<std::string>& paths) {
  for (const auto& p : paths) {
    std::string s = fs::path(p).stem().string();
    if (s.empty() || s.size() > 18 || !std::all_of(s.begin(), s.end(), ::isdigit)) return false;
  }
  return true;
}

}  // namespace

void add_detect(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("detect", "Detect objects: boxes, labels and scores (YOLOS, DETR heads)");
  static std::string model_dir, processor, out_dir, json_file;
  static std::vector<std::string> images, classes;
  static PostProcessOptions opt;
  static int threads = 0;
  cmd->add_option("--model", model_dir, "Model folder (YolosForObjectDetection or vit-detr)")->required();
  cmd->add_option("--threshold", opt.threshold, "Keep detections with score > T (default 0.5)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--top-k", opt.top_k, "Keep the k best per image (0 = all)")->check(CLI::Range(0, 100000));
  cmd->add_option("--classes", classes, "Only these classes (ids or label names)")->delimiter(',');
  cmd->add_flag("--nms", opt.nms, "Class-wise non-maximum suppression (off by default)");
  cmd->add_option("--nms-iou", opt.nms_iou, "IoU above which --nms suppresses")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--out", out_dir, "Folder for the annotated images (input names mirrored)");
  cmd->add_option("--json", json_file, "COCO results file (image_id, category_id, bbox x,y,w,h, score)");
  cmd->add_option("--processor", processor, "preprocessor_config.json to use instead of the folder's");
  cmd->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS or all cores)");
  cmd->add_option("images", images, "Images, folders or @list.txt")->required();
  cmd->callback([&action] {
    action = [] {
      apply_threads(threads);
      auto model = load_model(model_dir);
      require_detector(*model);
      PostProcessOptions o = opt;
      o.classes.clear();
      for (const std::string& c : classes) {
        auto it = std::find(model->labels.begin(), model->labels.end(), c);
        if (it != model->labels.end()) {
          o.classes.push_back(it - model->labels.begin());
          continue;
        }
        char* end = nullptr;
        long id = std::strtol(c.c_str(), &end, 10);
        if (c.empty() || *end != '\0' || id < 0 || id >= static_cast<long>(model->labels.size()))
          fail("--classes: '" + c + "' is neither a label of " + model_dir + " nor a class id below " +
               std::to_string(model->labels.size()));
        o.classes.push_back(id);
      }
      Preprocessor pre = processor.empty() ? model_preprocessor(*model) : Preprocessor::from_file(processor);
      std::vector<std::string> paths = expand_inputs(images);
      if (paths.empty()) fail("no images found in the given inputs");
      const fs::path root = common_parent(paths);
      const bool numeric_ids = all_numeric_stems(paths);
      nlohmann::json coco = nlohmann::json::array();
      int failed = 0;
      ModelWorkspace ws;
      for (size_t i = 0; i < paths.size(); ++i) {
        const std::string& path = paths[i];
        try {
          cv::Mat rgb = load_image_rgb(path);
          RawDetections raw = run_detector(*model, pre, {rgb}, ws).at(0);
          std::vector<Detection> dets = post_process(raw, model->labels, o);
          std::printf("%s: %zu detection%s\n", path.c_str(), dets.size(), dets.size() == 1 ? "" : "s");
          for (const Detection& d : dets)
            std::printf("  %6.4f  %s (%lld)  [%.1f, %.1f, %.1f, %.1f]\n", d.score, d.name.c_str(),
                        (long long)d.label, d.x0, d.y0, d.x1, d.y1);
          const int64_t image_id = numeric_ids ? std::stoll(fs::path(path).stem().string())
                                               : static_cast<int64_t>(i);
          for (const Detection& d : dets)
            coco.push_back({{"image_id", image_id}, {"category_id", d.label},
                            {"bbox", {d.x0, d.y0, d.x1 - d.x0, d.y1 - d.y0}}, {"score", d.score}});
          if (!out_dir.empty()) {
            cv::Mat bgr;
            cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
            draw_boxes(bgr, dets);
            fs::path rel = fs::path(path).lexically_normal().lexically_relative(root);
            if (rel.empty() || rel.string().rfind("..", 0) == 0) rel = fs::path(path).filename();
            static const std::set<std::string> writable = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"};
            std::string ext = rel.extension().string();
            std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
            if (!writable.count(ext)) rel += ".png";
            write_atomically(fs::path(out_dir) / rel, [&](const std::string& tmp) { return cv::imwrite(tmp, bgr); });
          }
        } catch (const std::exception& e) {
          ++failed;
          std::fprintf(stderr, "tessera: error: %s\n", e.what());
        }
        std::fflush(stdout);
      }
      if (!json_file.empty())
        write_atomically(json_file, [&](const std::string& tmp) {
          std::ofstream f(tmp, std::ios::binary);
          f << coco.dump(1) << "\n";
          return static_cast<bool>(f.flush());
        });
      if (failed) std::fprintf(stderr, "tessera: %d of %zu images failed\n", failed, paths.size());
      return failed ? 1 : 0;
    };
  });
}

}  // namespace tessera::cli
