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
#include <opencv2/videoio.hpp>

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

bool is_video_name(const fs::path& p) {
  static const std::set<std::string> exts = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"};
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), ::tolower);
  return exts.count(e) != 0;
}

nlohmann::json detections_json(const std::vector<Detection>& dets) {
  nlohmann::json a = nlohmann::json::array();
  for (const Detection& d : dets)
    a.push_back({{"label", d.label}, {"name", d.name}, {"score", d.score}, {"box", {d.x0, d.y0, d.x1, d.y1}}});
  return a;
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
  static InputOptions in;
  static const InputOptionsHelp help{
      "detect", "Model folder (YolosForObjectDetection or vit-detr; default: the bundled digit detector)",
      "a video file (.mp4, .avi, ...) gives an annotated video and a JSON Lines file (one line per frame) under --out",
      "Images per forward pass (images that pre-process to one size share it; results do not depend on it; 1 with "
      "--attention)",
      1024};
  static std::string out_dir, json_file, attention_out;
  static std::vector<std::string> classes;
  static PostProcessOptions opt;
  add_input_options(cmd, in, help);
  cmd->add_option("--threshold", opt.threshold, "Keep detections with score > T (default 0.5)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--top-k", opt.top_k, "Keep the k best per image (0 = all)")->check(CLI::Range(0, 100000));
  cmd->add_option("--classes", classes, "Only these classes (ids or label names)")->delimiter(',');
  static bool nms = false, no_nms = false;
  static float nms_iou = -1, soft_nms = 0;
  static int64_t labels_per_query = 0;
  auto* nms_flag = cmd->add_flag("--nms", nms,
                                 "Class-wise (hard) non-maximum suppression above --nms-iou (default: the model's "
                                 "config.json post_process)");
  auto* no_nms_flag =
      cmd->add_flag("--no-nms", no_nms, "No non-maximum suppression, whatever the model's config says")->excludes(nms_flag);
  cmd->add_option("--nms-iou", nms_iou,
                  "Hard NMS above this IoU (turns it on; 0: no NMS, as in config.json; default: the model's, else 0.5)")
      ->check(CLI::Range(0.0, 1.0))
      ->excludes(no_nms_flag);
  cmd->add_option("--soft-nms", soft_nms,
                  "Gaussian soft-NMS with this sigma instead: overlapping boxes of a class lose score, "
                  "score * exp(-IoU^2 / sigma), rather than go")
      ->check(CLI::Range(0.001, 100.0))
      ->excludes(no_nms_flag)
      ->excludes(nms_flag)
      ->excludes("--nms-iou");
  cmd->add_option("--labels-per-query", labels_per_query,
                  "Each query's k most probable classes as k detections (default: the model's config.json "
                  "post_process, else 1)")
      ->check(CLI::Range(1, 1000));
  cmd->add_option("--out", out_dir, "Folder for the annotated images (input names mirrored)");
  cmd->add_option("--json", json_file, "COCO results file (image_id, category_id, bbox x,y,w,h, score)");
  cmd->add_option("--attention", attention_out,
                  "Also write the attention rollout from the detection tokens over each image to OUT.png "
                  "(several images: OUT_<index>_<stem>.png)");
  cmd->callback([&action] {
    action = [] {
      apply_input_options(in, help);
      const std::string& model_dir = in.model_dir;
      const std::string& processor = in.processor;
      const int64_t batch = in.batch;
      auto model = load_model(model_dir);
      require_detector(*model);
      check(attention_out.empty() || model->detection->window == 0,
            model_dir + ": --attention: its DETR encoder reads the image in windows; attention rollout needs one pass "
            "over the whole image");
      // The model's post-processing (config.json post_process), then what the command line says.
      PostProcessOptions o = model_post_process(*model);
      o.threshold = opt.threshold, o.top_k = opt.top_k;
      if (nms || nms_iou >= 0) o.nms = true, o.soft_nms_sigma = 0;  // hard NMS asked for
      if (nms_iou > 0) o.nms_iou = nms_iou;
      if (nms_iou == 0 || no_nms) o.nms = false;  // --nms-iou 0: none, as "nms_iou": 0 in config.json
      if (soft_nms > 0) o.nms = true, o.soft_nms_sigma = soft_nms;
      if (labels_per_query > 0) o.labels_per_slot = labels_per_query;
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
      std::vector<std::string> paths = expand_inputs(in.inputs);
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
      // One image's answer, from its raw detections (the attention of the forward it was in).
      auto answer = [&](size_t i, const cv::Mat& rgb, const RawDetections& raw) {
        const std::string& path = paths[i];
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
      };
      // A video: every frame detected; with --out an annotated video (MJPEG in AVI, the source's
      // size and frame rate) and a JSON Lines file, one line per frame, both published atomically
      // at the end. A frame that fails is reported (its line holds the error, the video keeps the
      // frame as it was) and the rest go on.
      auto video = [&](size_t i) {
        const std::string& path = paths[i];
        cv::VideoCapture capture(path);
        if (!capture.isOpened()) fail(path + ": cannot open as a video (unreadable, or no decoder for its format)");
        double fps = capture.get(cv::CAP_PROP_FPS);
        if (!(fps > 0 && fps < 1000)) fps = 25;
        fs::path video_out, lines_out, video_tmp, lines_tmp;
        cv::VideoWriter writer;
        std::ofstream lines;
        if (!out_dir.empty()) {
          if (!collision[i].empty()) fail(collision[i]);
          fs::path rel = out_rel[i];
          rel.replace_extension("");  // out_rel added ".png" to the video's own name
          video_out = fs::path(out_dir) / rel.replace_extension(".avi");
          lines_out = fs::path(out_dir) / rel.replace_extension(".jsonl");
          std::error_code ec;
          fs::create_directories(video_out.parent_path(), ec);
          video_tmp = video_out.parent_path() / (".tmp-" + std::to_string(::getpid()) + "-" + video_out.filename().string());
          lines_tmp = lines_out.parent_path() / (".tmp-" + std::to_string(::getpid()) + "-" + lines_out.filename().string());
          lines.open(lines_tmp, std::ios::binary | std::ios::trunc);
          if (!lines) fail(lines_out.string() + ": cannot write");
        }
        int64_t frame_no = 0, frame_failures = 0, boxes = 0;
        cv::Mat frame;
        while (capture.read(frame)) {
          nlohmann::json line = {{"frame", frame_no}};
          cv::Mat shown = frame;
          try {
            if (frame.empty() || frame.depth() != CV_8U) fail("not an 8-bit frame");
            cv::Mat rgb;
            cv::cvtColor(frame, rgb, frame.channels() == 1 ? cv::COLOR_GRAY2RGB : cv::COLOR_BGR2RGB);
            pre.check_tokens(rgb.size(), path);
            const RawDetections raw = run_detector(*model, pre, {rgb}, ws).at(0);
            const std::vector<Detection> dets = post_process(raw, model->labels, o);
            boxes += static_cast<int64_t>(dets.size());
            line["detections"] = detections_json(dets);
            if (!out_dir.empty()) {
              cv::cvtColor(rgb, shown, cv::COLOR_RGB2BGR);
              draw_detections(shown, dets, DrawOptions{});
            }
          } catch (const std::exception& e) {
            ++frame_failures;
            line["error"] = e.what();
            std::fprintf(stderr, "tessera: error: %s: frame %lld: %s\n", path.c_str(), (long long)frame_no, e.what());
          }
          if (!out_dir.empty()) {
            if (!writer.isOpened()) {
              writer.open(video_tmp.string(), cv::CAP_OPENCV_MJPEG, cv::VideoWriter::fourcc('M', 'J', 'P', 'G'), fps,
                          shown.size());
              if (!writer.isOpened()) fail(video_out.string() + ": cannot write the video");
            }
            cv::Mat out = shown;
            if (out.channels() == 1) cv::cvtColor(out, out, cv::COLOR_GRAY2BGR);
            writer.write(out);
            lines << dump_json(line, -1) << "\n";
          }
          ++frame_no;
        }
        if (frame_no == 0) fail(path + ": the video has no readable frames");
        std::printf("%s: %lld frames, %lld detections%s\n", path.c_str(), (long long)frame_no, (long long)boxes,
                    frame_failures ? (", " + std::to_string(frame_failures) + " frames failed").c_str() : "");
        if (!out_dir.empty()) {
          writer.release();
          lines.close();
          std::error_code ec;
          if (!lines) fail(lines_out.string() + ": cannot write");
          fs::rename(video_tmp, video_out, ec);
          if (!ec) fs::rename(lines_tmp, lines_out, ec);
          if (ec) fail(video_out.string() + ": cannot write (" + ec.message() + ")");
          std::printf("  annotated video: %s\n  per-frame detections: %s\n", video_out.string().c_str(),
                      lines_out.string().c_str());
        }
        if (frame_failures) fail(path + ": " + std::to_string(frame_failures) + " of " + std::to_string(frame_no) + " frames failed");
      };
      const size_t per_batch = attention_out.empty() ? static_cast<size_t>(batch) : 1;
      for (size_t i = 0; i < paths.size();) {
        if (is_video_name(paths[i])) {
          try {
            video(i);
          } catch (const std::exception& e) {
            ++failed;
            std::fprintf(stderr, "tessera: error: %s\n", e.what());
          }
          ++i;
          std::fflush(stdout);
          continue;
        }
        // Up to --batch images (not past a video): decoded, then one run_detector call.
        std::vector<size_t> members;
        std::vector<cv::Mat> rgbs;
        for (; i < paths.size() && members.size() < per_batch && !is_video_name(paths[i]); ++i) {
          try {
            cv::Mat rgb = load_image_rgb(paths[i]);
            pre.check_tokens(rgb.size(), paths[i]);  // before pre-processing allocates for it
            rgbs.push_back(std::move(rgb));
            members.push_back(i);
          } catch (const std::exception& e) {
            ++failed;
            std::fprintf(stderr, "tessera: error: %s\n", e.what());
          }
        }
        if (members.empty()) continue;
        std::vector<RawDetections> raws;
        try {
          raws = run_detector(*model, pre, rgbs, ws);
        } catch (const std::exception& e) {
          for (size_t k : members) std::fprintf(stderr, "tessera: error: %s: %s\n", paths[k].c_str(), e.what());
          failed += static_cast<int>(members.size());
          continue;
        }
        for (size_t k = 0; k < members.size(); ++k) {
          try {
            answer(members[k], rgbs[k], raws[k]);
          } catch (const std::exception& e) {
            ++failed;
            std::fprintf(stderr, "tessera: error: %s\n", e.what());
          }
        }
        std::fflush(stdout);
      }
      if (!json_file.empty())
        write_atomically(json_file, [&](const std::string& tmp) {
          std::ofstream f(tmp, std::ios::binary);
          f << dump_json(coco, 1) << "\n";
          return static_cast<bool>(f.flush());
        });
      if (failed) std::fprintf(stderr, "tessera: %d of %zu inputs failed\n", failed, paths.size());
      return failed ? 1 : 0;
    };
  });
}

}  // namespace tessera::cli
