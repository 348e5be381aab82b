// Labelled data sets (tessera/datasets.hpp).
#include "tessera/datasets.hpp"

#include <algorithm>
#include <random>
#include <numeric>
#include <cctype>
#include <filesystem>
#include <map>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/metrics.hpp"
#include "tessera/parallel.hpp"

namespace fs = std::filesystem;

namespace tessera {
namespace {

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* e : {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
    if (ext == e) return true;
  return false;
}

}  // namespace

cv::Mat ClassificationData::rgb(size_t i) const {
  check(i < size(), source + ": sample " + std::to_string(i) + " of " + std::to_string(size()));
  if (!paths.empty()) return load_image_rgb(paths[i]);
  cv::Mat out;
  const cv::Mat& m = images[i];
  if (m.channels() == 1)
    cv::cvtColor(m, out, cv::COLOR_GRAY2RGB);
  else
    out = m;
  return out;
}

std::vector<size_t> epoch_batch(size_t samples, int64_t batch, bool shuffle, uint64_t seed, int64_t step,
                                const std::string& what) {
  check(batch > 0, "train: the batch size must be positive");
  const int64_t per_epoch = static_cast<int64_t>(samples) / batch;
  check(per_epoch > 0, what + ": " + std::to_string(samples) + " samples make no batch of " + std::to_string(batch));
  const int64_t epoch = step / per_epoch, first = (step % per_epoch) * batch;
  std::vector<size_t> order(samples);
  std::iota(order.begin(), order.end(), size_t{0});
  if (shuffle) {
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch) + 1);
    for (size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
  }
  return {order.begin() + first, order.begin() + first + batch};
}

void verify_images(const ClassificationData& data) {
  std::vector<std::string> errors(data.paths.size());
  parallel_for(0, static_cast<int64_t>(data.paths.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      try {
        (void)load_image_rgb(data.paths[i]);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    }
  });
  for (const std::string& e : errors)
    if (!e.empty()) fail(e);
}

ClassificationData image_folder(const std::string& dir) {
  std::error_code ec;
  check(fs::is_directory(dir, ec), dir + ": not a folder (an ImageFolder has one sub-folder per class)");
  ClassificationData d;
  d.source = dir;
  std::vector<fs::path> class_dirs;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory()) class_dirs.push_back(e.path());
  std::sort(class_dirs.begin(), class_dirs.end());
  check(!class_dirs.empty(), dir + ": no class folders (an ImageFolder has one sub-folder per class)");
  for (const fs::path& cd : class_dirs) {
    std::vector<std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(cd, fs::directory_options::follow_directory_symlink))
      if (e.is_regular_file() && is_image_file(e.path())) files.push_back(e.path().string());
    check(!files.empty(), cd.string() + ": no images in this class folder");
    std::sort(files.begin(), files.end());
    const int64_t label = static_cast<int64_t>(d.classes.size());
    d.classes.push_back(cd.filename().string());
    for (std::string& f : files) {
      d.paths.push_back(std::move(f));
      d.labels.push_back(label);
    }
  }
  return d;
}

ClassificationData opencv_digits(const std::string& png_path, const std::string& split) {
  check(split.empty() || split == "train" || split == "test",
        "digits:" + split + ": the split is 'train' (left 50 columns) or 'test' (right 50)");
  // Through the hardened decoder (header size limits, one-line errors naming the file).
  cv::Mat rgb;
  try {
    rgb = load_image_rgb(png_path);
  } catch (const Error& e) {
    fail(std::string(e.what()) + " (OpenCV's digits image: Debian's opencv-doc has it; or pass the path of samples/data/digits.png)");
  }
  cv::Mat all;
  cv::extractChannel(rgb, all, 0);  // gray replicated to R, G, B: any channel is the gray
  check(all.cols == 2000 && all.rows == 1000,
        png_path + ": expected OpenCV's 2000x1000 digits.png, got " + std::to_string(all.cols) +
            "x" + std::to_string(all.rows));
  ClassificationData d;
  d.source = png_path + (split.empty() ? "" : " (" + split + ")");
  for (int c = 0; c < 10; ++c) d.classes.push_back(std::to_string(c));
  const int c0 = split == "test" ? 50 : 0, c1 = split == "train" ? 50 : 100;
  for (int r = 0; r < 50; ++r)
    for (int c = c0; c < c1; ++c) {
      d.images.push_back(all(cv::Rect(c * 20, r * 20, 20, 20)).clone());
      d.labels.push_back(r / 5);
    }
  return d;
}

ClassificationData load_classification_data(const std::string& spec, const std::string& digits_png) {
  if (spec == "digits") return opencv_digits(digits_png);
  if (spec.rfind("digits:", 0) == 0) return opencv_digits(digits_png, spec.substr(7));
  return image_folder(spec);
}

Tensor classification_batch(const ClassificationData& data, const std::vector<size_t>& indices,
                            const PreprocessConfig& processor, std::vector<int64_t>* labels) {
  check(!indices.empty(), data.source + ": an empty batch");
  std::vector<Tensor> pixels(indices.size());
  // Decoding and resizing are per sample; samples are independent, so the order of work is free.
  parallel_for(0, static_cast<int64_t>(indices.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) pixels[i] = preprocess(data.rgb(indices[i]), processor);
  });
  const Shape& s = pixels[0].shape();
  Tensor out({static_cast<int64_t>(indices.size()), s[0], s[1], s[2]});
  for (size_t i = 0; i < indices.size(); ++i) {
    if (pixels[i].shape() != s)
      fail((data.paths.empty() ? data.source + " sample " + std::to_string(indices[i])
                               : data.paths[indices[i]]) +
           ": pre-processed to " + shape_str(pixels[i].shape()) + ", the batch's first to " +
           shape_str(s) + " (the processor must give every image one size)");
    std::copy_n(pixels[i].data(), pixels[i].numel(), out.data() + i * pixels[i].numel());
  }
  if (labels) {
    labels->clear();
    for (size_t i : indices) labels->push_back(data.labels[i]);
  }
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
    const cv::Mat mask = load_label_map(m.string());
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
    out.push_back({f.string(), m.string(), {}});
  }
  return out;
}

void attach_segmentation_boxes(std::vector<SegmentationPair>& pairs, const std::string& coco_json) {
  const CocoDataset coco = load_coco_instances(coco_json);
  std::map<std::string, int64_t> id_of;  // file name → image id
  for (const CocoImage& im : coco.images) id_of[fs::path(im.file_name).filename().string()] = im.id;
  std::map<int64_t, std::vector<std::array<double, 4>>> boxes;
  for (const CocoObject& a : coco.annotations)
    if (!a.crowd) boxes[a.image_id].push_back({a.x, a.y, a.w, a.h});
  for (SegmentationPair& p : pairs) {
    const std::string name = fs::path(p.image).filename().string();
    const auto it = id_of.find(name);
    check(it != id_of.end(), coco_json + ": has no image " + name + " (" + p.image + "); the boxes must be of the same images");
    const auto b = boxes.find(it->second);
    p.boxes = b == boxes.end() ? std::vector<std::array<double, 4>>{} : b->second;
  }
}

}  // namespace tessera
