// tessera data: makes data sets. `data scenes` draws detection / segmentation scenes from OpenCV's
// handwritten digits (see vision/include/tessera/scenes.hpp and the README's "Digit scenes").
#include <cfenv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "commands.hpp"
#include "tessera/atomic_file.hpp"
#include "tessera/datasets.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/metrics.hpp"
#include "tessera/pil_resize.hpp"
#include "tessera/scenes.hpp"

namespace tessera::cli {

void add_data(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("data", "Make data sets (digit scenes for detection and segmentation; sample digit cells)");
  cmd->require_subcommand(1);
  auto* scenes = cmd->add_subcommand(
      "scenes", "Digit scenes from OpenCV's digits.png: DIR/images/*.png, DIR/masks/*.png, DIR/annotations.json (COCO)");
  static std::string split = "train", out_dir, digits_png = default_digits_png(), photo_dir = default_photo_dir();
  static int64_t count = 0;
  static uint64_t seed = 0;
  static int threads = 0;
  scenes->add_option("--split", split, "train (tutorial training cells) or test (tutorial test cells)")
      ->check(CLI::IsMember({"train", "test"}));
  scenes->add_option("--count", count, "Number of scenes")->required()->check(CLI::Range(int64_t{1}, int64_t{10000000}));
  scenes->add_option("--seed", seed, "Seed: the same seed gives the same scenes");
  scenes->add_option("--out", out_dir, "Output folder")->required();
  scenes->add_option("--digits-png", digits_png, "OpenCV's samples/data/digits.png");
  scenes->add_option("--photos", photo_dir, "Folder with OpenCV's sample photos (background crops)");
  scenes->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS, else every core)");
  scenes->callback([&action] {
    action = [] {
      apply_threads(threads);
      const SceneSplit s = parse_scene_split(split);
      const SceneSource source = load_scene_source(s, digits_png, photo_dir);
      const SceneWriteSummary summary = write_scenes(source, seed, count, out_dir);
      std::printf("wrote %lld %s scenes (%lld digits, seed %llu) to %s: images/, masks/, annotations.json\n",
                  static_cast<long long>(summary.scenes), scene_split_name(s),
                  static_cast<long long>(summary.digits), static_cast<unsigned long long>(seed), out_dir.c_str());
      return 0;
    };
  });

  // Sample cells for the quick start: the first N cells of each digit in a split, enlarged.
  auto* cells = cmd->add_subcommand(
      "cells", "Cells of OpenCV's digits.png as PNGs: DIR/digit_<label>_<k>.png, the first --per-class of each digit");
  static std::string cells_split = "test", cells_out;
  static int64_t per_class = 1, scale = 3;
  cells->add_option("--split", cells_split, "test (the tutorial test cells, right 50 columns) or train")
      ->check(CLI::IsMember({"train", "test"}));
  cells->add_option("--per-class", per_class, "Cells per digit")->check(CLI::Range(int64_t{1}, int64_t{250}));
  cells->add_option("--scale", scale, "Enlargement (nearest neighbour)")->check(CLI::Range(int64_t{1}, int64_t{32}));
  cells->add_option("--out", cells_out, "Output folder")->required();
  cells->add_option("--digits-png", digits_png, "OpenCV's samples/data/digits.png");
  cells->callback([&action] {
    action = [] {
      const ClassificationData d = opencv_digits(digits_png, cells_split);
      std::filesystem::create_directories(cells_out);
      std::vector<int64_t> written(d.classes.size(), 0);
      for (size_t i = 0; i < d.size(); ++i) {
        const int64_t label = d.labels[i];
        if (written[label] >= per_class) continue;
        cv::Mat big, bgr;
        cv::resize(d.images[i], big, cv::Size(), static_cast<double>(scale), static_cast<double>(scale), cv::INTER_NEAREST);
        std::vector<uchar> png;
        check(cv::imencode(".png", big, png), cells_out + ": cannot encode a PNG");
        const std::string path = (std::filesystem::path(cells_out) / ("digit_" + d.classes[label] + "_" +
                                                                      std::to_string(written[label]) + ".png")).string();
        write_file_atomic(path, png.data(), png.size());
        ++written[label];
      }
      std::printf("wrote %lld cells per digit (%s split, %lldx) to %s\n", static_cast<long long>(per_class),
                  cells_split.c_str(), static_cast<long long>(scale), cells_out.c_str());
      return 0;
    };
  });

  // Object crops for classification: a SIZE x SIZE window centred on each box of a COCO JSON (moved
  // inside the image where it would leave it), as an ImageFolder by category name. The digit
  // scenes' crops teach a classifier digits among backgrounds and neighbours, the encoder the
  // bundled segmenter starts from (scripts/train-models.sh).
  auto* crops = cmd->add_subcommand(
      "crops", "Crops centred on the boxes of a COCO JSON: DIR/<category name>/<k>.png (an ImageFolder)");
  static std::string crops_from, crops_out;
  static int64_t crop_size = 64;
  crops->add_option("--from", crops_from, "COCO instances JSON (e.g. a data scenes folder's annotations.json)")->required();
  crops->add_option("--size", crop_size, "Side of the square window, pixels")->check(CLI::Range(int64_t{1}, int64_t{4096}));
  crops->add_option("--out", crops_out, "Output folder")->required();
  crops->callback([&action] {
    action = [] {
      const CocoDataset coco = load_coco_instances(crops_from);
      std::map<int64_t, std::string> names;
      for (const CocoCategory& c : coco.categories) names[c.id] = c.name;
      std::map<int64_t, const CocoImage*> images;
      for (const CocoImage& im : coco.images) images[im.id] = &im;
      for (const auto& [id, name] : names) {
        check(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..",
              crops_from + ": category " + std::to_string(id) + "'s name \"" + name + "\" cannot be a folder name");
        std::filesystem::create_directories(std::filesystem::path(crops_out) / name);
      }
      const int s = static_cast<int>(crop_size);
      std::fesetround(FE_TONEAREST);  // nearbyint: halves to even
      int64_t current = -1;
      cv::Mat bgr;  // empty: the current image failed, its boxes are skipped
      size_t written = 0, failed_images = 0, skipped = 0;
      for (size_t k = 0; k < coco.annotations.size(); ++k) {
        const CocoObject& a = coco.annotations[k];
        const CocoImage& im = *images.at(a.image_id);
        if (a.image_id != current) {
          current = a.image_id;
          bgr.release();
          try {  // a batch job: an image that fails is reported and skipped, the run goes on
            const cv::Mat rgb = load_image_rgb(im.path);
            check(rgb.cols >= s && rgb.rows >= s, im.path + ": " + std::to_string(rgb.cols) + "x" +
                                                      std::to_string(rgb.rows) + " is smaller than the " +
                                                      std::to_string(s) + "-pixel crop");
            cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
          } catch (const Error& e) {
            std::fprintf(stderr, "tessera: error: %s (its boxes skipped)\n", e.what());
            ++failed_images;
          }
        }
        if (bgr.empty()) {
          ++skipped;
          continue;
        }
        const int x0 = std::clamp(static_cast<int>(std::nearbyint(a.x + a.w / 2 - s / 2.0)), 0, bgr.cols - s);
        const int y0 = std::clamp(static_cast<int>(std::nearbyint(a.y + a.h / 2 - s / 2.0)), 0, bgr.rows - s);
        std::vector<uchar> png;
        check(cv::imencode(".png", bgr(cv::Rect(x0, y0, s, s)), png), crops_out + ": cannot encode a PNG");
        char file[32];
        std::snprintf(file, sizeof file, "%06zu.png", k);
        write_file_atomic((std::filesystem::path(crops_out) / names.at(a.category_id) / file).string(), png.data(),
                          png.size());
        ++written;
      }
      std::printf("wrote %zu %lldx%lld crops of %zu images to %s\n", written, static_cast<long long>(crop_size),
                  static_cast<long long>(crop_size), coco.images.size() - failed_images, crops_out.c_str());
      if (failed_images == 0) return 0;
      std::fprintf(stderr, "tessera data crops: %zu images failed, %zu boxes skipped\n", failed_images, skipped);
      return 1;
    };
  });

  // Box-part masks: every pixel inside an object's box labelled with its category and which ninth
  // (3x3) of the box it lies in. A Segmenter trained on them (with --box-loss) learns patch tokens
  // that say which object's box they are in and where in it: the encoder the digit detector's DETR
  // head is trained on (scripts/train-models.sh detector).
  auto* parts = cmd->add_subcommand(
      "box-parts", "Box-part label maps of a COCO JSON's images: DIR/masks/*.png (1 + 9·(category index) + ninth), "
                   "DIR/images (a link to the images' folder), DIR/annotations.json (the part categories)");
  static std::string parts_from, parts_out;
  static bool parts_whole = false;
  static int parts_resize = 0;
  parts->add_option("--from", parts_from, "COCO instances JSON (e.g. a data scenes folder's annotations.json)")->required();
  parts->add_option("--out", parts_out, "Output folder")->required();
  parts->add_flag("--whole", parts_whole,
                  "Whole boxes instead: every pixel of a box is 1 + its category's index, and DIR/annotations.json is "
                  "a copy of --from (its boxes are what --box-loss reads)");
  parts->add_option("--resize", parts_resize,
                    "Also resize every image to SxS as a detector's processor does (Pillow bilinear; written to "
                    "DIR/images instead of a link), its label map with the nearest pixel and its boxes in proportion: "
                    "an encoder for a detector at that input size trains on what the detector will see")
      ->check(CLI::Range(1, 4096));
  parts->callback([&action] {
    action = [] {
      namespace fs = std::filesystem;
      const CocoDataset coco = load_coco_instances(parts_from);
      const int64_t per = parts_whole ? 1 : 9;  // labels per category
      check(!coco.categories.empty() && coco.categories.size() * per + 1 <= 65535,
            parts_from + ": box parts need 1 to " + (parts_whole ? "65,534" : "7,281") + " categories, it has " +
                std::to_string(coco.categories.size()));
      std::map<int64_t, size_t> index;  // category id → its index (sorted by id)
      for (size_t i = 0; i < coco.categories.size(); ++i) index[coco.categories[i].id] = i;
      // Every image in one folder (the masks are paired with images/ by stem).
      fs::path folder;
      for (const CocoImage& im : coco.images) {
        const fs::path dir = fs::path(im.path).parent_path();
        check(folder.empty() || dir == folder, parts_from + ": its images are in more than one folder (" + folder.string() +
                                                   ", " + dir.string() + "); box-parts links one as DIR/images");
        folder = dir;
      }
      check(!coco.images.empty(), parts_from + ": no images");
      const fs::path out(parts_out);
      fs::create_directories(out / "masks");
      std::error_code ec;
      if (parts_resize > 0) {
        check(!fs::is_symlink(out / "images"), (out / "images").string() + ": a link from a run without --resize; "
                                               "remove it (or write to another folder)");
        fs::create_directories(out / "images");
        for (const CocoImage& im : coco.images) {
          cv::Mat bgr;
          cv::cvtColor(pil_resize(load_image_rgb(im.path), parts_resize, parts_resize, Resample::bilinear), bgr,
                       cv::COLOR_RGB2BGR);
          write_image_atomic((out / "images" / (fs::path(im.file_name).stem().string() + ".png")).string(), bgr);
        }
      } else if (!fs::exists(fs::symlink_status(out / "images"))) {
        fs::create_directory_symlink(fs::absolute(folder), out / "images", ec);
        check(!ec, (out / "images").string() + ": cannot link to " + folder.string() + " (" + ec.message() + ")");
      }
      std::map<int64_t, std::vector<const CocoObject*>> by_image;
      for (const CocoObject& a : coco.annotations)
        if (!a.crowd) by_image[a.image_id].push_back(&a);
      const bool wide = coco.categories.size() * per + 1 > 254;  // 255 is "ignore": 16-bit masks beyond
      std::fesetround(FE_TONEAREST);                           // nearbyint: halves to even
      for (const CocoImage& im : coco.images) {
        cv::Mat mask(im.height, im.width, wide ? CV_16U : CV_8U, cv::Scalar(0));
        for (const CocoObject* a : by_image[im.id]) {
          const int64_t base = 1 + per * static_cast<int64_t>(index.at(a->category_id));
          const int x0 = static_cast<int>(std::nearbyint(a->x)), y0 = static_cast<int>(std::nearbyint(a->y));
          const int h = static_cast<int>(a->h);
          for (int y = std::max(0, y0); y < std::min(im.height, y0 + h); ++y) {
            const int row = std::min(2, static_cast<int>(3 * (y - y0 + 0.5) / a->h));
            for (int u = 0; u < 3; ++u) {
              const int xa = x0 + static_cast<int>(std::nearbyint(u * a->w / 3));
              const int xb = std::min(im.width, x0 + static_cast<int>(std::nearbyint((u + 1) * a->w / 3)));
              const int64_t v = parts_whole ? base : base + 3 * row + u;
              for (int x = std::max(0, xa); x < xb; ++x) {
                if (wide) mask.at<uint16_t>(y, x) = static_cast<uint16_t>(v);
                else mask.at<uint8_t>(y, x) = static_cast<uint8_t>(v);
              }
            }
          }
        }
        if (parts_resize > 0)  // Pillow's NEAREST: the source pixel under each output pixel's centre
          cv::resize(cv::Mat(mask), mask, cv::Size(parts_resize, parts_resize), 0, 0, cv::INTER_NEAREST_EXACT);
        std::vector<uchar> png;
        check(cv::imencode(".png", mask, png), parts_out + ": cannot encode a PNG");
        write_file_atomic((out / "masks" / (fs::path(im.file_name).stem().string() + ".png")).string(), png.data(), png.size());
      }
      if (parts_whole) {  // the boxes themselves, for --box-loss (mask label = 1 + category index)
        std::ifstream in(parts_from, std::ios::binary);
        std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        check(in.good() || in.eof(), parts_from + ": cannot read it again to copy it");
        if (parts_resize > 0) {  // the images' new size, the boxes scaled with them (no segmentation)
          nlohmann::json j = nlohmann::json::parse(text);
          std::map<int64_t, std::pair<double, double>> scale;
          for (auto& im : j["images"]) {
            scale[im["id"].get<int64_t>()] = {static_cast<double>(parts_resize) / im["width"].get<double>(),
                                              static_cast<double>(parts_resize) / im["height"].get<double>()};
            im["width"] = parts_resize, im["height"] = parts_resize;
            // where the resized copy is: PARTS/images/<stem>.png
            im["file_name"] = "images/" + fs::path(im["file_name"].get<std::string>()).stem().string() + ".png";
          }
          for (auto& a : j["annotations"]) {
            const auto [sx, sy] = scale.at(a["image_id"].get<int64_t>());
            auto& b = a["bbox"];
            b = {b[0].get<double>() * sx, b[1].get<double>() * sy, b[2].get<double>() * sx, b[3].get<double>() * sy};
            a["area"] = b[2].get<double>() * b[3].get<double>();
            a.erase("segmentation");
          }
          text = j.dump();
        }
        write_file_atomic((out / "annotations.json").string(), text.data(), text.size());
      } else {
        nlohmann::json cats = nlohmann::json::array();
        for (size_t i = 0; i < coco.categories.size(); ++i)
          for (int p = 0; p < 9; ++p)
            cats.push_back({{"id", 1 + 9 * static_cast<int64_t>(i) + p}, {"name", coco.categories[i].name + "-" + std::to_string(p)}});
        const std::string text = nlohmann::json{{"categories", cats}}.dump();
        write_file_atomic((out / "annotations.json").string(), text.data(), text.size());
      }
      std::printf("wrote %zu %s masks (%zu classes with background) to %s\n", coco.images.size(),
                  parts_whole ? "whole-box" : "box-part", coco.categories.size() * per + 1, parts_out.c_str());
      return 0;
    };
  });
}

}  // namespace tessera::cli
