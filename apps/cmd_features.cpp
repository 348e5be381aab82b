// tessera features: the encoder's patch features for images (safetensors), and with --pca the
// DINOv2-style pictures: the first three principal components of the patch tokens of all the
// given images together, as RGB, upsampled onto each image, beside an overlay. A bad image is
// reported and skipped; the exit code says that something failed.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "commands.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/features.hpp"
#include "tessera/image.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

// Bytes outside printable ASCII as %XX: a lossless, valid-UTF-8 form of any file name.
std::string percent_encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '%') {
      out += static_cast<char>(c);
    } else {
      char b[4];
      std::snprintf(b, sizeof b, "%%%02X", c);
      out += b;
    }
  }
  return out;
}

// The patch-grid picture on the original image: nearest-neighbour onto the region the model saw,
// black elsewhere.
cv::Mat upsample_onto(const cv::Mat& grid, const PatchFeatures& f) {
  cv::Mat out(f.original, CV_8UC3, cv::Scalar(0, 0, 0));
  const cv::Rect target(static_cast<int>(std::lround(f.region.x)), static_cast<int>(std::lround(f.region.y)),
                        std::max(1, static_cast<int>(std::lround(f.region.width))),
                        std::max(1, static_cast<int>(std::lround(f.region.height))));
  cv::Mat big;
  cv::resize(grid, big, target.size(), 0, 0, cv::INTER_NEAREST);
  const cv::Rect inside = target & cv::Rect(0, 0, out.cols, out.rows);
  if (!inside.empty()) big(inside - target.tl()).copyTo(out(inside));
  return out;
}

}  // namespace

void add_features(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("features", "Patch features (safetensors) and their PCA pictures");
  static InputOptions in;
  static const InputOptionsHelp help{"", "Model folder (any ViT Tessera loads)", "",
                                     "Images per forward pass (same-size neighbours share it; results do not depend on it)"};
  static std::string out_file, pca_dir;
  static double background = 0;
  add_input_options(cmd, in, help);
  cmd->add_option("--out", out_file, "Write the features here: features.<i> [gh, gw, D] per image (safetensors)");
  cmd->add_option("--pca", pca_dir, "Write <stem>_pca.png and <stem>_pca_overlay.jpg per image into this folder");
  cmd->add_option("--background", background,
                  "With --pca: tokens whose first component (normalised to [0, 1]) is below this are background "
                  "(black; colours from the foreground's own PCA). 0 = off")
      ->check(CLI::Range(0.0, 1.0));
  cmd->callback([&action] {
    action = [] {
      apply_input_options(in, help);
      const std::string& model_dir = in.model_dir;
      if (out_file.empty() && pca_dir.empty()) fail("features: nothing to write (give --out FILE and/or --pca DIR)");
      const auto model = load_model(model_dir);
      Preprocessor pre = in.processor.empty() ? model_preprocessor(*model) : Preprocessor::from_file(in.processor);
      pre.patch_size = model->encoder.config.patch_size;
      const std::vector<std::string> paths = expand_inputs(in.inputs);
      if (paths.empty()) fail("no images found in the given inputs");
      ModelWorkspace ws;
      std::vector<PatchFeatures> features;
      std::vector<std::string> done;
      std::vector<cv::Mat> originals;
      int failed = 0;
      auto report = [&](const std::string& path, const cv::Mat& rgb, PatchFeatures f) {
        const Tensor& t = f.tokens;
        std::printf("%s: %lld x %lld patches x %lld features\n", path.c_str(), (long long)t.dim(0), (long long)t.dim(1),
                    (long long)t.dim(2));
        features.push_back(std::move(f));
        done.push_back(path);
        if (!pca_dir.empty()) originals.push_back(rgb);
      };
      auto failure = [&](const std::exception& e) {
        ++failed;
        std::fprintf(stderr, "tessera: error: %s\n", e.what());
      };
      // Up to --batch decoded images at a time; same-size neighbours share a forward pass.
      for (size_t lo = 0; lo < paths.size(); lo += static_cast<size_t>(in.batch)) {
        std::vector<std::string> names;
        std::vector<cv::Mat> images;
        for (size_t i = lo; i < std::min(paths.size(), lo + static_cast<size_t>(in.batch)); ++i) {
          try {
            const cv::Mat rgb = load_image_rgb(paths[i]);
            pre.check_tokens(rgb.size(), paths[i]);
            images.push_back(rgb);
            names.push_back(paths[i]);
          } catch (const std::exception& e) {
            failure(e);
          }
        }
        if (images.empty()) continue;
        std::vector<PatchFeatures> batch;
        try {
          batch = patch_features(*model, pre, images, ws);
        } catch (const std::exception&) {
          // One image at a time, so the error names the one that failed.
          for (size_t i = 0; i < images.size(); ++i) {
            try {
              report(names[i], images[i], patch_features(*model, pre, images[i], ws));
            } catch (const std::exception& e) {
              failure(e);
            }
          }
          continue;
        }
        for (size_t i = 0; i < images.size(); ++i) report(names[i], images[i], std::move(batch[i]));
      }
      if (!out_file.empty() && !features.empty()) {
        std::vector<std::pair<std::string, Tensor>> tensors;
        std::map<std::string, std::string> meta = {{"model", percent_encode(model_dir)}};
        for (size_t i = 0; i < features.size(); ++i) {
          tensors.emplace_back("features." + std::to_string(i), features[i].tokens);
          meta["image." + std::to_string(i)] = percent_encode(done[i]);
        }
        save_safetensors(out_file, tensors, meta);
        std::printf("features of %zu image%s: %s\n", features.size(), features.size() == 1 ? "" : "s", out_file.c_str());
      }
      if (!pca_dir.empty() && !features.empty()) {
        std::error_code ec;
        fs::create_directories(pca_dir, ec);
        if (ec) fail(pca_dir + ": cannot create the folder (" + ec.message() + ")");
        const std::vector<cv::Mat> pictures = pca_pictures(features, background);
        std::map<std::string, int> seen;
        for (size_t i = 0; i < features.size(); ++i) {
          std::string stem = fs::path(done[i]).stem().string();
          if (seen[stem]++) stem += "_" + std::to_string(i);  // two inputs with one name
          const cv::Mat pca = upsample_onto(pictures[i], features[i]);
          cv::Mat bgr, overlay;
          cv::cvtColor(originals[i], bgr, cv::COLOR_RGB2BGR);
          cv::addWeighted(bgr, 0.45, pca, 0.55, 0.0, overlay);
          write_image_atomic((fs::path(pca_dir) / (stem + "_pca.png")).string(), pca);
          write_image_atomic((fs::path(pca_dir) / (stem + "_pca_overlay.jpg")).string(), overlay);
        }
        std::printf("PCA pictures (first three components as RGB, over all %zu images): %s\n", features.size(),
                    pca_dir.c_str());
      }
      if (failed) std::fprintf(stderr, "tessera: %d of %zu images failed\n", failed, paths.size());
      return failed ? 1 : 0;
    };
  });
}

}  // namespace tessera::cli
