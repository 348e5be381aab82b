// tessera detect: boxes for each image. Per image: a summary on stdout and (with --out) an
// annotated copy; with --json, one COCO results file for all images. A bad image is reported and
// skipped; the others still get their answer, and the exit code says that something failed.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "commands.hpp"
#include "tessera/detection.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

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
  static std::string model_dir, processor, out_dir, json_file, attention_out;
  static std::vector<std::string> images, classes;
  static PostProcessOptions opt;
  static int threads = 0;
  static int64_t max_tokens = 0;
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
  cmd->add_option("--attention", attention_out,
                  "Also write the attention rollout from the detection tokens over each image to OUT.png "
                  "(several images: OUT_<index>_<stem>.png)");
  add_max_tokens_option(cmd, max_tokens);
  cmd->add_option("images", images, "Images, folders or @list.txt")->required();
  cmd->callback([&action] {
    action = [] {
      apply_threads(threads);
      apply_max_tokens(max_tokens);
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
      pre.patch_size = model->encoder.config.patch_size;
      std::vector<std::string> paths = expand_inputs(images);
      if (paths.empty()) fail("no images found in the given inputs");
      const fs::path root = common_parent(paths);
      // --out names, decided before anything runs: two inputs that map to one name are reported
      // (the second one's overlay is not written), as segment does, never overwritten.
      std::vector<fs::path> out_rel(paths.size());
      std::vector<std::string> collision(paths.size());
      if (!out_dir.empty()) {
        std::map<std::string, size_t> owner;
        for (size_t i = 0; i < paths.size(); ++i) {
          fs::path rel = fs::path(paths[i]).lexically_normal().lexically_relative(root);
          if (rel.empty() || rel.string().rfind("..", 0) == 0) rel = fs::path(paths[i]).filename();
          static const std::set<std::string> writable = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"};
          std::string ext = rel.extension().string();
          std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
          if (!writable.count(ext)) rel += ".png";
          out_rel[i] = rel;
          auto [it, fresh] = owner.emplace(rel.generic_string(), i);
          if (!fresh)
            collision[i] = paths[i] + ": its output " + rel.generic_string() + " is already taken by " + paths[it->second];
        }
      }
      const bool numeric_ids = all_numeric_stems(paths);
      nlohmann::json coco = nlohmann::json::array();
      int failed = 0;
      ModelWorkspace ws;
      ws.vit.record_attention = !attention_out.empty();
      for (size_t i = 0; i < paths.size(); ++i) {
        const std::string& path = paths[i];
        try {
          cv::Mat rgb = load_image_rgb(path);
          pre.check_tokens(rgb.size(), path);  // before pre-processing allocates for it
          RawDetections raw = run_detector(*model, pre, {rgb}, ws).at(0);
          std::string attention_path;
          if (!attention_out.empty()) {  // from the attention recorded in that same forward pass
            const cv::Size in = preprocess_output_size(rgb.size(), pre.config);
            attention_path = attention_output_path(attention_out, i, path, paths.size());
            write_attention_map(*model, pre.config, ws.vit.attention, 0, in.height, in.width, path, attention_path);
          }
          std::vector<Detection> dets = post_process(raw, model->labels, o);
          std::printf("%s: %zu detection%s\n", path.c_str(), dets.size(), dets.size() == 1 ? "" : "s");
          for (const Detection& d : dets)
            std::printf("  %6.4f  %s (%lld)  [%.1f, %.1f, %.1f, %.1f]\n", d.score, d.name.c_str(),
                        (long long)d.label, d.x0, d.y0, d.x1, d.y1);
          if (!attention_path.empty()) std::printf("  attention map: %s\n", attention_path.c_str());
          const int64_t image_id = numeric_ids ? std::stoll(fs::path(path).stem().string())
                                               : static_cast<int64_t>(i);
          for (const Detection& d : dets)
            coco.push_back({{"image_id", image_id}, {"category_id", d.label},
                            {"bbox", {d.x0, d.y0, d.x1 - d.x0, d.y1 - d.y0}}, {"score", d.score}});
          if (!out_dir.empty()) {
            cv::Mat bgr;
            cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
            draw_detections(bgr, dets, DrawOptions{});
            if (!collision[i].empty()) fail(collision[i]);
            write_atomically(fs::path(out_dir) / out_rel[i], [&](const std::string& tmp) { return cv::imwrite(tmp, bgr); });
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
          f << dump_json(coco, 1) << "\n";
          return static_cast<bool>(f.flush());
        });
      if (failed) std::fprintf(stderr, "tessera: %d of %zu images failed\n", failed, paths.size());
      return failed ? 1 : 0;
    };
  });
}

}  // namespace tessera::cli
