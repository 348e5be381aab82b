// Text in a TrueType font (see text.hpp). stb_truetype is a single-header library (Debian's
// libstb-dev); its implementation lives in this file only.
#include "tessera/text.hpp"

#define STB_TRUETYPE_IMPLEMENTATION
#define STBTT_STATIC
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb_truetype.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <opencv2/imgproc.hpp>
#include <sstream>
#include <vector>

#include "tessera/error.hpp"

namespace tessera {

namespace {

constexpr const char* kDejaVu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

struct TrueType {
  std::string path;
  std::vector<unsigned char> bytes;
  stbtt_fontinfo info{};
  int ascent = 0, descent = 0, line_gap = 0;  // font units
};

std::shared_ptr<const TrueType> load_truetype(const std::string& path) {
  std::error_code ec;
  check(std::filesystem::is_regular_file(path, ec), path + ": font file not found");
  const auto size = std::filesystem::file_size(path, ec);
  check(!ec && size > 12 && size < (64u << 20), path + ": not a TrueType font (size " + std::to_string(size) + " bytes)");
  auto font = std::make_shared<TrueType>();
  font->path = path;
  std::ifstream in(path, std::ios::binary);
  font->bytes.resize(size);
  in.read(reinterpret_cast<char*>(font->bytes.data()), static_cast<std::streamsize>(size));
  check(static_cast<bool>(in), path + ": cannot read the font file");
  const int offset = stbtt_GetFontOffsetForIndex(font->bytes.data(), 0);
  check(offset >= 0 && stbtt_InitFont(&font->info, font->bytes.data(), offset) != 0,
        path + ": not a TrueType font stb_truetype can read");
  stbtt_GetFontVMetrics(&font->info, &font->ascent, &font->descent, &font->line_gap);
  check(font->ascent > font->descent, path + ": font has no vertical metrics");
  return font;
}

std::mutex g_mutex;
std::shared_ptr<const TrueType> g_font;
bool g_resolved = false;

std::shared_ptr<const TrueType> current_font() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_resolved) {
    g_resolved = true;
    std::string tried;
    const char* env = std::getenv("TESSERA_FONT");
    for (const std::string& path : {std::string(env ? env : ""), std::string(kDejaVu)}) {
      if (path.empty()) continue;
      try {
        g_font = load_truetype(path);
        break;
      } catch (const Error& e) {
        tried += std::string(tried.empty() ? "" : "; ") + e.what();
      }
    }
    if (!g_font)
      std::fprintf(stderr, "tessera: note: no TrueType font (%s): text uses OpenCV's Hershey font "
                           "(apt-get install fonts-dejavu-core, or --font / TESSERA_FONT)\n", tried.c_str());
  }
  return g_font;
}

// Next code point of UTF-8 `s` from `i` (advanced); U+FFFD for an invalid sequence.
uint32_t next_codepoint(const std::string& s, size_t& i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  int extra = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
  if (extra < 0 || i + static_cast<size_t>(extra) >= s.size()) {
    ++i;
    return 0xFFFD;
  }
  uint32_t cp = extra == 0 ? c : c & (0x3F >> extra);
  for (int k = 1; k <= extra; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) {
      ++i;
      return 0xFFFD;
    }
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  i += static_cast<size_t>(extra) + 1;
  return cp;
}

std::vector<uint32_t> codepoints(const std::string& s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(next_codepoint(s, i));
  return out;
}

// Hershey fallback: font scale for a line height of px pixels (SIMPLEX: ~30 px at scale 1).
double hershey_scale(double px) { return px / 30.0; }
int hershey_thickness(double px) { return std::max(1, static_cast<int>(std::lround(px / 18.0))); }

// Calls glyph(index, x_pixels) for each code point with kerning applied; returns the total advance.
template <class Glyph>
double layout(const TrueType& f, const std::vector<uint32_t>& cps, float scale, Glyph&& glyph) {
  double x = 0;
  int prev = 0;
  for (uint32_t cp : cps) {
    int g = stbtt_FindGlyphIndex(&f.info, static_cast<int>(cp));
    if (g == 0) g = stbtt_FindGlyphIndex(&f.info, 0xFFFD);
    if (prev) x += scale * stbtt_GetGlyphKernAdvance(&f.info, prev, g);
    glyph(g, x);
    int advance = 0, lsb = 0;
    stbtt_GetGlyphHMetrics(&f.info, g, &advance, &lsb);
    x += scale * advance;
    prev = g;
  }
  return x;
}

TextExtent extent_of(const TrueType& f, const std::vector<uint32_t>& cps, double px) {
  const float scale = stbtt_ScaleForPixelHeight(&f.info, static_cast<float>(px));
  TextExtent e;
  e.width = static_cast<int>(std::ceil(layout(f, cps, scale, [](int, double) {})));
  e.ascent = static_cast<int>(std::ceil(scale * f.ascent));
  e.descent = static_cast<int>(std::ceil(-scale * f.descent));
  return e;
}

// Rasterises each glyph (at its sub-pixel x) and hands over coverage with its top-left corner
// relative to the baseline origin.
template <class Sink>
void rasterise(const TrueType& f, const std::vector<uint32_t>& cps, double px, Sink&& sink) {
  const float scale = stbtt_ScaleForPixelHeight(&f.info, static_cast<float>(px));
  std::vector<unsigned char> buffer;
  layout(f, cps, scale, [&](int g, double x) {
    const double xf = std::floor(x);
    const float shift = static_cast<float>(x - xf);
    int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
    stbtt_GetGlyphBitmapBoxSubpixel(&f.info, g, scale, scale, shift, 0, &x0, &y0, &x1, &y1);
    const int w = x1 - x0, h = y1 - y0;
    if (w <= 0 || h <= 0) return;
    buffer.assign(static_cast<size_t>(w) * h, 0);
    stbtt_MakeGlyphBitmapSubpixel(&f.info, buffer.data(), w, h, w, scale, scale, shift, 0, g);
    sink(buffer.data(), w, h, static_cast<int>(xf) + x0, y0);
  });
}

}  // namespace

void set_font_path(const std::string& path) {
  auto font = load_truetype(path);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_font = std::move(font);
  g_resolved = true;
}

bool truetype_font_available() { return current_font() != nullptr; }

std::string font_description() {
  const auto f = current_font();
  if (!f) return "Hershey simplex (fallback)";
  char name[256] = {0};
  int len = 0;
  const char* s = stbtt_GetFontNameString(&f->info, &len, STBTT_PLATFORM_ID_MAC, STBTT_MAC_EID_ROMAN,
                                          STBTT_MAC_LANG_ENGLISH, 4);
  if (s && len > 0) std::snprintf(name, sizeof name, "%.*s", std::min(len, 200), s);
  return (name[0] ? std::string(name) : std::string("TrueType")) + " (" + f->path + ")";
}

TextExtent text_extent(const std::string& text, double px) {
  const auto f = current_font();
  if (f) return extent_of(*f, codepoints(text), px);
  int baseline = 0;
  const int t = hershey_thickness(px);
  const cv::Size s = cv::getTextSize(text, cv::FONT_HERSHEY_SIMPLEX, hershey_scale(px), t, &baseline);
  const cv::Size ag = cv::getTextSize("Ag", cv::FONT_HERSHEY_SIMPLEX, hershey_scale(px), t, &baseline);
  TextExtent e;
  e.width = s.width;
  e.ascent = ag.height + t;
  e.descent = baseline;
  return e;
}

void draw_text(cv::Mat& bgr, const std::string& text, cv::Point origin, double px, const cv::Scalar& colour) {
  check(bgr.type() == CV_8UC3, "draw_text: expected an 8-bit BGR image (CV_8UC3)");
  const auto f = current_font();
  if (!f) {
    cv::putText(bgr, text, origin, cv::FONT_HERSHEY_SIMPLEX, hershey_scale(px), colour, hershey_thickness(px), cv::LINE_AA);
    return;
  }
  rasterise(*f, codepoints(text), px, [&](const unsigned char* cov, int w, int h, int gx, int gy) {
    for (int y = 0; y < h; ++y) {
      const int iy = origin.y + gy + y;
      if (iy < 0 || iy >= bgr.rows) continue;
      cv::Vec3b* row = bgr.ptr<cv::Vec3b>(iy);
      for (int x = 0; x < w; ++x) {
        const int ix = origin.x + gx + x;
        const int a = cov[y * w + x];
        if (a == 0 || ix < 0 || ix >= bgr.cols) continue;
        // Glyphs of neighbouring letters may overlap by a pixel: blending twice is invisible.
        for (int c = 0; c < 3; ++c)
          row[ix][c] = static_cast<uchar>((row[ix][c] * (255 - a) + colour[c] * a + 127) / 255);
      }
    }
  });
}

cv::Mat render_text_coverage(const std::string& text, double px, TextExtent* extent) {
  const auto f = current_font();
  check(f != nullptr, "render_text_coverage: no TrueType font loaded");
  const auto cps = codepoints(text);
  const TextExtent e = extent_of(*f, cps, px);
  if (extent) *extent = e;
  cv::Mat out = cv::Mat::zeros(e.height() + 2, e.width + 2, CV_8UC1);
  rasterise(*f, cps, px, [&](const unsigned char* cov, int w, int h, int gx, int gy) {
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const int iy = e.ascent + gy + y, ix = gx + x;
        if (iy < 0 || iy >= out.rows || ix < 0 || ix >= out.cols) continue;
        out.at<uchar>(iy, ix) = static_cast<uchar>(std::max<int>(out.at<uchar>(iy, ix), cov[y * w + x]));
      }
  });
  return out;
}

}  // namespace tessera
