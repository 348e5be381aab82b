#include "tessera/draw.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "tessera/atomic_file.hpp"
#include "tessera/error.hpp"
#include "tessera/text.hpp"

namespace fs = std::filesystem;

namespace tessera {

namespace {
// A font scale of 1 is a 32-pixel line (text.hpp sizes text by its line height in pixels).
constexpr double kPxPerScale = 32.0;

// HSV (h in [0, 1), s, v in [0, 1]) → BGR in [0, 255].
cv::Scalar hsv_to_bgr(double h, double s, double v) {
  const double h6 = h * 6.0;
  const int sector = static_cast<int>(std::floor(h6)) % 6;
  const double f = h6 - std::floor(h6);
  const double p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
  double r = 0, g = 0, b = 0;
  switch (sector) {
    case 0: r = v, g = t, b = p; break;
    case 1: r = q, g = v, b = p; break;
    case 2: r = p, g = v, b = t; break;
    case 3: r = p, g = q, b = v; break;
    case 4: r = t, g = p, b = v; break;
    default: r = v, g = p, b = q; break;
  }
  return {std::round(b * 255), std::round(g * 255), std::round(r * 255)};
}

std::string score_text(float score) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f", score);
  return buf;
}

}  // namespace

cv::Scalar class_colour(int64_t label) {
  // Golden-ratio hue steps; saturation/value alternate a little so that ids whose hues come
  // close again after many steps still differ. Bright enough to stand out on photos.
  const double golden = 0.6180339887498949;
  const double hue = std::fmod(0.07 + static_cast<double>(label < 0 ? -label : label) * golden, 1.0);
  const double sat = (label % 3 == 0) ? 0.85 : (label % 3 == 1 ? 0.70 : 0.95);
  const double val = (label % 2 == 0) ? 0.98 : 0.85;
  return hsv_to_bgr(hue, sat, val);
}

cv::Scalar text_colour_on(const cv::Scalar& bg) {
  // Relative luminance (sRGB weights on the 8-bit values; good enough to pick black or white).
  const double lum = 0.0722 * bg[0] + 0.7152 * bg[1] + 0.2126 * bg[2];
  return lum > 140 ? cv::Scalar(0, 0, 0) : cv::Scalar(255, 255, 255);
}

int auto_thickness(cv::Size image) {
  return std::max(1, static_cast<int>(std::lround(std::min(image.width, image.height) / 320.0)));
}

double auto_font_scale(cv::Size image) {
  // 11 px on a thumbnail, ~120 px on a 4000x3000 photo: readable at 100 % zoom either way.
  return std::clamp(std::min(image.width, image.height) / 800.0, 0.34, 4.0);
}

TagLayout layout_tag(cv::Size image, const Detection& d, const DrawOptions& options) {
  TagLayout L;
  const int W = image.width, H = image.height;
  const int t = options.thickness > 0 ? options.thickness : auto_thickness(image);
  const int x0 = static_cast<int>(std::lround(d.x0)), y0 = static_cast<int>(std::lround(d.y0));
  const int x1 = static_cast<int>(std::lround(d.x1)), y1 = static_cast<int>(std::lround(d.y1));
  if (x1 < 0 || y1 < 0 || x0 > W - 1 || y0 > H - 1 || x1 < x0 || y1 < y0 || W <= 0 || H <= 0) return L;
  const int cx0 = std::max(0, x0), cy0 = std::max(0, y0);
  const int cx1 = std::min(W - 1, x1), cy1 = std::min(H - 1, y1);
  L.box = cv::Rect(cx0, cy0, cx1 - cx0 + 1, cy1 - cy0 + 1);

  std::string name = d.name.empty() ? std::to_string(d.label) : d.name;
  L.font_scale = options.font_scale > 0 ? options.font_scale : auto_font_scale(image);
  L.text_thickness = 1;
  auto measure = [&](const std::string& text) { return text_extent(text, L.font_scale * kPxPerScale); };
  L.text = name + " " + score_text(d.score);
  TextExtent ts = measure(L.text);
  auto pad_for = [](const TextExtent& e) { return std::max(1, static_cast<int>(std::lround(e.ascent * 0.25))); };
  int pad = pad_for(ts);
  // Too wide for the image: a smaller font first (down to 0.25), then a shortened name.
  if (ts.width + 2 * pad > W && L.font_scale > 0.25) {
    L.font_scale = std::max(0.25, L.font_scale * (W - 2.0 * pad) / ts.width);
    ts = measure(L.text);
    pad = pad_for(ts);
  }
  while (ts.width + 2 * pad > W && !name.empty()) {
    name.pop_back();
    L.text = name.empty() ? score_text(d.score) : name + ".. " + score_text(d.score);
    ts = measure(L.text);
  }
  const int tag_w = std::min(W, ts.width + 2 * pad), tag_h = std::min(H, ts.height() + pad);
  // Above the box, flush with the outer edge of its line; inside the box at the top edge.
  int tx = x0 - t / 2, ty = y0 + (t + 1) / 2 - tag_h;  // its bottom covers the line
  if (ty < 0) ty = std::max(0, y0 - t / 2);
  tx = std::clamp(tx, 0, W - tag_w);
  ty = std::clamp(ty, 0, H - tag_h);
  L.tag = cv::Rect(tx, ty, tag_w, tag_h);
  L.text_origin = cv::Point(tx + pad, ty + pad / 2 + ts.ascent);
  return L;
}

void draw_detections(cv::Mat& bgr, const std::vector<Detection>& detections, const DrawOptions& options) {
  check(bgr.type() == CV_8UC3, "draw_detections: expected an 8-bit BGR image (CV_8UC3), got " +
                                   cv::typeToString(bgr.type()));
  const int t = options.thickness > 0 ? options.thickness : auto_thickness(bgr.size());
  // The most confident on top: draw in ascending score, boxes first, then every tag.
  std::vector<const Detection*> order;
  for (const auto& d : detections) order.push_back(&d);
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->score < b->score; });
  std::vector<std::pair<const Detection*, TagLayout>> tags;
  for (const Detection* d : order) {
    TagLayout L = layout_tag(bgr.size(), *d, options);
    if (L.box.empty()) continue;  // entirely outside the image
    cv::rectangle(bgr, cv::Point(static_cast<int>(std::lround(d->x0)), static_cast<int>(std::lround(d->y0))),
                  cv::Point(static_cast<int>(std::lround(d->x1)), static_cast<int>(std::lround(d->y1))),
                  class_colour(d->label), t, cv::LINE_8);
    if (options.labels) tags.emplace_back(d, std::move(L));
  }
  for (const auto& [d, L] : tags) {
    const cv::Scalar colour = class_colour(d->label);
    cv::rectangle(bgr, L.tag, colour, cv::FILLED, cv::LINE_8);
    draw_text(bgr, L.text, L.text_origin, L.font_scale * kPxPerScale, text_colour_on(colour));
  }
}

cv::Mat heatmap_overlay(const cv::Mat& bgr, const Tensor& grid_map, float alpha) {
  return heatmap_overlay(bgr, grid_map, alpha, cv::Rect2d(0, 0, bgr.cols, bgr.rows));
}

cv::Mat heatmap_overlay(const cv::Mat& bgr, const Tensor& grid_map, float alpha, const cv::Rect2d& region) {
  check(bgr.type() == CV_8UC3, "heatmap_overlay: expected an 8-bit BGR image (CV_8UC3), got " +
                                   cv::typeToString(bgr.type()));
  check(grid_map.ndim() == 2 && grid_map.numel() > 0,
        "heatmap_overlay: the map must be [grid_height, grid_width], got " + shape_str(grid_map.shape()));
  check(alpha >= 0 && alpha <= 1, "heatmap_overlay: alpha must be in [0, 1]");
  const int gh = static_cast<int>(grid_map.dim(0)), gw = static_cast<int>(grid_map.dim(1));
  cv::Mat map(gh, gw, CV_32F);
  std::copy(grid_map.data(), grid_map.data() + grid_map.numel(), map.ptr<float>());
  double lo = 0, hi = 0;
  cv::minMaxLoc(map, &lo, &hi);
  map = hi > lo ? (map - lo) / (hi - lo) : cv::Mat::zeros(gh, gw, CV_32F);

  const cv::Rect image_rect(0, 0, bgr.cols, bgr.rows);
  const cv::Rect target(static_cast<int>(std::lround(region.x)), static_cast<int>(std::lround(region.y)),
                        std::max(1, static_cast<int>(std::lround(region.width))),
                        std::max(1, static_cast<int>(std::lround(region.height))));
  const cv::Rect inside = target & image_rect;
  cv::Mat out;
  if (inside == image_rect) {
    out = bgr.clone();
  } else {
    bgr.convertTo(out, -1, 0.4, 0);  // outside what the model saw: dimmed
  }
  if (inside.empty()) return out;
  cv::Mat big;
  cv::resize(map, big, target.size(), 0, 0, cv::INTER_CUBIC);  // half-pixel centres, as align_corners=False
  cv::Mat big8;
  big.convertTo(big8, CV_8U, 255.0);  // saturates the bicubic overshoot
  cv::Mat heat;
  cv::applyColorMap(big8, heat, cv::COLORMAP_TURBO);
  const cv::Rect in_heat(inside.x - target.x, inside.y - target.y, inside.width, inside.height);
  cv::Mat dst = out(inside);
  cv::addWeighted(bgr(inside), 1.0 - alpha, heat(in_heat), alpha, 0.0, dst);
  return out;
}

namespace {

// The layout of a panel of text lines (a swatch before line i where swatches[i][3] >= 0) at
// px pixels per line: draw_text_panel draws it over a picture, with_legend_beside beside one.
struct TextPanel {
  double px = 0;
  TextExtent one;
  int pad = 0, line_h = 0, swatch = 0;
  cv::Size size;
};

bool has_swatch(const std::vector<cv::Scalar>& swatches, size_t i) { return i < swatches.size() && swatches[i][3] >= 0; }

// A 30th of the shorter side (17 px on a 512-pixel image), at least 11 px.
double panel_px(cv::Size image) { return std::clamp(std::min(image.width, image.height) / 30.0, 11.0, 96.0); }

TextPanel text_panel(const std::vector<std::string>& lines, const std::vector<cv::Scalar>& swatches, double px) {
  TextPanel L;
  L.px = px;
  L.one = text_extent("Ag", px);
  L.pad = std::max(2, L.one.ascent / 2), L.line_h = L.one.height() + L.pad / 2, L.swatch = L.one.ascent;
  int width = 0;
  for (size_t i = 0; i < lines.size(); ++i)
    width = std::max(width, text_extent(lines[i], px).width + (has_swatch(swatches, i) ? L.swatch + L.pad : 0));
  L.size = {width + 2 * L.pad, static_cast<int>(lines.size()) * L.line_h + L.pad};
  return L;
}

// The lines of a panel whose top-left corner is `origin`, white on whatever is there.
void draw_panel_lines(cv::Mat& bgr, const TextPanel& L, cv::Point origin, const std::vector<std::string>& lines,
                      const std::vector<cv::Scalar>& swatches) {
  for (size_t i = 0; i < lines.size(); ++i) {
    int x = origin.x + L.pad;
    const int base_y = origin.y + L.pad / 2 + static_cast<int>(i) * L.line_h + L.one.ascent + L.pad / 4;
    if (has_swatch(swatches, i)) {
      cv::rectangle(bgr, cv::Rect(x, base_y - L.swatch + L.one.descent / 2, L.swatch, L.swatch),
                    cv::Scalar(swatches[i][0], swatches[i][1], swatches[i][2]), cv::FILLED);
      x += L.swatch + L.pad;
    }
    draw_text(bgr, lines[i], cv::Point(x, base_y), L.px, cv::Scalar(255, 255, 255));
  }
}

}  // namespace

void draw_text_panel(cv::Mat& bgr, const std::vector<std::string>& lines, bool bottom,
                     const std::vector<cv::Scalar>& swatches, double font_scale) {
  check(bgr.type() == CV_8UC3, "draw_text_panel: expected an 8-bit BGR image (CV_8UC3)");
  if (lines.empty()) return;
  // Line height: from the scale asked for, else from the image.
  const TextPanel L = text_panel(lines, swatches, font_scale > 0 ? font_scale * kPxPerScale : panel_px(bgr.size()));
  cv::Rect panel(0, bottom ? bgr.rows - L.size.height : 0, L.size.width, L.size.height);
  panel &= cv::Rect(0, 0, bgr.cols, bgr.rows);
  if (panel.empty()) return;
  cv::Mat roi = bgr(panel);
  roi.convertTo(roi, -1, 0.35, 0);  // translucent dark background: the picture shows through
  draw_panel_lines(bgr, L, panel.tl(), lines, swatches);
}

cv::Mat with_legend_beside(const cv::Mat& bgr, const std::vector<std::string>& lines,
                           const std::vector<cv::Scalar>& swatches, int min_side) {
  check(bgr.type() == CV_8UC3 && !bgr.empty(), "with_legend_beside: expected an 8-bit BGR image (CV_8UC3)");
  const int short_side = std::min(bgr.cols, bgr.rows), long_side = std::max(bgr.cols, bgr.rows);
  int s = short_side < min_side ? (min_side + short_side - 1) / short_side : 1;
  s = std::max(1, std::min(s, 4096 / long_side));
  cv::Mat big;
  if (s > 1)
    cv::resize(bgr, big, cv::Size(bgr.cols * s, bgr.rows * s), 0, 0, cv::INTER_NEAREST);
  else
    big = bgr.clone();
  if (lines.empty()) return big;
  const TextPanel L = text_panel(lines, swatches, panel_px(big.size()));
  cv::Mat out(std::max(big.rows, L.size.height), big.cols + L.size.width, CV_8UC3, cv::Scalar(40, 40, 40));
  big.copyTo(out(cv::Rect(0, 0, big.cols, big.rows)));
  draw_panel_lines(out, L, {big.cols, 0}, lines, swatches);
  return out;
}

void write_image_atomic(const std::string& path, const cv::Mat& bgr) {
  std::string ext = fs::path(path).extension().string();
  if (ext.empty()) fail(path + ": no file extension to choose the image format from (e.g. .png)");
  std::vector<uchar> bytes;
  bool ok = false;
  try {
    ok = cv::imencode(ext, bgr, bytes);
  } catch (const cv::Exception&) {
    ok = false;
  }
  if (!ok) fail(path + ": cannot encode the image as " + ext);
  const fs::path target(path);
  std::string tmp_name = ".";  // built in steps: GCC 12 warns falsely (-Wrestrict) on "." + string
  tmp_name += target.filename().string();
  tmp_name += ".tmp-" + std::to_string(::getpid());
  write_file_atomic(path, bytes.data(), bytes.size(), (target.parent_path() / tmp_name).string());
}

}  // namespace tessera
