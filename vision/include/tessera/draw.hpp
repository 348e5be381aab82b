#pragma once
// Pictures a person looks at: detection boxes with label tags, heat maps over images, and the
// small text panels of the viewer. Everything draws on 8-bit BGR images (OpenCV's order).
//
// Sizes follow the image: line width and font scale grow with the shorter side, so a 64x48
// thumbnail and a 4000x3000 photo both get boxes and tags that read at 100 % zoom. Box edges are
// drawn without anti-aliasing (their pixels are exactly the class colour); text is anti-aliased.
#include <opencv2/core.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/detection.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

struct DrawOptions {
  bool labels = true;     // draw the "name 0.87" tag above each box
  float font_scale = 0;   // 0 = from the image size
  int thickness = 0;      // box line width in pixels; 0 = from the image size
};

// A stable, distinct colour per class id (BGR): hues stepped by the golden ratio, so neighbouring
// ids get far-apart hues and a class keeps its colour across images, runs and programs.
cv::Scalar class_colour(int64_t label);

// Black or white, whichever reads better on `background` (BGR), by its relative luminance.
cv::Scalar text_colour_on(const cv::Scalar& background);

// Where a detection's tag goes, and how it is written (draw_detections uses exactly this).
struct TagLayout {
  cv::Rect box;          // the box in integer pixels, clipped to the image
  cv::Rect tag;          // the filled tag, always inside the image
  cv::Point text_origin; // baseline origin of the text inside the tag
  std::string text;      // "name 0.87" (the name shortened with ".." if the image is too narrow)
  double font_scale = 0;
  int text_thickness = 1;
};
// The tag sits on top of the box; at the image's top edge it flips inside the box, and at the
// right edge it slides left. Boxes entirely outside the image get an empty box rectangle.
TagLayout layout_tag(cv::Size image, const Detection& d, const DrawOptions& options);

// The auto sizes for an image (what DrawOptions' zeros mean).
int auto_thickness(cv::Size image);
double auto_font_scale(cv::Size image);

// Draws each detection: a box in its class colour and, with options.labels, a filled tag with
// "name score" in black or white, whichever contrasts. `bgr` must be CV_8UC3.
void draw_detections(cv::Mat& bgr, const std::vector<Detection>& detections, const DrawOptions& options);

// The image with `grid_map` ([gh, gw], any range: min-max normalised) as a colour heat map
// (turbo: blue = low, red = high) blended over it: out = (1 - alpha) · image + alpha · heat.
// The map is stretched smoothly (bicubic) over the whole image. Same size and type as `bgr`.
cv::Mat heatmap_overlay(const cv::Mat& bgr, const Tensor& grid_map, float alpha);

// As heatmap_overlay, but the map covers only `region` of the image (e.g. the center crop the
// model saw); the rest of the image is shown dimmed, so it is clear that the model never saw it.
cv::Mat heatmap_overlay(const cv::Mat& bgr, const Tensor& grid_map, float alpha, const cv::Rect2d& region);

// A panel of text lines on a translucent dark background at the top-left (or bottom-left)
// corner, for captions and readouts. `swatches[i]` (BGR) is drawn as a small colour square
// before line i (a legend); lines past the end of `swatches`, or whose swatch has a negative 4th
// value, get none. Font scale: `font_scale`, 0 = from the image.
void draw_text_panel(cv::Mat& bgr, const std::vector<std::string>& lines, bool bottom = false,
                     const std::vector<cv::Scalar>& swatches = {}, double font_scale = 0);

// A picture with its legend beside it, not over it: `bgr` enlarged by a whole factor (nearest
// neighbour, so every pixel stays a crisp block) until its shorter side is at least `min_side`
// (its longer side kept within 4096), then a dark panel to its right with `lines` (a swatch
// before line i as in draw_text_panel), the text sized from the enlarged picture (a 30th of its
// shorter side, at least 11 px). The canvas is as tall as the taller of the two. No lines: the
// enlarged picture alone.
cv::Mat with_legend_beside(const cv::Mat& bgr, const std::vector<std::string>& lines,
                           const std::vector<cv::Scalar>& swatches = {}, int min_side = 256);

// Encodes `bgr` (format from the extension, e.g. .png) and writes it atomically: to a temporary
// file in the same folder, then renamed over `path`, so no partial file is ever left behind.
void write_image_atomic(const std::string& path, const cv::Mat& bgr);

}  // namespace tessera
