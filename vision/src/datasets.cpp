// Labelled data sets (see datasets.hpp).
#include "tessera/datasets.hpp"

#include <algorithm>
#include <filesystem>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <set>

#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/scenes.hpp"

namespace fs = std::filesystem;

namespace tessera {

namespace {
bool is_image_file(const fs::path& p) {
  static const std::set<std::string> exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"};
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), ::tolower);
  return exts.count(e) != 0;
}
}  // namespace

ClassificationData load_classification_data(const std::string& data, const std::string& digits_png) {
  ClassificationData out;
  if (data == "digits" || data == "digits:test" || data == "digits:train") {
    const SceneSplit split = data == "digits:train" ? SceneSplit::Train : SceneSplit::Test;
    for (int d = 0; d < 10; ++d) out.classes.push_back(std::to_string(d));
    for (const DigitCell& c : load_digit_cells(digits_png, split)) {
      LabelledImage im;
      im.path = digits_png + "[" + std::to_string(c.row) + "," + std::to_string(c.column) + "]";
      cv::cvtColor(c.pixels, im.rgb, cv::COLOR_GRAY2RGB);
      im.label = c.digit;
      out.images.push_back(std::move(im));
    }
    return out;
  }
  std::error_code ec;
  check(fs::is_directory(data, ec), data + ": not a folder (expected an ImageFolder: one sub-folder per class) "
                                           "nor digits, digits:train or digits:test");
  std::vector<fs::path> classes;
  for (const auto& e : fs::directory_iterator(data, ec))
    if (e.is_directory()) classes.push_back(e.path());
  std::sort(classes.begin(), classes.end());
  check(!classes.empty(), data + ": no class sub-folders (an ImageFolder has one folder per class)");
  for (size_t k = 0; k < classes.size(); ++k) {
    out.classes.push_back(classes[k].filename().string());
    std::vector<fs::path> files;
    for (const auto& e : fs::recursive_directory_iterator(classes[k], ec))
      if (e.is_regular_file() && is_image_file(e.path())) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const fs::path& f : files) out.images.push_back({f.string(), cv::Mat(), static_cast<int64_t>(k)});
  }
  check(!out.images.empty(), data + ": no images in its class folders");
  return out;
}

DetectionTarget coco_detection_target(const CocoDataset& coco, int64_t image_id) {
  const auto im = std::find_if(coco.images.begin(), coco.images.end(), [&](const CocoImage& i) { return i.id == image_id; });
  check(im != coco.images.end(), coco.json_path + ": no image with id " + std::to_string(image_id));
  const float W = static_cast<float>(im->width), H = static_cast<float>(im->height);
  DetectionTarget t;
  for (const CocoObject& a : coco.annotations) {
    if (a.image_id != image_id || a.crowd) continue;
    // In float32, as the processors' numpy arrays.
    const float x0 = std::clamp(static_cast<float>(a.x), 0.0f, W), y0 = std::clamp(static_cast<float>(a.y), 0.0f, H);
    const float x1 = std::clamp(static_cast<float>(a.x) + static_cast<float>(a.w), 0.0f, W);
    const float y1 = std::clamp(static_cast<float>(a.y) + static_cast<float>(a.h), 0.0f, H);
    if (!(x1 > x0 && y1 > y0)) continue;
    t.labels.push_back(a.category_id);
    t.boxes.push_back({(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H});
  }
  return t;
}

std::vector<SegmentationPair> load_segmentation_folder(const std::string& dir, int64_t num_classes) {
  const fs::path root(dir), images = root / "images", masks = root / "masks";
  std::error_code ec;
  check(fs::is_directory(images, ec) && fs::is_directory(masks, ec),
        dir + ": expected a folder with images/ and masks/ (same stems; masks are 8- or 16-bit label PNGs, 255 = ignore)");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(images, ec))
    if (e.is_regular_file() && is_image_file(e.path())) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  check(!files.empty(), images.string() + ": no images");
  std::vector<SegmentationPair> out;
  for (const fs::path& f : files) {
    const fs::path m = masks / (f.stem().string() + ".png");
    check(fs::is_regular_file(m, ec), m.string() + ": no mask for " + f.string());
    const cv::Mat mask = cv::imread(m.string(), cv::IMREAD_UNCHANGED);
    check(!mask.empty(), m.string() + ": cannot decode the mask");
    check(mask.channels() == 1 && (mask.depth() == CV_8U || mask.depth() == CV_16U),
          m.string() + ": a mask must be a one-channel 8- or 16-bit label PNG");
    const cv::Mat rgb = load_image_rgb(f.string());
    check(mask.size() == rgb.size(), m.string() + ": mask is " + std::to_string(mask.cols) + "x" + std::to_string(mask.rows) +
                                         ", its image " + std::to_string(rgb.cols) + "x" + std::to_string(rgb.rows));
    if (num_classes > 0) {
      double lo = 0, hi = 0;
      cv::Mat wide;
      mask.convertTo(wide, CV_32S);
      cv::Mat valid = wide != 255;
      cv::minMaxLoc(wide, &lo, &hi, nullptr, nullptr, valid);
      check(cv::countNonZero(valid) == 0 || hi < static_cast<double>(num_classes),
            m.string() + ": label " + std::to_string(static_cast<int64_t>(hi)) + " is not one of the " +
                std::to_string(num_classes) + " classes (255 = ignore)");
    }
    out.push_back({f.string(), m.string()});
  }
  return out;
}

}  // namespace tessera
