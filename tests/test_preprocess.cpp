// Image decoding, Pillow-compatible resize and the HF / timm processors against fixtures written by
// tests/reference/make_preprocess_fixtures.py (Pillow 9.4) and by the upstream code itself
// (transformers 4.40.2 / timm 1.0.28 pixel_values from ../shared/conformance, copied).
// Tolerances: decoding and resizing are exact (max abs diff 0); processors are exact (0) as well;
// the spec's bound of one 8-bit level, 1/255/std, is checked first so a failure says which it is.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <functional>
#include <iterator>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/limits.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/pil_resize.hpp"
#include "tessera/preprocess.hpp"

using namespace tessera;
using json = nlohmann::json;

namespace {

const std::string kFix = TESSERA_FIXTURES;
const std::string kImages = kFix + "/images/";
const std::string kPre = kFix + "/preprocess/";

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A minimal safetensors reader for the tests (the library's reader is tested on its own):
// 8-byte little-endian header length, JSON header, raw little-endian data. F32 and U8 only.
struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<float> f32;
  std::vector<uint8_t> u8;
};

std::map<std::string, RawTensor> read_safetensors(const std::string& path) {
  const std::string bytes = read_text(path);
  REQUIRE(bytes.size() >= 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  REQUIRE(8 + n <= bytes.size());
  const json header = json::parse(bytes.substr(8, n));
  const char* data = bytes.data() + 8 + n;
  std::map<std::string, RawTensor> out;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    RawTensor t;
    t.dtype = info.at("dtype").get<std::string>();
    t.shape = info.at("shape").get<std::vector<int64_t>>();
    const auto off = info.at("data_offsets").get<std::vector<size_t>>();
    const size_t len = off[1] - off[0];
    if (t.dtype == "F32") {
      t.f32.resize(len / 4);
      std::memcpy(t.f32.data(), data + off[0], len);
    } else if (t.dtype == "U8") {
      t.u8.assign(data + off[0], data + off[1]);
    } else {
      FAIL("unexpected dtype " << t.dtype);
    }
    out[name] = std::move(t);
  }
  return out;
}

// The LCG noise of make_preprocess_fixtures.py: x = x * 6364136223846793005 + 1442695040888963407.
cv::Mat noise_image(int w, int h, uint64_t seed, int channels = 3) {
  cv::Mat m(h, w, CV_8UC(channels));
  uint64_t x = seed;
  uint8_t* p = m.ptr<uint8_t>(0);
  for (size_t i = 0; i < static_cast<size_t>(w) * h * channels; ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = static_cast<uint8_t>(x >> 56);
  }
  return m;
}

// zlib's CRC-32 (reflected, polynomial 0xEDB88320), as Python's zlib.crc32.
uint32_t crc32(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return c ^ 0xFFFFFFFFu;
}

int max_abs_diff_u8(const cv::Mat& a, const cv::Mat& b) {
  REQUIRE(a.size() == b.size());
  REQUIRE(a.type() == b.type());
  cv::Mat d;
  cv::absdiff(a, b, d);
  double mx = 0;
  cv::minMaxLoc(d.reshape(1), nullptr, &mx);
  return static_cast<int>(mx);
}

// Expected PNGs are plain 8-bit RGB; read them with OpenCV directly (not with the code under test).
cv::Mat read_png_rgb(const std::string& path) {
  cv::Mat bgr = cv::imread(path, cv::IMREAD_COLOR);
  REQUIRE(!bgr.empty());
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

cv::Mat u8_to_mat(const RawTensor& t) {
  REQUIRE(t.dtype == "U8");
  REQUIRE(t.shape.size() == 3);
  REQUIRE(t.shape[2] == 3);
  cv::Mat m(static_cast<int>(t.shape[0]), static_cast<int>(t.shape[1]), CV_8UC3);
  std::memcpy(m.data, t.u8.data(), t.u8.size());
  return m;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

// ------------------------------------------------------------------------------------------ decoding

TEST_CASE("decoded images equal Pillow's convert('RGB') (EXIF transposed)", "[image]") {
  const auto expected = read_safetensors(kImages + "expected.safetensors");
  int checked = 0;
  for (const auto& [name, t] : expected) {
    if (name.rfind("pillow_convert_rgb_", 0) == 0) continue;
    INFO(name);
    const cv::Mat got = load_image_rgb(kImages + name);
    REQUIRE(got.type() == CV_8UC3);
    const cv::Mat want = u8_to_mat(t);
    REQUIRE(got.cols == want.cols);
    REQUIRE(got.rows == want.rows);
    // Tolerance: exact; CMYK JPEGs 1 level (OpenCV's CMYK->RGB rounds k*(255-c)/256, Pillow's /255).
    CHECK(max_abs_diff_u8(got, want) <= (name == "cmyk.jpg" ? 1 : 0));
    ++checked;
  }
  CHECK(checked >= 22);
}

TEST_CASE("EXIF orientations make the same upright picture", "[image]") {
  // exif1..8 store the same picture rotated/flipped; all must decode to exif1's size after transpose.
  const cv::Mat upright = load_image_rgb(kImages + "exif1.jpg");
  CHECK(upright.cols == 32);
  CHECK(upright.rows == 24);
  for (int o : {5, 6, 7, 8}) {
    const cv::Mat m = load_image_rgb(kImages + "exif" + std::to_string(o) + ".jpg");
    CHECK(m.cols == 24);
    CHECK(m.rows == 32);
  }
}

TEST_CASE("16-bit grayscale becomes its high byte, not Pillow's clipped white", "[image]") {
  const auto expected = read_safetensors(kImages + "expected.safetensors");
  const cv::Mat pil = u8_to_mat(expected.at("pillow_convert_rgb_gray16.png"));
  const cv::Mat ours = load_image_rgb(kImages + "gray16.png");
  double pil_min = 0;
  cv::minMaxLoc(pil.reshape(1), &pil_min);
  CHECK(pil_min > 200);  // documents why Tessera departs from Pillow here
  CHECK(max_abs_diff_u8(ours, u8_to_mat(expected.at("gray16.png"))) == 0);
}

TEST_CASE("decoding errors are one line naming the file", "[image][errors]") {
  const auto one_line = [](const std::string& msg) { return msg.find('\n') == std::string::npos; };
  struct Case {
    std::string path, words;
  } cases[] = {
      {kImages + "no_such_image.png", "no such file"},
      {kImages, "is a directory"},
      {kImages + "empty.png", "empty file"},
      {kImages + "truncated.png", "cannot decode image"},
      {kImages + "truncated.jpg", "truncated JPEG"},
      {kImages + "text.jpg", "cannot decode image (corrupt or unsupported format)"},
      {kImages + "unsupported.gif", "GIF is not supported"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of([&] { load_image_rgb(c.path); });
    INFO(msg);
    CHECK(msg.find(c.path) == 0);
    CHECK(msg.find(c.words) != std::string::npos);
    CHECK(one_line(msg));
  }
}

TEST_CASE("images above the pixel limit are refused from the header", "[image][errors]") {
  // A PNG whose IHDR claims 20000 x 20000: refused before any pixel is decoded.
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R',
                              0, 0, 0x4e, 0x20, 0, 0, 0x4e, 0x20, 8, 2, 0, 0, 0, 0, 0, 0, 0};
  const std::string msg = error_of([&] { decode_image_rgb(png, "big.png"); });
  CHECK(msg.rfind("big.png: image is 20000x20000", 0) == 0);
  CHECK(msg.find("limit") != std::string::npos);
  // 2^32-1 on each side: no overflow in the check
  for (int i = 16; i < 24; ++i) png[i] = 0xFF;
  CHECK(error_of([&] { decode_image_rgb(png, "huge.png"); }).rfind("huge.png: image is 4294967295x4294967295", 0) == 0);
  // A baseline JPEG frame header (SOF0) of 65535 x 65535, after an APP0 segment.
  const std::vector<uint8_t> jpg = {0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC0, 0, 17, 8, 0xFF, 0xFF, 0xFF, 0xFF, 3,
                                    1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0};
  CHECK(error_of([&] { decode_image_rgb(jpg, "big.jpg"); }).rfind("big.jpg: image is 65535x65535", 0) == 0);
}

// ------------------------------------------------------------------------------------- Pillow resize

TEST_CASE("pil_resize equals Pillow's Image.resize bit for bit, every filter", "[resize]") {
  const json cases = json::parse(read_text(kPre + "pil_resize/cases.json"));
  const cv::Mat chelsea = read_png_rgb(kPre + "photos/chelsea.png");
  std::map<std::string, cv::Mat> sources{{"chelsea", chelsea}};
  const auto& crop = cases.at("sources").at("chelsea_crop");
  sources["chelsea_crop"] = chelsea(cv::Rect(crop[0], crop[1], crop[2], crop[3])).clone();
  for (const char* name : {"noise37x23", "noise300x200", "noise64x48", "noise5x5"}) {
    const auto& s = cases.at("sources").at(name);
    sources[name] = noise_image(s[0], s[1], s[2]);
  }
  std::map<int, int> worst;
  for (const auto& c : cases.at("cases")) {
    const std::string file = c.at("file");
    INFO(file);
    const auto resample = resample_from_int(c.at("resample").get<int>());
    REQUIRE(resample);
    const cv::Mat got = pil_resize(sources.at(c.at("source")), c.at("width"), c.at("height"), *resample);
    const int d = max_abs_diff_u8(got, read_png_rgb(kPre + "pil_resize/" + file));
    worst[c.at("resample").get<int>()] = std::max(worst[c.at("resample").get<int>()], d);
    CHECK(d == 0);  // tolerance: exact
  }
  for (const auto& [r, d] : worst)
    WARN("max abs diff vs Pillow, " << resample_name(static_cast<Resample>(r)) << ": " << d);
  CHECK(worst.size() == 6);
}

TEST_CASE("pil_resize equals Pillow on 132 more size pairs (CRC-32 of the output)", "[resize]") {
  const json cases = json::parse(read_text(kPre + "pil_resize/cases.json"));
  int n = 0;
  for (const auto& c : cases.at("crc_cases")) {
    const int sw = c[0], sh = c[1], ch = c[2], dw = c[4], dh = c[5], f = c[6];
    const uint64_t seed = c[3];
    INFO(sw << "x" << sh << "x" << ch << " -> " << dw << "x" << dh << " " << resample_name(static_cast<Resample>(f)));
    const cv::Mat out = pil_resize(noise_image(sw, sh, seed, ch), dw, dh, static_cast<Resample>(f));
    REQUIRE(out.isContinuous());
    CHECK(crc32(out.data, out.total() * out.elemSize()) == c[7].get<uint32_t>());  // tolerance: exact
    ++n;
  }
  CHECK(n == 132);
}

TEST_CASE("pil_resize results do not depend on channel layout", "[resize]") {
  // One channel of an RGB resize equals the resize of that channel alone (Pillow mode L).
  const cv::Mat rgb = noise_image(41, 29, 11);
  std::vector<cv::Mat> planes;
  cv::split(rgb, planes);
  for (Resample r : {Resample::bilinear, Resample::bicubic, Resample::lanczos, Resample::nearest}) {
    const cv::Mat out = pil_resize(rgb, 17, 60, r);
    std::vector<cv::Mat> outs;
    cv::split(out, outs);
    for (int c = 0; c < 3; ++c) CHECK(max_abs_diff_u8(outs[c], pil_resize(planes[c], 17, 60, r)) == 0);
  }
}

// ---------------------------------------------------------------------------------------- processors

namespace {

struct Compared {
  double max_abs = 0;
  double tolerance = 0;  // one 8-bit level: 1/255/min(std)
};

// Compares preprocess(image) against rows of an upstream pixel_values tensor [B, 3, Hpad, Wpad]
// (only the image's own unpadded region; the rest must be zero padding).
Compared compare_row(const RawTensor& expected, int64_t b, const Tensor& got, const PreprocessConfig& cfg) {
  REQUIRE(expected.shape.size() == 4);
  const int64_t H = expected.shape[2], W = expected.shape[3];
  const int64_t h = got.dim(1), w = got.dim(2);
  REQUIRE(got.dim(0) == 3);
  REQUIRE(h <= H);
  REQUIRE(w <= W);
  Compared r;
  r.tolerance = 1.0 / 255.0 / std::min({cfg.image_std[0], cfg.image_std[1], cfg.image_std[2]}) + 1e-6;
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const float e = expected.f32[((b * 3 + c) * H + y) * W + x];
        const float g = (y < h && x < w) ? got[(c * h + y) * w + x] : 0.0f;
        r.max_abs = std::max(r.max_abs, static_cast<double>(std::fabs(e - g)));
      }
  return r;
}

void check_processor(const std::string& dir, const PreprocessConfig& cfg, bool allow_padding = false) {
  const auto meta = json::parse(read_text(kPre + dir + "/meta.json"));
  const auto tensors = read_safetensors(kPre + dir + "/pixel_values.safetensors");
  const RawTensor& pv = tensors.at("pixel_values");
  const auto images = meta.at("images").get<std::vector<std::string>>();
  REQUIRE(pv.shape[0] == static_cast<int64_t>(images.size()));
  for (size_t i = 0; i < images.size(); ++i) {
    INFO(dir << " / " << images[i] << " — " << cfg.describe());
    const cv::Mat rgb = load_image_rgb(kPre + "photos/" + images[i]);
    const Tensor t = preprocess(rgb, cfg);
    const cv::Size s = preprocess_output_size(rgb.size(), cfg);
    CHECK(s.height == t.dim(1));
    CHECK(s.width == t.dim(2));
    if (!allow_padding) {
      CHECK(t.dim(1) == pv.shape[2]);
      CHECK(t.dim(2) == pv.shape[3]);
    }
    const Compared r = compare_row(pv, static_cast<int64_t>(i), t, cfg);
    WARN(dir << " / " << images[i] << ": max abs diff " << r.max_abs << " (one 8-bit level = " << r.tolerance << ")");
    CHECK(r.max_abs <= r.tolerance);  // the spec's bound
    CHECK(r.max_abs == 0.0);          // what is achieved: exact
  }
}

}  // namespace

TEST_CASE("ViTImageProcessor defaults (vit-default, 224x224 bilinear)", "[processor]") {
  const auto cfg = load_preprocess_config(kPre + "vit-default/preprocessor_config.json");
  CHECK(cfg.processor == "ViTImageProcessor");
  CHECK(cfg.resample == Resample::bilinear);
  check_processor("vit-default", cfg);
}

TEST_CASE("ViTImageProcessor 32x32 (vit-tiny-rand e2e)", "[processor]") {
  check_processor("vit-tiny-e2e", load_preprocess_config(kPre + "vit-tiny-e2e/preprocessor_config.json"));
}

TEST_CASE("DeiTImageProcessor resize 40 bicubic + center crop 32 (deit-tiny e2e)", "[processor]") {
  const auto cfg = load_preprocess_config(kPre + "deit-tiny-e2e/preprocessor_config.json");
  CHECK(cfg.do_center_crop);
  CHECK(cfg.resample == Resample::bicubic);
  check_processor("deit-tiny-e2e", cfg);
}

TEST_CASE("timm eval transform from pretrained_cfg (crop_pct 0.9, bicubic)", "[processor]") {
  const auto cfg = from_timm_pretrained_cfg(read_text(kPre + "timm-e2e/config.json"), "timm-e2e/config.json");
  CHECK(cfg.resize_rule == ResizeRule::shortest_edge);
  CHECK(cfg.shortest_edge == 106);  // floor(96 / 0.9)
  CHECK(cfg.crop_height == 96);
  check_processor("timm-e2e", cfg);
}

TEST_CASE("YolosImageProcessor shortest/longest edge, padded batch (yolos-tiny e2e)", "[processor]") {
  const auto cfg = load_preprocess_config(kPre + "yolos-tiny-e2e/preprocessor_config.json");
  CHECK(cfg.resize_rule == ResizeRule::yolos);
  CHECK(cfg.do_pad);
  check_processor("yolos-tiny-e2e", cfg, /*allow_padding=*/true);
  // The whole padded batch, as the processor returns it.
  std::vector<cv::Mat> imgs{load_image_rgb(kPre + "photos/chelsea.png"), load_image_rgb(kPre + "photos/coffee_portrait.png")};
  std::vector<cv::Size> sizes;
  const Tensor batch = preprocess_batch(imgs, cfg, &sizes);
  const auto pv = read_safetensors(kPre + "yolos-tiny-e2e/pixel_values.safetensors").at("pixel_values");
  REQUIRE(batch.shape() == Shape(pv.shape.begin(), pv.shape.end()));
  CHECK(sizes[0] == cv::Size(96, 64));
  CHECK(sizes[1] == cv::Size(64, 80));
  float worst = 0;
  for (int64_t i = 0; i < batch.numel(); ++i) worst = std::max(worst, std::fabs(batch[i] - pv.f32[i]));
  CHECK(worst == 0.0f);
}

// ------------------------------------------------------------------------------------- config forms

TEST_CASE("preprocessor_config.json forms and defaults", "[config]") {
  SECTION("legacy ViT feature extractor with an int size") {
    const auto c = parse_preprocess_config(
        R"({"feature_extractor_type":"ViTFeatureExtractor","size":384,"resample":2,"do_normalize":true,
            "image_mean":[0.5,0.5,0.5],"image_std":[0.5,0.5,0.5]})", "x.json");
    CHECK(c.resize_rule == ResizeRule::exact);
    CHECK(resize_output_size({640, 480}, c) == cv::Size(384, 384));
  }
  SECTION("DeiT defaults: 256 bicubic, crop 224, ImageNet mean/std") {
    const auto c = parse_preprocess_config(R"({"image_processor_type":"DeiTImageProcessor"})", "x.json");
    CHECK(c.height == 256);
    CHECK(c.crop_height == 224);
    CHECK(c.resample == Resample::bicubic);
    CHECK(c.image_mean[0] == 0.485f);
    CHECK(preprocess_output_size({500, 300}, c) == cv::Size(224, 224));
  }
  SECTION("DINOv2's BitImageProcessor: shortest_edge 256, crop 224") {
    const auto c = parse_preprocess_config(
        R"({"crop_size":{"height":224,"width":224},"do_center_crop":true,"do_convert_rgb":true,"do_normalize":true,
            "do_rescale":true,"do_resize":true,"image_mean":[0.485,0.456,0.406],"image_processor_type":"BitImageProcessor",
            "image_std":[0.229,0.224,0.225],"resample":3,"rescale_factor":0.00392156862745098,"size":{"shortest_edge":256}})",
        "dinov2.json");
    CHECK(c.resize_rule == ResizeRule::shortest_edge);
    // short side 256, long = int(256 * 451 / 300) = 384; portrait likewise
    CHECK(resize_output_size({451, 300}, c) == cv::Size(384, 256));
    CHECK(resize_output_size({300, 451}, c) == cv::Size(256, 384));
    CHECK(preprocess_output_size({451, 300}, c) == cv::Size(224, 224));
  }
  SECTION("CLIP legacy int size means shortest edge, defaults to CLIP mean") {
    const auto c = parse_preprocess_config(R"({"feature_extractor_type":"CLIPFeatureExtractor","size":224,"crop_size":224})", "c.json");
    CHECK(c.resize_rule == ResizeRule::shortest_edge);
    CHECK(c.shortest_edge == 224);
    CHECK(c.image_mean[0] == 0.48145466f);
  }
  SECTION("DETR: shortest 800 capped by longest 1333") {
    const auto c = parse_preprocess_config(R"({"image_processor_type":"DetrImageProcessor"})", "d.json");
    CHECK(c.resize_rule == ResizeRule::detr);
    // Values from transformers 4.40 get_size_with_aspect_ratio:
    CHECK(resize_output_size({640, 480}, c) == cv::Size(1066, 800));
    CHECK(resize_output_size({2000, 500}, c) == cv::Size(1332, 333));
    CHECK(resize_output_size({800, 800}, c) == cv::Size(800, 800));
    CHECK(resize_output_size({500, 500}, c) == cv::Size(800, 800));
  }
  SECTION("YOLOS legacy size + max_size, multiples of 16") {
    const auto c = parse_preprocess_config(
        R"({"feature_extractor_type":"YolosFeatureExtractor","size":512,"max_size":1333,"format":"coco_detection"})", "y.json");
    CHECK(c.resize_rule == ResizeRule::yolos);
    CHECK(c.longest_edge == 1333);
    CHECK(resize_output_size({640, 480}, c) == cv::Size(672, 512));   // int(512*640/480)=682 -> 672
    CHECK(resize_output_size({3000, 500}, c) == cv::Size(1328, 208)); // size=round(1333*500/3000)=222
    CHECK(resize_output_size({500, 500}, c) == cv::Size(496, 496));   // 4.40: squares are not resized
  }
  SECTION("timm squash and non-square center crops") {
    const auto sq = from_timm_pretrained_cfg(
        R"({"input_size":[3,224,224],"interpolation":"bilinear","crop_pct":1.0,"crop_mode":"squash"})", "t.json");
    CHECK(sq.resize_rule == ResizeRule::exact);
    CHECK(preprocess_output_size({500, 300}, sq) == cv::Size(224, 224));
    const auto ns = from_timm_pretrained_cfg(R"({"input_size":[3,160,240],"crop_pct":1.0})", "t.json");
    CHECK(ns.resize_rule == ResizeRule::keep_ratio);
    CHECK(resize_output_size({500, 300}, ns) == cv::Size(267, 160));  // round(x / min(300/160, 500/240))
  }
}

TEST_CASE("configs that would be silently misread are errors naming file and field", "[config][errors]") {
  const auto msg = [](const char* text) {
    return error_of([&] { parse_preprocess_config(text, "p.json"); });
  };
  CHECK(msg(R"({"image_processor_type":"ViTImageProcessor","resample":7})").find("p.json: field \"resample\"") == 0);
  CHECK(msg(R"({"image_processor_type":"ViTImageProcessor","do_center_crop":true})").find("do_center_crop") != std::string::npos);
  CHECK(msg(R"({"image_processor_type":"ViTImageProcessor","size":{"shortest_edge":224}})").find("\"size\"") != std::string::npos);
  CHECK(msg(R"({"image_processor_type":"BeitImageProcessor"})").find("not supported") != std::string::npos);
  CHECK(msg(R"({"do_resize":true})").find("image_processor_type") != std::string::npos);
  CHECK(msg(R"({"image_processor_type":"DeiTImageProcessor","image_mean":[0.5,0.5]})").find("image_mean") != std::string::npos);
  CHECK(msg(R"({"image_processor_type":"ViTImageProcessor","do_reduce_labels":true})").find("do_reduce_labels") != std::string::npos);
  CHECK(msg("{not json").find("p.json: not valid JSON") == 0);
  // harmless: a false flag the class does not read
  CHECK_NOTHROW(parse_preprocess_config(R"({"image_processor_type":"ViTImageProcessor","do_center_crop":false})", "p.json"));
  const auto timm_msg = error_of([] { from_timm_pretrained_cfg(R"({"interpolation":"random"})", "t.json"); });
  CHECK(timm_msg.find("t.json: field \"interpolation\"") == 0);
}

TEST_CASE("center crop larger than the image pads with zeros like Hugging Face", "[processor]") {
  // HF center_crop of 5 rows to 8: (5-8)//2 = -2 -> two zero rows on top, one below.
  PreprocessConfig c;
  c.source = "test";
  c.do_resize = false;
  c.do_center_crop = true;
  c.crop_height = 8;
  c.crop_width = 3;
  c.crop_rule = CropRule::floor_half;
  cv::Mat img(5, 3, CV_8UC3, cv::Scalar(9, 9, 9));
  cv::Mat out = resize_and_crop(img, c);
  CHECK(out.at<cv::Vec3b>(0, 0)[0] == 0);
  CHECK(out.at<cv::Vec3b>(1, 0)[0] == 0);
  CHECK(out.at<cv::Vec3b>(2, 0)[0] == 9);
  CHECK(out.at<cv::Vec3b>(6, 0)[0] == 9);
  CHECK(out.at<cv::Vec3b>(7, 0)[0] == 0);
  c.crop_rule = CropRule::round_half;  // torchvision: pad (8-5)//2 = 1 on top, 2 below
  out = resize_and_crop(img, c);
  CHECK(out.at<cv::Vec3b>(0, 0)[0] == 0);
  CHECK(out.at<cv::Vec3b>(1, 0)[0] == 9);
  CHECK(out.at<cv::Vec3b>(5, 0)[0] == 9);
  CHECK(out.at<cv::Vec3b>(6, 0)[0] == 0);
}

// ------------------------------------------------------------- the full conformance set, when present

TEST_CASE("every conformance processor case, all photos (needs ../shared/conformance)", "[processor][conformance]") {
  // Optional: the fixtures above hold the first photo of each case; this runs all of them when the
  // conformance folder is around (TESSERA_CONFORMANCE_DIR, else ../shared/conformance next to the source).
  namespace fs = std::filesystem;
  const char* env = std::getenv("TESSERA_CONFORMANCE_DIR");
  const fs::path root = env ? fs::path(env) : fs::path(TESSERA_SOURCE_DIR).parent_path() / "shared" / "conformance";
  if (!fs::exists(root / "processors")) {
    WARN("skipped: no conformance folder at " << root.string());
    return;
  }
  struct Case {
    std::string dir, tensors;
    bool timm;
  };
  std::vector<Case> cases{{"processors/vit-default", "expected.safetensors", false},
                          {"vit-tiny-rand/cases/e2e", "inputs.safetensors", false},
                          {"deit-tiny-distilled-rand/cases/e2e", "inputs.safetensors", false},
                          {"yolos-tiny-rand/cases/e2e", "inputs.safetensors", false}};
  for (const auto& e : fs::directory_iterator(root / "timm"))
    if (fs::exists(e.path() / "cases/e2e/images")) cases.push_back({fs::relative(e.path(), root).string() + "/cases/e2e", "inputs.safetensors", true});
  for (const auto& c : cases) {
    const fs::path d = root / c.dir;
    std::vector<std::string> images;
    PreprocessConfig cfg;
    if (c.timm) {
      for (const auto& e : fs::directory_iterator(d / "images")) images.push_back("images/" + e.path().filename().string());
      std::sort(images.begin(), images.end());
      const fs::path config = d.parent_path().parent_path() / "config.json";
      cfg = from_timm_pretrained_cfg(read_text(config.string()), config.string());
    } else {
      images = json::parse(read_text((d / "meta.json").string())).at("images").get<std::vector<std::string>>();
      cfg = load_preprocess_config((d / "preprocessor_config.json").string());
    }
    std::vector<cv::Mat> rgbs;
    for (const auto& i : images) rgbs.push_back(load_image_rgb((d / i).string()));
    const Tensor got = preprocess_batch(rgbs, cfg);
    const auto pv = read_safetensors((d / c.tensors).string()).at("pixel_values");
    INFO(c.dir << " — " << cfg.describe());
    REQUIRE(got.shape() == Shape(pv.shape.begin(), pv.shape.end()));
    float worst = 0;
    for (int64_t i = 0; i < got.numel(); ++i) worst = std::max(worst, std::fabs(got[i] - pv.f32[i]));
    WARN(c.dir << " (" << images.size() << " photos): max abs diff " << worst);
    CHECK(worst == 0.0f);  // tolerance: exact
  }
}

TEST_CASE("pil_resize and preprocess timings on a 12 Mpixel photo", "[.perf]") {
  // Hidden (run with "[.perf]"): prints how long a phone-sized photo takes to preprocess.
  const cv::Mat big = noise_image(4032, 3024, 5);
  for (Resample r : {Resample::bilinear, Resample::bicubic, Resample::lanczos}) {
    const auto t0 = std::chrono::steady_clock::now();
    const cv::Mat out = pil_resize(big, 224, 224, r);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    WARN("4032x3024 -> 224x224 " << resample_name(r) << ": " << ms << " ms");
    CHECK(out.cols == 224);
  }
  const auto cfg = parse_preprocess_config(R"({"image_processor_type":"BitImageProcessor","size":{"shortest_edge":256}})", "dinov2");
  const auto t0 = std::chrono::steady_clock::now();
  const Tensor t = preprocess(big, cfg);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  WARN("DINOv2 processor on 4032x3024: " << ms << " ms");
  CHECK(t.dim(1) == 224);
}

TEST_CASE("timm crop modes: non-square center, squash, border (torchvision-built reference)", "[processor]") {
  const json configs = json::parse(read_text(kPre + "timm-modes/configs.json"));
  const auto expected = read_safetensors(kPre + "timm-modes/expected.safetensors");
  for (const auto& [cname, cfg_json] : configs.items()) {
    const auto cfg = from_timm_pretrained_cfg(cfg_json.dump(), "timm-modes/" + cname);
    for (const char* image : {"chelsea.png", "coffee_portrait.png"}) {
      INFO(cname << " / " << image << " — " << cfg.describe());
      const auto& e = expected.at(cname + "/" + image);
      const Tensor t = preprocess(load_image_rgb(kPre + "photos/" + image), cfg);
      REQUIRE(t.shape() == Shape(e.shape.begin(), e.shape.end()));
      float worst = 0;
      for (int64_t i = 0; i < t.numel(); ++i) worst = std::max(worst, std::fabs(t[i] - e.f32[i]));
      CHECK(worst == 0.0f);  // tolerance: exact
    }
  }
}

// ------------------------------------------------------------------------- hostile inputs (issue 17)

namespace {
std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }
}  // namespace

TEST_CASE("every format's header is checked before decoding; float formats are refused up front", "[image][errors]") {
  struct Case {
    std::string name, bytes, words;
  };
  auto le32s = [](uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); };
  auto le16s = [](uint16_t v) { return std::string(reinterpret_cast<const char*>(&v), 2); };
  // BITMAPINFOHEADER of 100000 x 100000, 24 bits, no pixels.
  const std::string bmp = "BM" + le32s(54) + le32s(0) + le32s(54) + le32s(40) + le32s(100000) + le32s(100000) +
                          le16s(1) + le16s(24) + std::string(24, '\0');
  // Little-endian TIFF, one IFD with ImageWidth / ImageLength (LONG) 100000.
  const std::string tiff = std::string("II*\0", 4) + le32s(8) + le16s(2) + le16s(256) + le16s(4) + le32s(1) +
                           le32s(100000) + le16s(257) + le16s(4) + le32s(1) + le32s(100000) + le32s(0);
  const Case cases[] = {
      {"big.ppm", "P6\n# a comment\n100000 100000\n255\n", "image is 100000x100000"},
      {"big.pgm", "P5 100000 100000 65535\n", "image is 100000x100000"},
      // Found by the image fuzzer: OpenCV ends a PNM number at any non-digit byte (and consumes
      // it), so this header is 1621 x 522521, 16-bit; it allocated 5 GB before being refused.
      {"bytes.ppm", std::string("P6\n1621\xd9\n522521\xd9\n5225\xfe" "3"), "image is 1621x522521"},
      {"comment.pgm", "P5 #\r30000#\n 40000\n255\n", "image is 30000x40000"},
      {"big.pam", "P7\nWIDTH 100000\nHEIGHT 100000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n", "image is 100000x100000"},
      {"big.bmp", bmp, "image is 100000x100000"},
      {"big.tif", tiff, "image is 100000x100000"},
      {"big.ras", std::string("\x59\xa6\x6a\x95\x00\x01\x86\xa0\x00\x01\x86\xa0\x00\x00\x00\x18", 16) + std::string(16, '\0'),
       "image is 100000x100000"},
      {"big.pfm", "PF\n100000 100000\n-1.0\n", "PFM is a float format"},
      {"big.hdr", "#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 100000 +X 100000\n", "Radiance HDR is a float format"},
  };
  for (const Case& c : cases) {
    const std::string msg = error_of([&] { decode_image_rgb(bytes_of(c.bytes), c.name); });
    INFO(c.name << ": " << msg);
    CHECK(msg.rfind(c.name + ": ", 0) == 0);
    CHECK(msg.find(c.words) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
  }
  // The same formats at sane sizes still decode, to the pixels written.
  cv::Mat bgr(3, 5, CV_8UC3);
  cv::randu(bgr, 0, 256);
  cv::Mat rgb_expected;
  cv::cvtColor(bgr, rgb_expected, cv::COLOR_BGR2RGB);
  for (const char* ext : {".ppm", ".pam", ".bmp", ".tiff", ".ras"}) {
    std::vector<uint8_t> buf;
    REQUIRE(cv::imencode(ext, bgr, buf));
    const cv::Mat rgb = decode_image_rgb(buf, std::string("small") + ext);
    INFO(ext);
    REQUIRE(rgb.size() == bgr.size());
    CHECK(cv::norm(rgb, rgb_expected, cv::NORM_INF) == 0);
  }
}

TEST_CASE("a file name with a NUL byte is an error naming it, not the folder it would cut to", "[image][errors]") {
  const std::string msg = error_of([] { load_image_rgb(kImages + std::string("\0\0\0", 3)); });
  CHECK(msg.find("NUL byte") != std::string::npos);
  CHECK(msg.find(kImages + "???") == 0);
}

TEST_CASE("hostile processor configs: deep nesting, 1e999, absurd sizes, wrong types name the file", "[config][errors]") {
  const auto msg = [](const std::string& text) { return error_of([&] { parse_preprocess_config(text, "p.json"); }); };
  const auto timm = [](const std::string& text) { return error_of([&] { from_timm_pretrained_cfg(text, "t.json"); }); };
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  CHECK(msg(R"({"image_processor_type":"ViTImageProcessor","size":)" + deep + "}").rfind("p.json: JSON nests", 0) == 0);
  CHECK(timm(R"({"input_size":)" + deep + "}").rfind("t.json: JSON nests", 0) == 0);
  const std::string overflow = msg(R"({"image_processor_type":"ViTImageProcessor","rescale_factor":1e999})");
  CHECK(overflow.rfind("p.json: not valid JSON", 0) == 0);
  CHECK(overflow.find("1e999") != std::string::npos);
  for (const char* size : {"100000", "1000000", R"({"height":224,"width":1000000})"}) {
    const std::string m = msg(std::string(R"({"image_processor_type":"ViTImageProcessor","size":)") + size + "}");
    INFO(m);
    CHECK(m.rfind("p.json: field \"size", 0) == 0);
    CHECK(m.find("larger than the limit of 16384") != std::string::npos);
  }
  CHECK(timm(R"({"input_size":[3,1000000,1000000]})").rfind("t.json: field \"input_size[1]\"", 0) == 0);
  CHECK(timm(R"({"input_size":["3","a","b"]})").rfind("t.json: field \"input_size\"", 0) == 0);
  CHECK(timm(R"({"input_size":[3,null,null]})").rfind("t.json: field \"input_size[1]\"", 0) == 0);
  CHECK(timm(R"({"input_size":[3,224,224],"crop_pct":1e-9})").rfind("t.json: field \"crop_pct\"", 0) == 0);
  // A value echoed in a message is cut short, on one line.
  const std::string long_value = msg(R"({"image_processor_type":"ViTImageProcessor","do_resize":")" + std::string(100000, 'x') + "\"}");
  CHECK(long_value.size() < 300);
}

TEST_CASE("token budget: an input that would make too many tokens is refused before pre-processing", "[processor][errors]") {
  // YOLOS as transformers 4.40 does it: a square image is not resized (the quirk stays reproduced).
  PreprocessConfig yolos = parse_preprocess_config(
      R"({"image_processor_type":"YolosImageProcessor","size":{"shortest_edge":800,"longest_edge":1333}})", "y.json");
  CHECK(preprocess_output_size({4000, 4000}, yolos) == cv::Size(4000, 4000));
  const Preprocessor pre{yolos, "y.json", 16};
  set_max_tokens(0);
  CHECK(max_tokens() >= 1024);
  CHECK(max_tokens() <= 16384);
  const std::string msg = error_of([&] { pre.check_tokens({4000, 4000}, "square.png"); });
  INFO(msg);
  CHECK(msg.rfind("square.png: a 4000x4000 (WxH) model input makes 62500 tokens of 16x16 pixels", 0) == 0);
  CHECK(msg.find("resize it to at most") != std::string::npos);
  CHECK(msg.find("--max-tokens") != std::string::npos);
  CHECK_NOTHROW(pre.check_tokens({800, 600}, "photo.jpg"));  // 1066x800: 3300 tokens
  set_max_tokens(1000);
  const std::string small = error_of([&] { pre.check_tokens({800, 600}, "photo.jpg"); });
  CHECK(small.find("3300 tokens") != std::string::npos);
  CHECK(small.find("more than the limit of 1000") != std::string::npos);
  // The suggested size fits.
  CHECK(small.find("resize it to at most 576x432") != std::string::npos);  // 36 x 27 = 972 tokens
  set_max_tokens(0);
  // A resize target that is absurd for this image is refused before resizing, naming the image.
  PreprocessConfig clip = parse_preprocess_config(R"({"image_processor_type":"CLIPImageProcessor","size":16384,"crop_size":224})", "c.json");
  const Preprocessor pc{clip, "c.json", 16};
  CHECK(error_of([&] { pc.check_tokens({16000, 1}, "strip.png"); }).rfind("strip.png: c.json resizes this 16000x1 image", 0) == 0);
}

namespace fs = std::filesystem;

TEST_CASE("label maps: PNG only, one channel, 8 or 16 bits; anything else is one line naming the file",
          "[image][errors]") {
  const fs::path dir = fs::temp_directory_path() / ("tessera-labelmap-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto put = [&](const std::string& name, const std::vector<uint8_t>& bytes) {
    std::ofstream((dir / name).string(), std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                                 static_cast<std::streamsize>(bytes.size()));
    return (dir / name).string();
  };
  // Kept as read: 8- and 16-bit values.
  cv::Mat m8(5, 7, CV_8U), m16(4, 3, CV_16U);
  cv::randu(m8, 0, 256), cv::randu(m16, 0, 65536);
  std::vector<uint8_t> png8, png16, rgb, bmp;
  REQUIRE(cv::imencode(".png", m8, png8));
  REQUIRE(cv::imencode(".png", m16, png16));
  CHECK(cv::norm(load_label_map(put("a.png", png8)), m8, cv::NORM_INF) == 0);
  CHECK(cv::norm(load_label_map(put("b.png", png16)), m16, cv::NORM_INF) == 0);
  REQUIRE(cv::imencode(".png", cv::Mat(3, 3, CV_8UC3, cv::Scalar(1, 2, 3)), rgb));
  REQUIRE(cv::imencode(".bmp", m8, bmp));
  std::vector<uint8_t> truncated(png8.begin(), png8.begin() + static_cast<std::ptrdiff_t>(png8.size() / 2));
  // Found by the masks fuzzer: "DICM" at 128 went to GDCM, which aborted the process; a BMP-like
  // header made OpenCV throw past the loader (both were read with a bare cv::imread).
  const std::string fuzz = std::string(TESSERA_SOURCE_DIR) + "/tests/fuzz/regressions/masks/";
  const std::pair<std::string, std::string> cases[] = {
      {put("rgb.png", rgb), "one-channel 8- or 16-bit PNG"},
      {put("bmp.png", bmp), "must be a PNG"},
      {put("half.png", truncated), "cannot decode the label map"},
      {put("empty.png", {}), "must be a PNG"},
      {fuzz + "gdcm-abort-dicm-at-128.png", "must be a PNG"},
      {fuzz + "uncaught-cv-exception-height.png", "must be a PNG"},
      {(dir / "missing.png").string(), "no such file"},
  };
  for (const auto& [path, words] : cases) {
    const std::string msg = error_of([&] { load_label_map(path); });
    INFO(path << ": " << msg);
    CHECK(msg.rfind(path + ": ", 0) == 0);
    CHECK(msg.find(words) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
  }
  // The DICOM input is refused by the image decoder too, before OpenCV sees it.
  std::ifstream in(fuzz + "gdcm-abort-dicm-at-128.png", std::ios::binary);
  const std::vector<uint8_t> dicom((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(error_of([&] { decode_image_rgb(dicom, "x.dcm"); }).find("DICOM is not supported") != std::string::npos);
  fs::remove_all(dir);
}
