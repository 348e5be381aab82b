// Digit scenes (see scenes.hpp for the specification).
#include "tessera/scenes.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <random>

#include "tessera/atomic_file.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/parallel.hpp"

namespace fs = std::filesystem;

namespace tessera {

namespace {

constexpr int kMinCanvas = 96, kMaxCanvas = 320;
constexpr int kMaxDigits = 8;
constexpr double kMinHeight = 16, kMaxHeight = 64;
constexpr double kMaxAngle = 15;
constexpr double kMinContrast = 60;

// The scene's random numbers: std::mt19937_64 (fully specified by the standard) with our own
// distributions (the standard library's are implementation-defined), so a seed gives the same
// scene with any compiler.
class SceneRng {
 public:
  explicit SceneRng(uint64_t seed) : engine_(seed) {}
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double a, double b) { return a + (b - a) * uniform(); }
  int64_t integer(int64_t lo, int64_t hi) {  // [lo, hi]
    return lo + static_cast<int64_t>(engine_() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool chance(double p) { return uniform() < p; }
  double normal() {  // Box-Muller
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  std::mt19937_64 engine_;
};

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t scene_seed(uint64_t seed, SceneSplit split, int64_t index) {
  return splitmix(splitmix(splitmix(seed) ^ (split == SceneSplit::Train ? 0x7261696eull : 0x74657374ull)) ^
                  static_cast<uint64_t>(index));
}

cv::Vec3b random_colour(SceneRng& rng) {
  return cv::Vec3b(static_cast<uchar>(rng.integer(0, 255)), static_cast<uchar>(rng.integer(0, 255)),
                   static_cast<uchar>(rng.integer(0, 255)));
}

uchar clamp_byte(double v) { return static_cast<uchar>(std::lround(std::clamp(v, 0.0, 255.0))); }

// --- backgrounds ---------------------------------------------------------------------------

cv::Mat flat_background(SceneRng& rng, cv::Size size) {
  const cv::Vec3b c = random_colour(rng);
  return cv::Mat(size, CV_8UC3, cv::Scalar(c[0], c[1], c[2]));
}

cv::Mat gradient_background(SceneRng& rng, cv::Size size) {
  const cv::Vec3b a = random_colour(rng), b = random_colour(rng);
  const double theta = rng.uniform(0, 6.283185307179586);
  const double dx = std::cos(theta), dy = std::sin(theta);
  // Projections of the corners bound t's range, so the gradient spans the whole canvas.
  double lo = 1e300, hi = -1e300;
  for (int cy : {0, size.height - 1})
    for (int cx : {0, size.width - 1}) {
      lo = std::min(lo, cx * dx + cy * dy);
      hi = std::max(hi, cx * dx + cy * dy);
    }
  cv::Mat out(size, CV_8UC3);
  for (int y = 0; y < size.height; ++y)
    for (int x = 0; x < size.width; ++x) {
      const double t = hi > lo ? (x * dx + y * dy - lo) / (hi - lo) : 0.0;
      cv::Vec3b& p = out.at<cv::Vec3b>(y, x);
      for (int c = 0; c < 3; ++c) p[c] = clamp_byte(a[c] + t * (b[c] - a[c]));
    }
  return out;
}

cv::Mat noise_background(SceneRng& rng, cv::Size size) {
  const cv::Vec3b base = random_colour(rng);
  const double sigma = rng.uniform(4, 30);
  const bool grey = rng.chance(0.5);
  cv::Mat out(size, CV_8UC3);
  for (int y = 0; y < size.height; ++y)
    for (int x = 0; x < size.width; ++x) {
      cv::Vec3b& p = out.at<cv::Vec3b>(y, x);
      const double shared = sigma * rng.normal();
      for (int c = 0; c < 3; ++c) p[c] = clamp_byte(base[c] + (grey ? shared : sigma * rng.normal()));
    }
  return out;
}

cv::Mat ruled_paper_background(SceneRng& rng, cv::Size size) {
  const double tint = rng.uniform(0, 20);
  const cv::Vec3b paper(clamp_byte(rng.uniform(225, 255) - tint), clamp_byte(rng.uniform(230, 255)),
                        clamp_byte(rng.uniform(230, 255)));
  cv::Mat out(size, CV_8UC3, cv::Scalar(paper[0], paper[1], paper[2]));
  const double darker = rng.uniform(40, 90);
  const cv::Vec3b line(clamp_byte(paper[0] - darker * 0.4), clamp_byte(paper[1] - darker * 0.8),
                       clamp_byte(paper[2] - darker));  // bluish rules
  const int spacing = static_cast<int>(rng.integer(10, 28));
  const int thickness = rng.chance(0.25) ? 2 : 1;
  for (int y = static_cast<int>(rng.integer(0, spacing - 1)); y < size.height; y += spacing)
    for (int t = 0; t < thickness && y + t < size.height; ++t)
      for (int x = 0; x < size.width; ++x) out.at<cv::Vec3b>(y + t, x) = line;
  if (rng.chance(0.5)) {  // a red margin line
    const int mx = static_cast<int>(rng.integer(size.width / 12, size.width / 5));
    for (int y = 0; y < size.height; ++y) out.at<cv::Vec3b>(y, mx) = cv::Vec3b(70, 70, 210);
  }
  return out;
}

cv::Mat photo_background(SceneRng& rng, cv::Size size, const std::vector<cv::Mat>& photos) {
  const cv::Mat& photo = photos[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(photos.size()) - 1))];
  // A crop 0.6x to 2x the canvas (as far as the photo allows), resized to the canvas with OpenCV's
  // bit-exact bilinear filter; at most 2x down, so bilinear does not alias much.
  const double zoom = rng.uniform(0.6, 2.0);
  const int cw = std::clamp(static_cast<int>(std::lround(size.width * zoom)), 1, photo.cols);
  const int ch = std::clamp(static_cast<int>(std::lround(size.height * zoom)), 1, photo.rows);
  const int x0 = static_cast<int>(rng.integer(0, photo.cols - cw));
  const int y0 = static_cast<int>(rng.integer(0, photo.rows - ch));
  cv::Mat out;
  cv::resize(photo(cv::Rect(x0, y0, cw, ch)), out, size, 0, 0, cv::INTER_LINEAR_EXACT);
  if (rng.chance(0.5)) cv::flip(out, out, 1);
  // Photos are busy: soften the contrast (towards the crop's mean) so a digit stays legible.
  const double keep = rng.uniform(0.45, 1.0);
  const cv::Scalar mean = cv::mean(out);
  for (int y = 0; y < out.rows; ++y)
    for (int x = 0; x < out.cols; ++x) {
      cv::Vec3b& p = out.at<cv::Vec3b>(y, x);
      for (int c = 0; c < 3; ++c) p[c] = clamp_byte(mean[c] + keep * (p[c] - mean[c]));
    }
  return out;
}

// --- one digit --------------------------------------------------------------------------------

// A digit cell scaled and rotated: ink coverage (0..255 scale of the cell) on a patch with a
// margin, in double precision (bilinear, zero outside the cell).
struct DigitPatch {
  cv::Mat value;     // CV_64FC1
  double cell_max = 0;
  cv::Rect ink;      // tight box of value > cell_max / 2
  cv::Rect support;  // tight box of value > 0
};

DigitPatch render_digit(const cv::Mat& cell, double height, double angle_deg) {
  DigitPatch out;
  std::vector<cv::Point> nz;
  cv::findNonZero(cell, nz);
  if (nz.empty()) return out;
  const cv::Rect crop = cv::boundingRect(nz);
  double mn = 0;
  cv::minMaxLoc(cell, &mn, &out.cell_max);
  const double s = height / crop.height;
  const double a = angle_deg * 3.141592653589793 / 180.0, ca = std::cos(a), sa = std::sin(a);
  const double sw = crop.width * s, sh = crop.height * s;
  const int pw = static_cast<int>(std::ceil(std::abs(ca) * sw + std::abs(sa) * sh)) + 4;
  const int ph = static_cast<int>(std::ceil(std::abs(sa) * sw + std::abs(ca) * sh)) + 4;
  out.value = cv::Mat::zeros(ph, pw, CV_64FC1);
  const double src_cx = crop.x + crop.width / 2.0, src_cy = crop.y + crop.height / 2.0;
  const double dst_cx = pw / 2.0, dst_cy = ph / 2.0;
  auto at = [&](int y, int x) -> double {
    return (x < 0 || y < 0 || x >= cell.cols || y >= cell.rows) ? 0.0 : cell.at<uchar>(y, x);
  };
  for (int y = 0; y < ph; ++y)
    for (int x = 0; x < pw; ++x) {
      // The destination pixel's centre, rotated back and unscaled into the cell.
      const double dx = x + 0.5 - dst_cx, dy = y + 0.5 - dst_cy;
      const double u = (ca * dx + sa * dy) / s + src_cx - 0.5;
      const double v = (-sa * dx + ca * dy) / s + src_cy - 0.5;
      const int u0 = static_cast<int>(std::floor(u)), v0 = static_cast<int>(std::floor(v));
      const double fu = u - u0, fv = v - v0;
      out.value.at<double>(y, x) = (1 - fv) * ((1 - fu) * at(v0, u0) + fu * at(v0, u0 + 1)) +
                                   fv * ((1 - fu) * at(v0 + 1, u0) + fu * at(v0 + 1, u0 + 1));
    }
  int ix0 = pw, iy0 = ph, ix1 = -1, iy1 = -1, sx0 = pw, sy0 = ph, sx1 = -1, sy1 = -1;
  for (int y = 0; y < ph; ++y)
    for (int x = 0; x < pw; ++x) {
      const double v = out.value.at<double>(y, x);
      if (v > 0) sx0 = std::min(sx0, x), sy0 = std::min(sy0, y), sx1 = std::max(sx1, x), sy1 = std::max(sy1, y);
      if (v > out.cell_max / 2) ix0 = std::min(ix0, x), iy0 = std::min(iy0, y), ix1 = std::max(ix1, x), iy1 = std::max(iy1, y);
    }
  if (ix1 >= 0) out.ink = cv::Rect(ix0, iy0, ix1 - ix0 + 1, iy1 - iy0 + 1);
  if (sx1 >= 0) out.support = cv::Rect(sx0, sy0, sx1 - sx0 + 1, sy1 - sy0 + 1);
  return out;
}

// A colour whose luma is `target` (0..255): grey, or a random hue brought to that luma.
cv::Vec3b colour_with_luma(SceneRng& rng, double target, bool grey) {
  if (grey) {
    const uchar g = clamp_byte(target);
    return cv::Vec3b(g, g, g);
  }
  // HSV with full value and random saturation, then scaled (darker) or mixed with white (lighter):
  // both are linear in luma, so the target is met up to rounding.
  const double h = rng.uniform(0, 6), sat = rng.uniform(0.5, 1.0);
  const double f = h - std::floor(h), p = 1 - sat, q = 1 - sat * f, t = 1 - sat * (1 - f);
  double r = 1, g = 1, b = 1;
  switch (static_cast<int>(h)) {
    case 0: r = 1, g = t, b = p; break;
    case 1: r = q, g = 1, b = p; break;
    case 2: r = p, g = 1, b = t; break;
    case 3: r = p, g = q, b = 1; break;
    case 4: r = t, g = p, b = 1; break;
    default: r = 1, g = p, b = q; break;
  }
  double c[3] = {b * 255, g * 255, r * 255};
  const double y0 = 0.114 * c[0] + 0.587 * c[1] + 0.299 * c[2];
  if (target <= y0) {
    for (double& v : c) v *= target / y0;
  } else {
    const double m = (target - y0) / (255 - y0);
    for (double& v : c) v += m * (255 - v);
  }
  return cv::Vec3b(clamp_byte(c[0]), clamp_byte(c[1]), clamp_byte(c[2]));
}

}  // namespace

double luma(const cv::Vec3b& bgr) { return 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]; }

SceneSplit parse_scene_split(const std::string& name) {
  if (name == "train") return SceneSplit::Train;
  if (name == "test") return SceneSplit::Test;
  fail("unknown split '" + name + "' (expected train or test)");
}

const char* scene_split_name(SceneSplit split) { return split == SceneSplit::Train ? "train" : "test"; }

const char* scene_background_name(SceneBackground b) {
  switch (b) {
    case SceneBackground::Flat: return "flat";
    case SceneBackground::Gradient: return "gradient";
    case SceneBackground::Noise: return "noise";
    case SceneBackground::RuledPaper: return "ruled-paper";
    case SceneBackground::Photo: return "photo";
  }
  return "?";
}

std::string default_digits_png() { return default_photo_dir() + "/digits.png"; }
std::string default_photo_dir() { return "/usr/share/doc/opencv-doc/examples/data"; }

const std::vector<std::string>& scene_photo_names(SceneSplit split) {
  // Photographs without text or digits in them (a digit in a background would be an unlabelled
  // object); two disjoint lists of distinct scenes.
  static const std::vector<std::string> train = {
      "aero1.jpg",    "aloeL.jpg",  "baboon.jpg",  "basketball1.png", "building.jpg",     "butterfly.jpg",
      "chicky_512.png", "fruits.jpg", "home.jpg", "leuvenA.jpg",     "squirrel_cls.jpg", "starry_night.jpg"};
  static const std::vector<std::string> test = {"apple.jpg",  "ela_original.jpg", "HappyFish.jpg",
                                                "orange.jpg", "smarties.png",     "stuff.jpg"};
  return split == SceneSplit::Train ? train : test;
}

std::vector<DigitCell> load_digit_cells(const std::string& digits_png, SceneSplit split) {
  std::error_code ec;
  check(fs::is_regular_file(digits_png, ec),
        digits_png + ": OpenCV's digits.png not found (Debian: apt-get install opencv-doc, or scripts/install-deps.sh)");
  const cv::Mat all = cv::imread(digits_png, cv::IMREAD_GRAYSCALE);
  check(!all.empty(), digits_png + ": cannot decode the digits image");
  check(all.cols == 2000 && all.rows == 1000, digits_png + ": expected OpenCV's 2000x1000 digits.png, got " +
                                                  std::to_string(all.cols) + "x" + std::to_string(all.rows));
  std::vector<DigitCell> cells;
  const int c0 = split == SceneSplit::Train ? 0 : 50;
  for (int r = 0; r < 50; ++r)
    for (int c = c0; c < c0 + 50; ++c) {
      DigitCell cell;
      cell.pixels = all(cv::Rect(c * 20, r * 20, 20, 20)).clone();
      cell.digit = r / 5;
      cell.row = r;
      cell.column = c;
      cells.push_back(std::move(cell));
    }
  return cells;
}

SceneSource load_scene_source(SceneSplit split, const std::string& digits_png, const std::string& photo_dir) {
  SceneSource source;
  source.split = split;
  source.cells = load_digit_cells(digits_png, split);
  for (const std::string& name : scene_photo_names(split)) {
    const std::string path = (fs::path(photo_dir) / name).string();
    std::error_code ec;
    check(fs::is_regular_file(path, ec),
          path + ": background photo not found (Debian: apt-get install opencv-doc, or pass --photos DIR)");
    cv::Mat photo = cv::imread(path, cv::IMREAD_COLOR);
    check(!photo.empty(), path + ": cannot decode the background photo");
    source.photos.push_back(std::move(photo));
  }
  return source;
}

Scene make_scene(const SceneSource& source, uint64_t seed, int64_t index) {
  check(!source.cells.empty(), "digit scenes: no digit cells loaded");
  SceneRng rng(scene_seed(seed, source.split, index));
  const cv::Size size(static_cast<int>(rng.integer(kMinCanvas, kMaxCanvas)),
                      static_cast<int>(rng.integer(kMinCanvas, kMaxCanvas)));
  Scene scene;
  const int kinds = source.photos.empty() ? 4 : 5;
  scene.background = static_cast<SceneBackground>(rng.integer(0, kinds - 1));
  cv::Mat background;
  switch (scene.background) {
    case SceneBackground::Flat: background = flat_background(rng, size); break;
    case SceneBackground::Gradient: background = gradient_background(rng, size); break;
    case SceneBackground::Noise: background = noise_background(rng, size); break;
    case SceneBackground::RuledPaper: background = ruled_paper_background(rng, size); break;
    case SceneBackground::Photo: background = photo_background(rng, size, source.photos); break;
  }
  scene.image = background.clone();
  scene.mask = cv::Mat::zeros(size, CV_8UC1);
  const int wanted = static_cast<int>(rng.integer(1, kMaxDigits));
  std::vector<cv::Rect> taken;  // placed digits' supports, one pixel wider on each side
  for (int d = 0; d < wanted; ++d) {
    bool placed = false;
    for (int attempt = 0; attempt < 24 && !placed; ++attempt) {
      const DigitCell& cell = source.cells[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(source.cells.size()) - 1))];
      // Later attempts allow only smaller digits, so crowded canvases still fill up.
      const double max_h = std::max(kMinHeight, kMaxHeight - 2.0 * attempt);
      const double height = rng.uniform(kMinHeight, max_h);
      const double angle = rng.uniform(-kMaxAngle, kMaxAngle);
      const DigitPatch patch = render_digit(cell.pixels, height, angle);
      if (patch.ink.empty() || patch.support.width > size.width || patch.support.height > size.height) continue;
      for (int tries = 0; tries < 16 && !placed; ++tries) {
        const int ox = static_cast<int>(rng.integer(-patch.support.x, size.width - patch.support.x - patch.support.width));
        const int oy = static_cast<int>(rng.integer(-patch.support.y, size.height - patch.support.y - patch.support.height));
        const cv::Rect support = patch.support + cv::Point(ox, oy);
        bool free = true;
        for (const cv::Rect& r : taken) free = free && (r & support).empty();
        if (!free) continue;
        placed = true;
        taken.emplace_back(support.x - 1, support.y - 1, support.width + 2, support.height + 2);
        SceneDigit digit;
        digit.digit = cell.digit;
        digit.category_id = cell.digit + 1;
        digit.cell_row = cell.row;
        digit.cell_column = cell.column;
        digit.height = height;
        digit.angle = angle;
        digit.box = patch.ink + cv::Point(ox, oy);
        const cv::Scalar mean_bg = cv::mean(background(digit.box));
        digit.background_luma = 0.114 * mean_bg[0] + 0.587 * mean_bg[1] + 0.299 * mean_bg[2];
        // Dark ink on a light background, light ink on a dark one, at least 60 luma levels
        // apart (61 before rounding the colour to bytes).
        const double bl = digit.background_luma;
        const double target = bl >= 128 ? rng.uniform(0, bl - kMinContrast - 1)
                                         : rng.uniform(bl + kMinContrast + 1, 255);
        digit.colour = colour_with_luma(rng, target, rng.chance(0.5));
        if (std::abs(luma(digit.colour) - bl) < kMinContrast) digit.colour = colour_with_luma(rng, target, true);
        for (int y = 0; y < patch.value.rows; ++y)
          for (int x = 0; x < patch.value.cols; ++x) {
            const double v = patch.value.at<double>(y, x);
            if (v <= 0) continue;
            const int cy = y + oy, cx = x + ox;
            // Solid from two thirds of the cell's maximum up, so strokes keep their colour;
            // the fainter rim blends into the background.
            const double alpha = std::min(1.0, 1.5 * v / patch.cell_max);
            cv::Vec3b& p = scene.image.at<cv::Vec3b>(cy, cx);
            const cv::Vec3b& b = background.at<cv::Vec3b>(cy, cx);
            for (int c = 0; c < 3; ++c) p[c] = clamp_byte(b[c] + alpha * (digit.colour[c] - b[c]));
            if (v > patch.cell_max / 2) {
              scene.mask.at<uchar>(cy, cx) = static_cast<uchar>(digit.category_id);
              ++digit.area;
            }
          }
        scene.digits.push_back(digit);
      }
    }
  }
  return scene;
}

SceneWriteSummary write_scenes(const SceneSource& source, uint64_t seed, int64_t count,
                               const std::string& out_dir) {
  check(count >= 1, "digit scenes: --count must be at least 1");
  const fs::path root(out_dir), images = root / "images", masks = root / "masks";
  std::error_code ec;
  fs::create_directories(images, ec);
  check(!ec, images.string() + ": cannot create the folder (" + ec.message() + ")");
  fs::create_directories(masks, ec);
  check(!ec, masks.string() + ": cannot create the folder (" + ec.message() + ")");
  const int width = std::max<int>(6, static_cast<int>(std::to_string(count - 1).size()));
  auto stem = [&](int64_t i) {
    std::string s = std::to_string(i);
    return std::string(static_cast<size_t>(width) - std::min<size_t>(s.size(), width), '0') + s;
  };
  std::vector<std::vector<SceneDigit>> digits(static_cast<size_t>(count));
  std::vector<cv::Size> sizes(static_cast<size_t>(count));
  std::vector<std::string> backgrounds(static_cast<size_t>(count));
  parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
    Scene scene = make_scene(source, seed, i);
    write_image_atomic((images / (stem(i) + ".png")).string(), scene.image);
    write_image_atomic((masks / (stem(i) + ".png")).string(), scene.mask);
    sizes[static_cast<size_t>(i)] = scene.image.size();
    backgrounds[static_cast<size_t>(i)] = scene_background_name(scene.background);
    digits[static_cast<size_t>(i)] = std::move(scene.digits);
    }
  });

  nlohmann::json coco;
  coco["info"] = {{"description", std::string("Tessera digit scenes (OpenCV digits.png, ") +
                                      scene_split_name(source.split) + " cells)"},
                  {"split", scene_split_name(source.split)},
                  {"seed", seed},
                  {"count", count}};
  coco["images"] = nlohmann::json::array();
  coco["annotations"] = nlohmann::json::array();
  coco["categories"] = nlohmann::json::array();
  for (int d = 0; d < 10; ++d)
    coco["categories"].push_back({{"id", d + 1}, {"name", std::to_string(d)}, {"supercategory", "digit"}});
  SceneWriteSummary summary;
  int64_t ann_id = 1;
  for (int64_t i = 0; i < count; ++i) {
    const size_t k = static_cast<size_t>(i);
    coco["images"].push_back({{"id", i + 1},
                              {"file_name", "images/" + stem(i) + ".png"},
                              {"width", sizes[k].width},
                              {"height", sizes[k].height},
                              {"background", backgrounds[k]}});
    for (const SceneDigit& d : digits[k]) {
      coco["annotations"].push_back({{"id", ann_id++},
                                     {"image_id", i + 1},
                                     {"category_id", d.category_id},
                                     {"bbox", {d.box.x, d.box.y, d.box.width, d.box.height}},
                                     {"area", d.area},
                                     {"iscrowd", 0}});
      ++summary.digits;
    }
  }
  summary.scenes = count;
  const std::string text = coco.dump() + "\n";
  write_file_atomic((root / "annotations.json").string(), text.data(), text.size());
  return summary;
}

}  // namespace tessera
