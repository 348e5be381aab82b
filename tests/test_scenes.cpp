// Digit scenes (tessera data scenes): every rule of the specification checked on the scenes
// themselves — boxes recomputed from the masks, overlap, sizes, the split's cells, contrast — and
// the files the CLI writes (COCO JSON against the mask PNGs, byte-identical for any thread count).
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <set>
#include <sstream>

#include "cli_util.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/metrics.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/scenes.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

const SceneSource& source(SceneSplit split) {
  static const SceneSource train = load_scene_source(SceneSplit::Train, default_digits_png(), default_photo_dir());
  static const SceneSource test = load_scene_source(SceneSplit::Test, default_digits_png(), default_photo_dir());
  return split == SceneSplit::Train ? train : test;
}

using test::slurp;

bool same(const cv::Mat& a, const cv::Mat& b) {
  return a.size() == b.size() && a.type() == b.type() && cv::countNonZero(cv::Mat(a != b).reshape(1)) == 0;
}

// The tight box of the pixels equal to `value` inside `region` (empty if none).
cv::Rect tight_box(const cv::Mat& mask, const cv::Rect& region, int value) {
  int x0 = INT32_MAX, y0 = INT32_MAX, x1 = -1, y1 = -1;
  for (int y = region.y; y < region.y + region.height; ++y)
    for (int x = region.x; x < region.x + region.width; ++x)
      if (mask.at<uchar>(y, x) == value) x0 = std::min(x0, x), y0 = std::min(y0, y), x1 = std::max(x1, x), y1 = std::max(y1, y);
  return x1 < 0 ? cv::Rect() : cv::Rect(x0, y0, x1 - x0 + 1, y1 - y0 + 1);
}

}  // namespace

TEST_CASE("scenes: digits.png splits into the tutorial's training and test cells", "[scenes]") {
  for (SceneSplit split : {SceneSplit::Train, SceneSplit::Test}) {
    const auto cells = load_digit_cells(default_digits_png(), split);
    REQUIRE(cells.size() == 2500);
    std::vector<int> per_digit(10, 0);
    for (const DigitCell& c : cells) {
      CHECK(c.digit == c.row / 5);
      CHECK((split == SceneSplit::Train ? c.column < 50 : c.column >= 50));
      CHECK(c.pixels.size() == cv::Size(20, 20));
      ++per_digit[c.digit];
    }
    for (int n : per_digit) CHECK(n == 250);
  }
  std::set<std::string> train(scene_photo_names(SceneSplit::Train).begin(), scene_photo_names(SceneSplit::Train).end());
  for (const std::string& name : scene_photo_names(SceneSplit::Test)) CHECK(train.count(name) == 0);
  CHECK_THROWS_WITH(load_digit_cells("/nonexistent/digits.png", SceneSplit::Train),
                    Catch::Contains("/nonexistent/digits.png") && Catch::Contains("opencv-doc"));
}

TEST_CASE("scenes: every scene follows the specification", "[scenes]") {
  std::set<SceneBackground> backgrounds;
  int64_t digits = 0, with_exact_colour = 0;
  std::vector<int> counts(9, 0);
  for (SceneSplit split : {SceneSplit::Train, SceneSplit::Test}) {
    for (int64_t index = 0; index < 60; ++index) {
      INFO(scene_split_name(split) << " scene " << index);
      const Scene scene = make_scene(source(split), 0, index);
      backgrounds.insert(scene.background);
      REQUIRE(scene.image.type() == CV_8UC3);
      REQUIRE(scene.mask.type() == CV_8UC1);
      REQUIRE(scene.mask.size() == scene.image.size());
      CHECK(scene.image.cols >= 96);
      CHECK(scene.image.cols <= 320);
      CHECK(scene.image.rows >= 96);
      CHECK(scene.image.rows <= 320);
      REQUIRE(scene.digits.size() >= 1);
      REQUIRE(scene.digits.size() <= 8);
      ++counts[scene.digits.size()];
      const cv::Rect canvas(0, 0, scene.image.cols, scene.image.rows);
      int64_t ink = 0;
      for (size_t i = 0; i < scene.digits.size(); ++i) {
        const SceneDigit& d = scene.digits[i];
        CHECK(d.category_id == d.digit + 1);
        CHECK(d.digit == d.cell_row / 5);
        CHECK((split == SceneSplit::Train ? d.cell_column < 50 : d.cell_column >= 50));
        CHECK(d.height >= 16);
        CHECK(d.height <= 64);
        CHECK(std::abs(d.angle) <= 15);
        REQUIRE((d.box & canvas) == d.box);
        // The box is the tight box of the digit's mask pixels, and their count is its area.
        CHECK(tight_box(scene.mask, d.box, d.category_id) == d.box);
        const cv::Mat inside = scene.mask(d.box) == d.category_id;
        CHECK(cv::countNonZero(inside) == d.area);
        ink += d.area;
        for (size_t j = 0; j < i; ++j) CHECK((d.box & scene.digits[j].box).empty());
        // Contrast: at least 60 luma levels between the ink colour and the background under it.
        CHECK(std::abs(luma(d.colour) - d.background_luma) >= 60);
        // Solidly inked pixels carry exactly the ink colour (a thin digit shrunk may have none).
        bool exact = false;
        for (int y = d.box.y; y < d.box.y + d.box.height && !exact; ++y)
          for (int x = d.box.x; x < d.box.x + d.box.width && !exact; ++x)
            exact = scene.image.at<cv::Vec3b>(y, x) == d.colour && scene.mask.at<uchar>(y, x) == d.category_id;
        with_exact_colour += exact;
        ++digits;
      }
      // No mask pixel outside the digits' boxes.
      CHECK(cv::countNonZero(scene.mask) == ink);
    }
  }
  CHECK(backgrounds.size() == 5);
  CHECK(with_exact_colour >= digits * 9 / 10);
  for (int n = 1; n <= 8; ++n) CHECK(counts[n] > 0);
}

TEST_CASE("scenes: a scene is a function of (seed, split, index)", "[scenes]") {
  const Scene a = make_scene(source(SceneSplit::Test), 5, 3), b = make_scene(source(SceneSplit::Test), 5, 3);
  CHECK(same(a.image, b.image));
  CHECK(same(a.mask, b.mask));
  const Scene c = make_scene(source(SceneSplit::Test), 5, 4), d = make_scene(source(SceneSplit::Test), 6, 3);
  CHECK_FALSE(same(a.image, c.image));
  CHECK_FALSE(same(a.image, d.image));
  const Scene e = make_scene(source(SceneSplit::Train), 5, 3);
  CHECK_FALSE(same(a.image, e.image));
}

TEST_CASE("scenes: tessera data scenes writes COCO JSON matching its masks, the same for any thread count",
          "[scenes][cli]") {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  const fs::path dir = fs::temp_directory_path() / ("tessera_scenes_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  for (int threads : {1, 2}) {
    const std::string cmd = std::string(cli) + " data scenes --split test --count 9 --seed 11 --threads " +
                            std::to_string(threads) + " --out " + (dir / std::to_string(threads)).string() +
                            " >" + (dir.string() + "_out") + " 2>&1";
    const int status = std::system(cmd.c_str());
    INFO(slurp(dir.string() + "_out"));
    REQUIRE(WIFEXITED(status));
    REQUIRE(WEXITSTATUS(status) == 0);
  }
  const fs::path out = dir / "1";
  const nlohmann::json coco = nlohmann::json::parse(slurp(out / "annotations.json"));
  REQUIRE(coco["images"].size() == 9);
  REQUIRE(coco["categories"].size() == 10);
  for (int d = 0; d < 10; ++d) {
    CHECK(coco["categories"][d]["id"] == d + 1);
    CHECK(coco["categories"][d]["name"] == std::to_string(d));
  }
  for (const auto& image : coco["images"]) {
    const std::string name = image["file_name"];
    INFO(name);
    // Byte-identical files whatever the thread count.
    CHECK(slurp(out / name) == slurp(dir / "2" / name));
    const std::string mask_name = "masks/" + fs::path(name).filename().string();
    CHECK(slurp(out / mask_name) == slurp(dir / "2" / mask_name));
    const cv::Mat img = cv::imread((out / name).string(), cv::IMREAD_UNCHANGED);
    const cv::Mat mask = cv::imread((out / mask_name).string(), cv::IMREAD_UNCHANGED);
    REQUIRE(img.type() == CV_8UC3);
    REQUIRE(mask.type() == CV_8UC1);
    CHECK(img.cols == image["width"]);
    CHECK(img.rows == image["height"]);
    // The scene made in memory is the one on disk.
    const Scene scene = make_scene(source(SceneSplit::Test), 11, image["id"].get<int64_t>() - 1);
    CHECK(same(scene.image, img));
    CHECK(same(scene.mask, mask));
    int64_t area = 0;
    for (const auto& a : coco["annotations"]) {
      if (a["image_id"] != image["id"]) continue;
      const cv::Rect box(a["bbox"][0], a["bbox"][1], a["bbox"][2], a["bbox"][3]);
      CHECK(tight_box(mask, box, a["category_id"]) == box);
      CHECK(a["iscrowd"] == 0);
      area += a["area"].get<int64_t>();
    }
    CHECK(cv::countNonZero(mask) == area);
  }

  // data box-parts: each box filled with 1 + 9·(digit) + its ninth (row-major thirds, edges at
  // x + round(k·w/3)), 0 outside every box; the images linked, the 90 part categories named.
  {
    const std::string bp = std::string(cli) + " data box-parts --from " + (out / "annotations.json").string() + " --out " +
                           (dir / "parts").string() + " >" + (dir.string() + "_out") + " 2>&1";
    const int st = std::system(bp.c_str());
    INFO(slurp(dir.string() + "_out"));
    REQUIRE(WEXITSTATUS(st) == 0);
    CHECK(fs::equivalent(dir / "parts" / "images", out / "images"));
    const nlohmann::json cats = nlohmann::json::parse(slurp(dir / "parts" / "annotations.json"))["categories"];
    REQUIRE(cats.size() == 90);
    CHECK(cats[0]["id"] == 1);
    CHECK(cats[0]["name"] == "0-0");
    CHECK(cats[89]["id"] == 90);
    CHECK(cats[89]["name"] == "9-8");
    for (const auto& image : coco["images"]) {
      const std::string stem = fs::path(image["file_name"].get<std::string>()).stem().string();
      const cv::Mat parts = cv::imread((dir / "parts" / "masks" / (stem + ".png")).string(), cv::IMREAD_UNCHANGED);
      REQUIRE(parts.type() == CV_8UC1);
      REQUIRE(parts.cols == image["width"]);
      cv::Mat want(parts.size(), CV_8U, cv::Scalar(0));
      for (const auto& a : coco["annotations"]) {
        if (a["image_id"] != image["id"]) continue;
        const int x = a["bbox"][0], y = a["bbox"][1], w = a["bbox"][2], h = a["bbox"][3];
        const int digit = a["category_id"].get<int>() - 1;
        for (int yy = y; yy < y + h; ++yy)
          for (int xx = x; xx < x + w; ++xx) {
            const int row = std::min(2, static_cast<int>(3 * (yy - y + 0.5) / h));
            int col = 0;
            while (col < 2 && xx >= x + static_cast<int>(std::nearbyint((col + 1) * w / 3.0))) ++col;
            want.at<uint8_t>(yy, xx) = static_cast<uint8_t>(1 + 9 * digit + 3 * row + col);
          }
      }
      CHECK(same(parts, want));
    }
  }
  // data box-parts --whole: each box filled with its digit's label (1 + digit), the boxes
  // themselves copied as annotations.json (what --box-loss reads).
  {
    const std::string bp = std::string(cli) + " data box-parts --whole --from " + (out / "annotations.json").string() +
                           " --out " + (dir / "whole").string() + " >" + (dir.string() + "_out") + " 2>&1";
    const int st = std::system(bp.c_str());
    INFO(slurp(dir.string() + "_out"));
    REQUIRE(WEXITSTATUS(st) == 0);
    CHECK(fs::equivalent(dir / "whole" / "images", out / "images"));
    CHECK(slurp(dir / "whole" / "annotations.json") == slurp(out / "annotations.json"));
    for (const auto& image : coco["images"]) {
      const std::string stem = fs::path(image["file_name"].get<std::string>()).stem().string();
      const cv::Mat whole = cv::imread((dir / "whole" / "masks" / (stem + ".png")).string(), cv::IMREAD_UNCHANGED);
      REQUIRE(whole.type() == CV_8UC1);
      cv::Mat want(whole.size(), CV_8U, cv::Scalar(0));
      for (const auto& a : coco["annotations"]) {
        if (a["image_id"] != image["id"]) continue;
        const int x = a["bbox"][0], y = a["bbox"][1], w = a["bbox"][2], h = a["bbox"][3];
        want(cv::Rect(x, y, w, h)).setTo(a["category_id"].get<int>());
      }
      CHECK(same(whole, want));
    }
    // --resize 64: images as a 64x64 detector's processor resizes them, the label maps by the
    // source pixel under each output pixel's centre, the boxes scaled with the image.
    const std::string rs = std::string(cli) + " data box-parts --whole --resize 64 --from " +
                           (out / "annotations.json").string() + " --out " + (dir / "whole64").string() + " >" +
                           (dir.string() + "_out") + " 2>&1";
    const int st2 = std::system(rs.c_str());
    INFO(slurp(dir.string() + "_out"));
    REQUIRE(WEXITSTATUS(st2) == 0);
    CHECK_FALSE(fs::is_symlink(dir / "whole64" / "images"));
    const nlohmann::json small = nlohmann::json::parse(slurp(dir / "whole64" / "annotations.json"));
    // a COCO file whose images are the resized copies (what train --task detect and eval read)
    const CocoDataset resized = load_coco_instances((dir / "whole64" / "annotations.json").string());
    REQUIRE(resized.images.size() == coco["images"].size());
    for (const CocoImage& im : resized.images) {
      CHECK(fs::equivalent(fs::path(im.path).parent_path(), dir / "whole64" / "images"));
      CHECK(cv::imread(im.path).size() == cv::Size(64, 64));
    }
    REQUIRE(small["annotations"].size() == coco["annotations"].size());
    const PreprocessConfig processor = parse_preprocess_config(
        R"({"image_processor_type": "DetrImageProcessor", "do_resize": true, "size": {"height": 64, "width": 64},
            "resample": 2, "do_pad": false})", "test");
    size_t pixels_off = 0;
    for (size_t i = 0; i < coco["images"].size(); ++i) {
      const auto& image = coco["images"][i];
      const std::string stem = fs::path(image["file_name"].get<std::string>()).stem().string();
      CHECK(small["images"][i]["width"] == 64);
      CHECK(small["images"][i]["height"] == 64);
      const cv::Mat rgb = load_image_rgb((out / image["file_name"].get<std::string>()).string());
      cv::Mat want_bgr;
      cv::cvtColor(resize_and_crop(rgb, processor), want_bgr, cv::COLOR_RGB2BGR);
      CHECK(same(cv::imread((dir / "whole64" / "images" / (stem + ".png")).string(), cv::IMREAD_UNCHANGED), want_bgr));
      const cv::Mat big = cv::imread((dir / "whole" / "masks" / (stem + ".png")).string(), cv::IMREAD_UNCHANGED);
      const cv::Mat m = cv::imread((dir / "whole64" / "masks" / (stem + ".png")).string(), cv::IMREAD_UNCHANGED);
      REQUIRE(m.size() == cv::Size(64, 64));
      for (int y = 0; y < 64; ++y)
        for (int x = 0; x < 64; ++x) {
          const int sy = std::min(big.rows - 1, static_cast<int>((y + 0.5) * big.rows / 64.0));
          const int sx = std::min(big.cols - 1, static_cast<int>((x + 0.5) * big.cols / 64.0));
          pixels_off += m.at<uint8_t>(y, x) != big.at<uint8_t>(sy, sx);
        }
    }
    CHECK(pixels_off == 0);
    for (size_t k = 0; k < coco["annotations"].size(); ++k) {
      const auto& a = coco["annotations"][k];
      const auto& b = small["annotations"][k];
      double w = 0, h = 0;
      for (const auto& image : coco["images"])
        if (image["id"] == a["image_id"]) w = image["width"], h = image["height"];
      CHECK(b["bbox"][0].get<double>() == Approx(a["bbox"][0].get<double>() * 64 / w));
      CHECK(b["bbox"][1].get<double>() == Approx(a["bbox"][1].get<double>() * 64 / h));
      CHECK(b["bbox"][2].get<double>() == Approx(a["bbox"][2].get<double>() * 64 / w));
      CHECK(b["bbox"][3].get<double>() == Approx(a["bbox"][3].get<double>() * 64 / h));
    }
  }

  // data crops: one 40x40 window per box, centred on it (halves rounded to even) and moved
  // inside the image, filed under its category's name.
  const std::string cmd = std::string(cli) + " data crops --size 40 --from " + (out / "annotations.json").string() +
                          " --out " + (dir / "crops").string() + " >" + (dir.string() + "_out") + " 2>&1";
  const int status = std::system(cmd.c_str());
  INFO(slurp(dir.string() + "_out"));
  REQUIRE(WEXITSTATUS(status) == 0);
  size_t files = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir / "crops")) files += e.is_regular_file();
  CHECK(files == coco["annotations"].size());
  for (size_t k = 0; k < coco["annotations"].size(); ++k) {
    const auto& a = coco["annotations"][k];
    std::string file_name;
    for (const auto& image : coco["images"])
      if (image["id"] == a["image_id"]) file_name = image["file_name"];
    const cv::Mat img = cv::imread((out / file_name).string());
    char name[32];
    std::snprintf(name, sizeof name, "%06zu.png", k);
    const cv::Mat crop = cv::imread((dir / "crops" / std::to_string(a["category_id"].get<int>() - 1) / name).string());
    REQUIRE(crop.size() == cv::Size(40, 40));
    const double cx = a["bbox"][0].get<double>() + a["bbox"][2].get<double>() / 2;
    const double cy = a["bbox"][1].get<double>() + a["bbox"][3].get<double>() / 2;
    const int x0 = std::clamp(static_cast<int>(std::nearbyint(cx - 20)), 0, img.cols - 40);
    const int y0 = std::clamp(static_cast<int>(std::nearbyint(cy - 20)), 0, img.rows - 40);
    CHECK(same(crop, img(cv::Rect(x0, y0, 40, 40))));
  }
  // A batch job: an image that cannot be decoded is named, its boxes skipped, the others written,
  // and the exit code is 1.
  const std::string first = coco["images"][0]["file_name"];
  const std::string bytes = slurp(out / first);
  std::ofstream(out / first, std::ios::binary) << bytes.substr(0, 100);
  size_t first_boxes = 0;
  for (const auto& a : coco["annotations"]) first_boxes += a["image_id"] == coco["images"][0]["id"];
  const std::string cmd2 = std::string(cli) + " data crops --size 40 --from " + (out / "annotations.json").string() +
                           " --out " + (dir / "crops2").string() + " >" + (dir.string() + "_out") + " 2>&1";
  const int status2 = std::system(cmd2.c_str());
  const std::string log2 = slurp(dir.string() + "_out");
  INFO(log2);
  CHECK(WEXITSTATUS(status2) == 1);
  CHECK(log2.find(first) != std::string::npos);
  CHECK(log2.find("1 images failed") != std::string::npos);
  size_t files2 = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir / "crops2")) files2 += e.is_regular_file();
  CHECK(first_boxes > 0);
  CHECK(files2 == coco["annotations"].size() - first_boxes);
  fs::remove_all(dir);
  fs::remove(dir.string() + "_out");
}
