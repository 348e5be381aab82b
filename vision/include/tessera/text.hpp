#pragma once
// Text on pictures, in a real font: glyphs rasterised by stb_truetype from a TrueType file found at
// run time, anti-aliased and alpha-blended onto 8-bit BGR images. The font is, in order:
// set_font_path() (the CLI's --font), $TESSERA_FONT, DejaVu Sans from Debian's fonts-dejavu-core
// (/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf); when none can be read, OpenCV's Hershey
// simplex font, with a one-line note on stderr (once per process).
//
// Sizes are in pixels: `px` is the font's full line height (ascent + descent, stb_truetype's
// ScaleForPixelHeight). Metrics are the font's, not the string's ink, so labels line up whatever
// letters they hold. Thread-safe: glyphs are rasterised on the caller's stack.
#include <opencv2/core.hpp>

#include <string>

namespace tessera {

// Uses the TrueType file at `path` from now on; Error naming the file if it is not one.
void set_font_path(const std::string& path);
// "DejaVu Sans (/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf)", or "Hershey simplex (fallback)".
std::string font_description();
bool truetype_font_available();

struct TextExtent {
  int width = 0;    // advance width of the string, pixels
  int ascent = 0;   // above the baseline
  int descent = 0;  // below the baseline
  int height() const { return ascent + descent; }
};
// The extent of UTF-8 `text` (invalid bytes are drawn as U+FFFD) at line height `px`.
TextExtent text_extent(const std::string& text, double px);

// Draws `text` with the left end of its baseline at `origin`, in `colour` (BGR), anti-aliased;
// pixels outside the image are skipped. `bgr` must be CV_8UC3.
void draw_text(cv::Mat& bgr, const std::string& text, cv::Point origin, double px, const cv::Scalar& colour);

// A TrueType file's ink for `text` (coverage 0..255, CV_8UC1) at line height px, for tests; the
// baseline is at row `ascent` of the result. Error when no TrueType font is loaded.
cv::Mat render_text_coverage(const std::string& text, double px, TextExtent* extent = nullptr);

}  // namespace tessera
