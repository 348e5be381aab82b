// Pillow-compatible resampling. Every expression that touches a number is written as Pillow writes
// it (double coefficients, the same rounding casts, float constants where Pillow has them), since a
// single different rounding moves a pixel by one level.
#include "tessera/pil_resize.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/parallel.hpp"

namespace tessera {

std::string_view resample_name(Resample r) {
  switch (r) {
    case Resample::nearest: return "nearest";
    case Resample::lanczos: return "lanczos";
    case Resample::bilinear: return "bilinear";
    case Resample::bicubic: return "bicubic";
    case Resample::box: return "box";
    case Resample::hamming: return "hamming";
  }
  return "?";
}

std::optional<Resample> resample_from_int(long long value) {
  if (value < 0 || value > 5) return std::nullopt;
  return static_cast<Resample>(value);
}

std::optional<Resample> resample_from_name(std::string_view name) {
  for (int i = 0; i <= 5; ++i)
    if (resample_name(static_cast<Resample>(i)) == name) return static_cast<Resample>(i);
  if (name == "antialias") return Resample::lanczos;  // Pillow's old alias of LANCZOS
  return std::nullopt;
}

namespace {

// ---- Pillow's filters (Resample.c), verbatim in arithmetic.
double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double hamming_filter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * M_PI;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));  // float constants, as in Pillow
}

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}

double lanczos_filter(double x) {
  if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
  return 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};

Filter filter_of(Resample r) {
  switch (r) {
    case Resample::box: return {box_filter, 0.5};
    case Resample::bilinear: return {bilinear_filter, 1.0};
    case Resample::hamming: return {hamming_filter, 1.0};
    case Resample::bicubic: return {bicubic_filter, 2.0};
    case Resample::lanczos: return {lanczos_filter, 3.0};
    case Resample::nearest: break;
  }
  fail("pil_resize: no convolution filter for " + std::string(resample_name(r)));
}

// 8 bits for the result, 2 for overflow of negative lobes / sums above 1.
constexpr int kPrecisionBits = 32 - 8 - 2;

// Per output pixel: first input index, number of taps, and ksize fixed-point coefficients.
struct Coeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> k;
};

// precompute_coeffs + normalize_coeffs_8bpc for a box of [0, in_size) (no crop box).
Coeffs precompute_coeffs(int in_size, int out_size, const Filter& filter) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filter.support * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      double v = filter.fn((x + xmin - center + 0.5) * ss);
      w[x] = v;
      ww += v;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) w[x] /= ww;
    int32_t* k = &c.k[static_cast<size_t>(xx) * c.ksize];
    for (int x = 0; x < xmax; ++x)
      k[x] = w[x] < 0 ? static_cast<int32_t>(-0.5 + w[x] * (1 << kPrecisionBits))
                      : static_cast<int32_t>(0.5 + w[x] * (1 << kPrecisionBits));
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  int32_t s = v >> kPrecisionBits;  // arithmetic shift, as Pillow's lookup index
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// out rows [0, out.rows) from input rows [row_offset, ...): horizontal convolution.
template <int C>
void horizontal_pass(const cv::Mat& in, cv::Mat& out, int row_offset, const Coeffs& c) {
  parallel_for(0, out.rows, 16, [&](int64_t y0, int64_t y1) {
    for (int64_t yy = y0; yy < y1; ++yy) {
      const uint8_t* src = in.ptr<uint8_t>(static_cast<int>(yy) + row_offset);
      uint8_t* dst = out.ptr<uint8_t>(static_cast<int>(yy));
      for (int xx = 0; xx < out.cols; ++xx) {
        const int32_t* k = &c.k[static_cast<size_t>(xx) * c.ksize];
        const uint8_t* p = src + static_cast<size_t>(c.first[xx]) * C;
        int32_t ss[C];
        for (int ch = 0; ch < C; ++ch) ss[ch] = 1 << (kPrecisionBits - 1);
        for (int x = 0; x < c.count[xx]; ++x)
          for (int ch = 0; ch < C; ++ch) ss[ch] += p[x * C + ch] * k[x];
        for (int ch = 0; ch < C; ++ch) dst[xx * C + ch] = clip8(ss[ch]);
      }
    }
  });
}

template <int C>
void vertical_pass(const cv::Mat& in, cv::Mat& out, int row_shift, const Coeffs& c) {
  const int row_len = out.cols * C;
  parallel_for(0, out.rows, 8, [&](int64_t y0, int64_t y1) {
    std::vector<int32_t> acc(row_len);
    for (int64_t yy = y0; yy < y1; ++yy) {
      const int32_t* k = &c.k[static_cast<size_t>(yy) * c.ksize];
      const int ymin = c.first[yy] - row_shift;
      std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
      for (int y = 0; y < c.count[yy]; ++y) {
        const uint8_t* src = in.ptr<uint8_t>(ymin + y);
        const int32_t ky = k[y];
        for (int i = 0; i < row_len; ++i) acc[i] += src[i] * ky;
      }
      uint8_t* dst = out.ptr<uint8_t>(static_cast<int>(yy));
      for (int i = 0; i < row_len; ++i) dst[i] = clip8(acc[i]);
    }
  });
}

// Geometry.c ImagingScaleAffine with fill=1: positions accumulate in double, truncated.
cv::Mat nearest_resize(const cv::Mat& in, int width, int height) {
  cv::Mat out = cv::Mat::zeros(height, width, in.type());
  const size_t pixel = in.elemSize();
  const double a0 = static_cast<double>(static_cast<float>(in.cols) - 0.0f) / width;
  const double a4 = static_cast<double>(static_cast<float>(in.rows) - 0.0f) / height;
  auto coord = [](double v) { return v < 0.0 ? -1 : static_cast<int>(v); };
  std::vector<int> xintab(width, 0);
  int xmin = width, xmax = 0;
  double xo = 0.0 + a0 * 0.5;
  for (int x = 0; x < width; ++x) {
    int xin = coord(xo);
    if (xin >= 0 && xin < in.cols) {
      xmax = x + 1;
      if (x < xmin) xmin = x;
      xintab[x] = xin;
    }
    xo += a0;
  }
  double yo = 0.0 + a4 * 0.5;
  for (int y = 0; y < height; ++y) {
    int yi = coord(yo);
    if (yi >= 0 && yi < in.rows) {
      const uint8_t* src = in.ptr<uint8_t>(yi);
      uint8_t* dst = out.ptr<uint8_t>(y);
      for (int x = xmin; x < xmax; ++x) std::memcpy(dst + x * pixel, src + xintab[x] * pixel, pixel);
    }
    yo += a4;
  }
  return out;
}

template <int C>
cv::Mat convolution_resize(const cv::Mat& in, int width, int height, const Filter& filter) {
  const bool need_horizontal = width != in.cols;
  const bool need_vertical = height != in.rows;
  Coeffs vert = precompute_coeffs(in.rows, height, filter);
  // Only the rows the vertical pass reads are resampled horizontally.
  const int ybox_first = vert.first[0];
  const int ybox_last = vert.first[height - 1] + vert.count[height - 1];
  cv::Mat src = in;
  int row_shift = 0;
  if (need_horizontal) {
    Coeffs horiz = precompute_coeffs(in.cols, width, filter);
    cv::Mat tmp(ybox_last - ybox_first, width, in.type());
    horizontal_pass<C>(in, tmp, ybox_first, horiz);
    src = tmp;
    row_shift = ybox_first;
  }
  if (!need_vertical) return src.clone();
  cv::Mat out(height, width, in.type());
  vertical_pass<C>(src, out, row_shift, vert);
  return out;
}

}  // namespace

cv::Mat pil_resize(const cv::Mat& image, int width, int height, Resample resample) {
  check(!image.empty(), "pil_resize: empty image");
  check(image.depth() == CV_8U && image.channels() >= 1 && image.channels() <= 4,
        "pil_resize: expected an 8-bit image with 1 to 4 channels, got type " + cv::typeToString(image.type()));
  check(width > 0 && height > 0, "pil_resize: target size " + std::to_string(width) + "x" +
                                     std::to_string(height) + " is not positive");
  const cv::Mat in = image.isContinuous() ? image : image.clone();
  if (width == in.cols && height == in.rows) return in.clone();
  if (resample == Resample::nearest) return nearest_resize(in, width, height);
  const Filter filter = filter_of(resample);
  switch (in.channels()) {
    case 1: return convolution_resize<1>(in, width, height, filter);
    case 2: return convolution_resize<2>(in, width, height, filter);
    case 3: return convolution_resize<3>(in, width, height, filter);
    default: return convolution_resize<4>(in, width, height, filter);
  }
}

}  // namespace tessera
