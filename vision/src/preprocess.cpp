// Hugging Face / timm processors, reproduced. Upstream references: transformers 4.40.2
// (image_processing_{vit,deit,bit,clip,detr,yolos}.py, image_transforms.py), timm 1.0
// (data/config.py resolve_data_config, data/transforms_factory.py transforms_imagenet_eval),
// torchvision 0.14 (transforms.functional resize / center_crop / to_tensor / normalize).
#include "tessera/preprocess.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/limits.hpp"

namespace tessera {
namespace {

using json = nlohmann::json;

constexpr std::array<float, 3> kImagenetDefaultMean{0.485f, 0.456f, 0.406f};
constexpr std::array<float, 3> kImagenetDefaultStd{0.229f, 0.224f, 0.225f};
constexpr std::array<float, 3> kImagenetStandardMean{0.5f, 0.5f, 0.5f};
constexpr std::array<float, 3> kImagenetStandardStd{0.5f, 0.5f, 0.5f};
constexpr std::array<float, 3> kClipMean{0.48145466f, 0.4578275f, 0.40821073f};
constexpr std::array<float, 3> kClipStd{0.26862954f, 0.26130258f, 0.27577711f};

// Python's round() on a double: ties to even (the default FP rounding mode).
// (Clamped to +-1e9 so an absurd size stays defined behaviour and is refused by the size checks.)
int py_round(double x) { return static_cast<int>(std::nearbyint(std::clamp(x, -1e9, 1e9))); }
// int() of a non-negative size, clamped the same way.
int side(double x) { return static_cast<int>(std::min(x, 1e9)); }
// Python's // on ints: floor.
int floor_div2(int a) { return a >= 0 ? a / 2 : -((-a + 1) / 2); }

enum class Family { vit, deit, bit, clip, detr, yolos };

struct ClassInfo {
  Family family;
  std::string name;
  std::set<std::string> keys;  // fields this class reads (beyond the metadata fields)
};

const std::vector<ClassInfo>& classes() {
  static const std::set<std::string> base{"do_resize", "size", "resample", "do_rescale", "rescale_factor",
                                          "do_normalize", "image_mean", "image_std"};
  auto with = [&](std::initializer_list<const char*> extra) {
    std::set<std::string> s = base;
    for (auto e : extra) s.insert(e);
    return s;
  };
  static const std::vector<ClassInfo> all{
      {Family::vit, "ViTImageProcessor", base},
      {Family::deit, "DeiTImageProcessor", with({"do_center_crop", "crop_size"})},
      {Family::bit, "BitImageProcessor", with({"do_center_crop", "crop_size", "do_convert_rgb"})},
      {Family::clip, "CLIPImageProcessor", with({"do_center_crop", "crop_size", "do_convert_rgb"})},
      // format / do_convert_annotations only concern annotations, not pixels.
      {Family::detr, "DetrImageProcessor", with({"max_size", "do_pad", "format", "do_convert_annotations"})},
      {Family::yolos, "YolosImageProcessor", with({"max_size", "do_pad", "format", "do_convert_annotations"})},
  };
  return all;
}

// Fields that say nothing about the pixels.
const std::set<std::string>& metadata_keys() {
  static const std::set<std::string> k{"image_processor_type", "feature_extractor_type", "processor_class",
                                       "_processor_class", "auto_map", "_valid_processor_keys"};
  return k;
}

// A JSON value for a one-line message; values are at most kMaxJsonDepth deep (parse_checked).
std::string brief(const json& v) { return brief_text(v.dump(-1, ' ', false, json::error_handler_t::replace)); }

// Depth-checked, then parsed; every nlohmann error (1e999 included) names the file.
json parse_checked(std::string_view text, const std::string& source) {
  check_json_depth(text, source);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail(source + ": not valid JSON (" + brief_text(e.what(), 200) + ")");
  }
}

struct Reader {
  const json& j;
  const std::string& src;

  [[noreturn]] void bad(const std::string& key, const std::string& what) const {
    fail(src + ": field \"" + key + "\" " + what);
  }
  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }
  bool boolean(const char* key, bool def) const {
    if (!has(key)) return def;
    if (!j.at(key).is_boolean()) bad(key, "must be true or false, got " + brief(j.at(key)));
    return j.at(key).get<bool>();
  }
  double number(const char* key, double def) const {
    if (!has(key)) return def;
    if (!j.at(key).is_number()) bad(key, "must be a number, got " + brief(j.at(key)));
    return j.at(key).get<double>();
  }
  // A size: 1..kMaxImageSide (an image side Tessera decodes); larger ones only allocate.
  int positive_int(const json& v, const std::string& key) const {
    if (!v.is_number_integer() || v.get<long long>() <= 0)
      bad(key, "must be a positive integer, got " + brief(v));
    if (v.get<long long>() > kMaxImageSide)
      bad(key, "= " + brief(v) + " is larger than the limit of " + std::to_string(kMaxImageSide) + " pixels");
    return static_cast<int>(v.get<long long>());
  }
  std::array<float, 3> triple(const char* key, std::array<float, 3> def) const {
    if (!has(key)) return def;
    const json& v = j.at(key);
    if (v.is_number()) {
      const float f = static_cast<float>(v.get<double>());
      return {f, f, f};
    }
    if (!v.is_array() || v.size() != 3 || !v[0].is_number() || !v[1].is_number() || !v[2].is_number())
      bad(key, "must be a number or a list of 3 numbers (one per RGB channel), got " + brief(v));
    return {static_cast<float>(v[0].get<double>()), static_cast<float>(v[1].get<double>()),
            static_cast<float>(v[2].get<double>())};
  }
  Resample resample(const char* key, Resample def) const {
    if (!has(key)) return def;
    const json& v = j.at(key);
    if (v.is_number_integer())
      if (auto r = resample_from_int(v.get<long long>())) return *r;
    bad(key, "must be a Pillow filter 0..5 (nearest, lanczos, bilinear, bicubic, box, hamming), got " + brief(v));
  }
};

std::string family_class_name(const std::string& type) {
  // Old configs name the FeatureExtractor; it is the same processor.
  const std::string fe = "FeatureExtractor";
  if (type.size() > fe.size() && type.compare(type.size() - fe.size(), fe.size(), fe) == 0)
    return type.substr(0, type.size() - fe.size()) + "ImageProcessor";
  return type;
}

void check_positive(int v, const std::string& what) { check(v > 0, what + " must be positive"); }

}  // namespace

std::string PreprocessConfig::describe() const {
  std::ostringstream s;
  s << processor << ": ";
  if (do_resize) {
    s << "resize ";
    switch (resize_rule) {
      case ResizeRule::exact: s << height << "x" << width << " (HxW)"; break;
      case ResizeRule::shortest_edge: s << "shortest_edge=" << shortest_edge; break;
      case ResizeRule::detr: s << "shortest_edge=" << shortest_edge << " longest_edge=" << longest_edge << " (DETR)"; break;
      case ResizeRule::yolos: s << "shortest_edge=" << shortest_edge << " longest_edge=" << longest_edge << " (YOLOS, multiple of 16)"; break;
      case ResizeRule::longest_edge: s << "longest_edge=" << longest_edge; break;
      case ResizeRule::keep_ratio:
        s << "keep ratio to " << (keep_ratio_longest ? "fit in " : "cover ") << height << "x" << width << " (HxW)";
        break;
    }
    s << " " << resample_name(resample) << ", ";
  }
  if (do_center_crop) s << "center crop " << crop_height << "x" << crop_width << ", ";
  if (do_rescale)
    s << (rescale_rule == RescaleRule::divide_f32 ? "x/255" : "x*" + std::to_string(rescale_factor)) << ", ";
  if (do_normalize)
    s << "normalize mean [" << image_mean[0] << ", " << image_mean[1] << ", " << image_mean[2] << "] std ["
      << image_std[0] << ", " << image_std[1] << ", " << image_std[2] << "]";
  if (do_pad) s << ", pad batch";
  return s.str();
}

PreprocessConfig parse_preprocess_config(std::string_view json_text, const std::string& source) {
  json j = parse_checked(json_text, source);
  if (!j.is_object()) fail(source + ": expected a JSON object");
  std::string type;
  for (const char* k : {"image_processor_type", "feature_extractor_type"})
    if (j.contains(k) && j.at(k).is_string()) {
      type = j.at(k).get<std::string>();
      break;
    }
  if (type.empty()) fail(source + ": no \"image_processor_type\" (or \"feature_extractor_type\"): which processor is it?");
  const std::string cls = family_class_name(type);
  const ClassInfo* info = nullptr;
  for (const auto& c : classes())
    if (c.name == cls) info = &c;
  if (!info) {
    std::string names;
    for (const auto& c : classes()) names += (names.empty() ? "" : ", ") + c.name;
    fail(source + ": image processor \"" + brief_text(type) + "\" is not supported (supported: " + names + ")");
  }
  // A field this class does not read would be ignored upstream too, but only a harmless one
  // (false / null) is let through: a set field means someone expects it to act.
  for (const auto& [key, value] : j.items()) {
    if (metadata_keys().count(key) || info->keys.count(key)) continue;
    if (value.is_null() || (value.is_boolean() && !value.get<bool>())) continue;
    fail(source + ": field \"" + brief_text(key) + "\" (= " + brief(value) + ") is not part of " + info->name +
         " and Tessera does not implement it");
  }

  const Reader r{j, source};
  PreprocessConfig c;
  c.source = source;
  c.processor = info->name;
  const Family f = info->family;

  // Defaults of each class (transformers 4.40.2 __init__).
  c.do_resize = r.boolean("do_resize", true);
  c.do_rescale = r.boolean("do_rescale", true);
  c.rescale_factor = r.number("rescale_factor", 1.0 / 255.0);
  c.rescale_rule = RescaleRule::multiply_f64;
  c.do_normalize = r.boolean("do_normalize", true);
  c.crop_rule = CropRule::floor_half;
  switch (f) {
    case Family::vit:
      c.resample = r.resample("resample", Resample::bilinear);
      c.image_mean = r.triple("image_mean", kImagenetStandardMean);
      c.image_std = r.triple("image_std", kImagenetStandardStd);
      break;
    case Family::deit:
      c.resample = r.resample("resample", Resample::bicubic);
      c.image_mean = r.triple("image_mean", kImagenetDefaultMean);
      c.image_std = r.triple("image_std", kImagenetDefaultStd);
      break;
    case Family::bit:
    case Family::clip:
      c.resample = r.resample("resample", Resample::bicubic);
      c.image_mean = r.triple("image_mean", kClipMean);
      c.image_std = r.triple("image_std", kClipStd);
      c.do_convert_rgb = r.boolean("do_convert_rgb", true);
      break;
    case Family::detr:
    case Family::yolos:
      c.resample = r.resample("resample", Resample::bilinear);
      c.image_mean = r.triple("image_mean", kImagenetDefaultMean);
      c.image_std = r.triple("image_std", kImagenetDefaultStd);
      c.do_pad = r.boolean("do_pad", true);
      break;
  }
  for (int i = 0; i < 3; ++i)
    if (c.do_normalize && !(c.image_std[i] != 0.0f)) r.bad("image_std", "has a zero (division by zero)");

  // size: a dict in any of the forms the class accepts, or a legacy int (get_size_dict).
  const bool square_default = f == Family::vit || f == Family::deit;
  json size = j.contains("size") ? j.at("size") : json();
  if (size.is_null()) {
    switch (f) {
      case Family::vit: size = {{"height", 224}, {"width", 224}}; break;
      case Family::deit: size = {{"height", 256}, {"width", 256}}; break;
      case Family::bit:
      case Family::clip: size = {{"shortest_edge", 224}}; break;
      case Family::detr:
      case Family::yolos: size = {{"shortest_edge", 800}, {"longest_edge", 1333}}; break;
    }
  } else if (size.is_number_integer()) {
    const int n = r.positive_int(size, "size");
    if (square_default) {
      size = {{"height", n}, {"width", n}};
    } else if (f == Family::detr || f == Family::yolos) {
      // DETR/YOLOS: legacy "max_size", else 1333.
      int max_size = 1333;
      if (r.has("max_size")) max_size = r.positive_int(j.at("max_size"), "max_size");
      size = {{"shortest_edge", n}, {"longest_edge", max_size}};
    } else {
      size = {{"shortest_edge", n}};
    }
  } else if (!size.is_object()) {
    r.bad("size", "must be an integer or an object, got " + brief(size));
  }
  auto has_only = [&](std::initializer_list<const char*> ks) {
    if (size.size() != ks.size()) return false;
    for (auto k : ks)
      if (!size.contains(k)) return false;
    return true;
  };
  if (has_only({"height", "width"})) {
    c.resize_rule = ResizeRule::exact;
    c.height = r.positive_int(size.at("height"), "size.height");
    c.width = r.positive_int(size.at("width"), "size.width");
  } else if (has_only({"shortest_edge"}) && (f == Family::bit || f == Family::clip)) {
    c.resize_rule = ResizeRule::shortest_edge;
    c.shortest_edge = r.positive_int(size.at("shortest_edge"), "size.shortest_edge");
  } else if (has_only({"shortest_edge", "longest_edge"}) && (f == Family::detr || f == Family::yolos)) {
    c.resize_rule = f == Family::detr ? ResizeRule::detr : ResizeRule::yolos;
    c.shortest_edge = r.positive_int(size.at("shortest_edge"), "size.shortest_edge");
    c.longest_edge = r.positive_int(size.at("longest_edge"), "size.longest_edge");
  } else {
    const char* accepted = square_default ? "{\"height\", \"width\"} or an integer"
                           : (f == Family::bit || f == Family::clip)
                               ? "{\"shortest_edge\"}, {\"height\", \"width\"} or an integer"
                               : "{\"shortest_edge\", \"longest_edge\"}, {\"height\", \"width\"} or an integer";
    r.bad("size", "= " + brief(size) + " is not a form " + info->name + " accepts (" + accepted + ")");
  }

  if (f == Family::deit || f == Family::bit || f == Family::clip) {
    c.do_center_crop = r.boolean("do_center_crop", true);
    json crop = j.contains("crop_size") ? j.at("crop_size") : json();
    if (crop.is_null()) crop = {{"height", 224}, {"width", 224}};
    if (crop.is_number_integer()) {
      const int n = r.positive_int(crop, "crop_size");
      crop = {{"height", n}, {"width", n}};
    }
    if (!crop.is_object() || crop.size() != 2 || !crop.contains("height") || !crop.contains("width"))
      r.bad("crop_size", "must be {\"height\", \"width\"} or an integer, got " + brief(crop));
    c.crop_height = r.positive_int(crop.at("height"), "crop_size.height");
    c.crop_width = r.positive_int(crop.at("width"), "crop_size.width");
  }
  return c;
}

PreprocessConfig load_preprocess_config(const std::string& path) {
  return parse_preprocess_config(read_regular_file(path, "preprocessor config"), path);
}

PreprocessConfig from_timm_pretrained_cfg(std::string_view json_text, const std::string& source, int img_height,
                                          int img_width) {
  json j = parse_checked(json_text, source);
  if (j.is_object() && j.contains("pretrained_cfg")) j = j.at("pretrained_cfg");
  if (!j.is_object()) fail(source + ": expected a timm pretrained_cfg object");
  const Reader r{j, source};
  PreprocessConfig c;
  c.source = source;
  c.processor = "timm";
  // resolve_data_config defaults: input_size (3, 224, 224), bicubic, crop_pct 0.875, ImageNet mean/std.
  int h = 224, w = 224;
  if (r.has("input_size")) {
    const json& v = j.at("input_size");
    if (!v.is_array() || v.size() != 3) r.bad("input_size", "must be [channels, height, width], got " + brief(v));
    if (!v[0].is_number_integer() || v[0].get<long long>() != 3)
      r.bad("input_size", "has " + brief(v[0]) + " channels; Tessera handles RGB (3) models");
    h = r.positive_int(v[1], "input_size[1]");
    w = r.positive_int(v[2], "input_size[2]");
  }
  if (img_height > 0) h = img_height;
  if (img_width > 0) w = img_width;
  std::string interpolation = "bicubic";
  if (r.has("interpolation")) {
    if (!j.at("interpolation").is_string()) r.bad("interpolation", "must be a string");
    interpolation = j.at("interpolation").get<std::string>();
  }
  const auto resample = resample_from_name(interpolation);
  if (!resample) r.bad("interpolation", "= \"" + brief_text(interpolation) + "\" is not one of nearest, bilinear, bicubic, lanczos, box, hamming");
  const double crop_pct = r.number("crop_pct", 0.875);
  if (!(crop_pct > 0.0 && crop_pct <= 10.0)) r.bad("crop_pct", "must be in (0, 10]");
  std::string crop_mode = "center";
  if (r.has("crop_mode")) {
    if (!j.at("crop_mode").is_string()) r.bad("crop_mode", "must be a string");
    crop_mode = j.at("crop_mode").get<std::string>();
  }
  c.image_mean = r.triple("mean", kImagenetDefaultMean);
  c.image_std = r.triple("std", kImagenetDefaultStd);
  for (int i = 0; i < 3; ++i)
    if (!(c.image_std[i] != 0.0f)) r.bad("std", "has a zero (division by zero)");
  if (r.has("crop_border_pixels") && !(j.at("crop_border_pixels").is_number() && j.at("crop_border_pixels").get<double>() == 0))
    r.bad("crop_border_pixels", "is not supported");

  if (h / crop_pct > kMaxImageSide || w / crop_pct > kMaxImageSide)
    r.bad("crop_pct", "= " + std::to_string(crop_pct) + " resizes to more than " + std::to_string(kMaxImageSide) +
                          " pixels a side");
  // math.floor(img_size / crop_pct)
  const int scale_h = static_cast<int>(std::floor(h / crop_pct));
  const int scale_w = static_cast<int>(std::floor(w / crop_pct));
  c.do_resize = true;
  c.resample = *resample;
  c.do_center_crop = true;
  c.crop_height = h;
  c.crop_width = w;
  c.crop_rule = CropRule::round_half;
  if (crop_mode == "center") {
    if (scale_h == scale_w) {
      c.resize_rule = ResizeRule::shortest_edge;  // transforms.Resize(int)
      c.shortest_edge = scale_h;
    } else {
      c.resize_rule = ResizeRule::keep_ratio;     // ResizeKeepRatio(scale_size): bilinear, whatever the cfg says
      c.height = scale_h;
      c.width = scale_w;
      c.resample = Resample::bilinear;
    }
  } else if (crop_mode == "squash") {
    c.resize_rule = ResizeRule::exact;            // transforms.Resize((h, w))
    c.height = scale_h;
    c.width = scale_w;
  } else if (crop_mode == "border") {
    // ResizeKeepRatio(scale_size, interpolation, longest=1.0), CenterCropOrPad(img_size, fill=[round(255 * v) for v in mean])
    c.resize_rule = ResizeRule::keep_ratio;
    c.keep_ratio_longest = true;
    c.height = scale_h;
    c.width = scale_w;
    std::array<double, 3> mean{0.485, 0.456, 0.406};
    if (r.has("mean")) {
      const json& m = j.at("mean");
      for (int i = 0; i < 3; ++i) mean[i] = m.is_array() ? m[i].get<double>() : m.get<double>();
    }
    for (int i = 0; i < 3; ++i) c.crop_fill[i] = static_cast<uint8_t>(std::clamp(py_round(255 * mean[i]), 0, 255));
  } else {
    r.bad("crop_mode", "= \"" + brief_text(crop_mode) + "\" is not supported (supported: center, squash, border)");
  }
  c.do_rescale = true;
  c.rescale_factor = 1.0 / 255.0;
  c.rescale_rule = RescaleRule::divide_f32;
  c.do_normalize = true;
  c.do_convert_rgb = true;
  c.do_pad = false;
  return c;
}

cv::Size resize_output_size(cv::Size input, const PreprocessConfig& cfg) {
  const int h = input.height, w = input.width;
  check(h > 0 && w > 0, "preprocess: empty image");
  if (!cfg.do_resize) return input;
  switch (cfg.resize_rule) {
    case ResizeRule::exact:
      check_positive(cfg.height, "size.height");
      check_positive(cfg.width, "size.width");
      return {cfg.width, cfg.height};
    case ResizeRule::shortest_edge: {
      check_positive(cfg.shortest_edge, "size.shortest_edge");
      const int s = cfg.shortest_edge;
      const int shorter = std::min(w, h), longer = std::max(w, h);
      const int new_long = side(static_cast<double>(int64_t(s) * longer) / shorter);
      return w <= h ? cv::Size(s, new_long) : cv::Size(new_long, s);
    }
    case ResizeRule::detr:
    case ResizeRule::yolos: {
      check_positive(cfg.shortest_edge, "size.shortest_edge");
      int size = cfg.shortest_edge;
      if (cfg.longest_edge > 0) {
        const double min_original = std::min(h, w), max_original = std::max(h, w);
        if (max_original / min_original * size > cfg.longest_edge)
          size = py_round(cfg.longest_edge * min_original / max_original);
      }
      if (cfg.resize_rule == ResizeRule::detr) {
        if ((h <= w && h == size) || (w <= h && w == size)) return input;
        if (w < h) return {size, side(static_cast<double>(int64_t(size) * h) / w)};
        return {side(static_cast<double>(int64_t(size) * w) / h), size};
      }
      // transformers 4.40 YOLOS: a square image is not resized (only rounded down to a multiple of 16).
      int oh = h, ow = w;
      if (w < h && w != size) {
        oh = side(static_cast<double>(int64_t(size) * h) / w);
        ow = size;
      } else if (h < w && h != size) {
        ow = side(static_cast<double>(int64_t(size) * w) / h);
        oh = size;
      }
      ow -= ow % 16;
      oh -= oh % 16;
      if (ow <= 0 || oh <= 0)
        fail(cfg.source + ": YOLOS resize of a " + std::to_string(w) + "x" + std::to_string(h) +
             " image gives an empty image (sides are rounded down to multiples of 16)");
      return {ow, oh};
    }
    case ResizeRule::longest_edge: {
      check_positive(cfg.longest_edge, "size.longest_edge");
      const double scale = cfg.longest_edge * 1.0 / std::max(h, w);
      return {std::max(1, side(w * scale + 0.5)), std::max(1, side(h * scale + 0.5))};
    }
    case ResizeRule::keep_ratio: {
      check_positive(cfg.height, "size.height");
      check_positive(cfg.width, "size.width");
      const double ratio_h = static_cast<double>(h) / cfg.height, ratio_w = static_cast<double>(w) / cfg.width;
      const double longest = cfg.keep_ratio_longest ? 1.0 : 0.0;
      const double ratio = std::max(ratio_h, ratio_w) * longest + std::min(ratio_h, ratio_w) * (1.0 - longest);
      return {std::max(1, py_round(w / ratio)), std::max(1, py_round(h / ratio))};
    }
  }
  return input;
}

cv::Size preprocess_output_size(cv::Size input, const PreprocessConfig& cfg) {
  const cv::Size r = resize_output_size(input, cfg);
  if (!cfg.do_center_crop) return r;
  return {cfg.crop_width, cfg.crop_height};
}

namespace {
// First source index of a centered crop of `crop` out of `size` (may be negative: zero padding).
int crop_offset(int size, int crop, CropRule rule) {
  if (rule == CropRule::floor_half) return floor_div2(size - crop);  // HF: (h - ch) // 2, padding included
  if (crop > size) return -((crop - size) / 2);                      // torchvision pads left (c - s) // 2
  return py_round((size - crop) / 2.0);                              // int(round((h - ch) / 2.0))
}
}  // namespace

cv::Rect crop_window(cv::Size resized, const PreprocessConfig& cfg) {
  if (!cfg.do_center_crop) return {0, 0, resized.width, resized.height};
  return {crop_offset(resized.width, cfg.crop_width, cfg.crop_rule),
          crop_offset(resized.height, cfg.crop_height, cfg.crop_rule), cfg.crop_width, cfg.crop_height};
}

cv::Mat resize_and_crop(const cv::Mat& rgb, const PreprocessConfig& cfg) {
  check(!rgb.empty(), cfg.source + ": preprocess: empty image");
  check(rgb.type() == CV_8UC3, cfg.source + ": preprocess: expected an 8-bit RGB image (CV_8UC3), got " +
                                   cv::typeToString(rgb.type()));
  const cv::Size size = resize_output_size(rgb.size(), cfg);
  check(static_cast<double>(size.width) * size.height <= static_cast<double>(kMaxImagePixels),
        cfg.source + ": resizing a " + std::to_string(rgb.cols) + "x" + std::to_string(rgb.rows) + " image to " +
            std::to_string(size.width) + "x" + std::to_string(size.height) + " is more than the limit of " +
            std::to_string(kMaxImagePixels) + " pixels");
  cv::Mat img = cfg.do_resize ? pil_resize(rgb, size.width, size.height, cfg.resample) : rgb;
  if (!cfg.do_center_crop) return img;
  check(cfg.crop_height > 0 && cfg.crop_width > 0, cfg.source + ": crop_size must be positive");
  const cv::Rect window = crop_window(img.size(), cfg);
  const int top = window.y, left = window.x;
  cv::Mat out(cfg.crop_height, cfg.crop_width, CV_8UC3, cv::Scalar(cfg.crop_fill[0], cfg.crop_fill[1], cfg.crop_fill[2]));
  // The part of the crop window that lies inside the image; the rest stays zero (padding).
  const cv::Rect inside = window & cv::Rect(0, 0, img.cols, img.rows);
  if (inside.area() > 0) img(inside).copyTo(out(cv::Rect(inside.x - left, inside.y - top, inside.width, inside.height)));
  return out;
}

void rgb_to_chw(const cv::Mat& rgb, const PreprocessConfig& cfg, float* out) {
  check(rgb.type() == CV_8UC3, "rgb_to_chw: expected CV_8UC3");
  const int h = rgb.rows, w = rgb.cols;
  const size_t plane = static_cast<size_t>(h) * w;
  // Per channel, a table of the 256 possible results: the same float operations, done once.
  float table[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) {
      float x;
      if (!cfg.do_rescale) x = static_cast<float>(v);
      else if (cfg.rescale_rule == RescaleRule::divide_f32) x = static_cast<float>(v) / 255.0f;
      else x = static_cast<float>(static_cast<double>(v) * cfg.rescale_factor);
      if (cfg.do_normalize) x = (x - cfg.image_mean[c]) / cfg.image_std[c];
      table[c][v] = x;
    }
  for (int y = 0; y < h; ++y) {
    const uint8_t* p = rgb.ptr<uint8_t>(y);
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) out[c * plane + static_cast<size_t>(y) * w + x] = table[c][p[x * 3 + c]];
  }
}

Tensor preprocess(const cv::Mat& rgb, const PreprocessConfig& cfg) {
  const cv::Mat img = resize_and_crop(rgb, cfg);
  Tensor t({3, img.rows, img.cols});
  rgb_to_chw(img, cfg, t.data());
  return t;
}

Tensor preprocess_batch(const std::vector<cv::Mat>& rgbs, const PreprocessConfig& cfg, std::vector<cv::Size>* sizes) {
  check(!rgbs.empty(), "preprocess_batch: no images");
  std::vector<Tensor> items;
  items.reserve(rgbs.size());
  int64_t H = 0, W = 0;
  for (const auto& m : rgbs) {
    items.push_back(preprocess(m, cfg));
    H = std::max(H, items.back().dim(1));
    W = std::max(W, items.back().dim(2));
  }
  if (sizes) sizes->clear();
  for (const auto& t : items) {
    if (sizes) sizes->emplace_back(static_cast<int>(t.dim(2)), static_cast<int>(t.dim(1)));
    if (!cfg.do_pad && (t.dim(1) != H || t.dim(2) != W))
      fail(cfg.source + ": the images come out at different sizes (" + std::to_string(t.dim(2)) + "x" +
           std::to_string(t.dim(1)) + " and " + std::to_string(W) + "x" + std::to_string(H) +
           ") and this processor does not pad; run them one at a time");
  }
  Tensor batch({static_cast<int64_t>(items.size()), 3, H, W});  // zero-filled: the padding
  for (size_t b = 0; b < items.size(); ++b) {
    const Tensor& t = items[b];
    const int64_t h = t.dim(1), w = t.dim(2);
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t y = 0; y < h; ++y)
        std::copy_n(t.data() + (c * h + y) * w, w, batch.data() + ((static_cast<int64_t>(b) * 3 + c) * H + y) * W);
  }
  return batch;
}

}  // namespace tessera
