#pragma once
// Pillow-compatible resampling: Image.resize((w, h), resample) on 8-bit images, bit for bit.
// Pillow 9.4 / 10.x src/libImaging/Resample.c (convolution filters, antialiased: the filter support
// grows with the downscale factor; 22-bit fixed-point coefficients; horizontal pass first into an
// 8-bit intermediate, then vertical) and Geometry.c ImagingScaleAffine (NEAREST).
#include <opencv2/core.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace tessera {

// The numbers are Pillow's (PIL.Image.Resampling), which Hugging Face configs store as `resample`.
enum class Resample : int { nearest = 0, lanczos = 1, bilinear = 2, bicubic = 3, box = 4, hamming = 5 };

std::string_view resample_name(Resample r);  // "bilinear", ...
// `resample` value of a config: 0..5, else nullopt.
std::optional<Resample> resample_from_int(long long value);
// torchvision / timm interpolation names: "nearest", "bilinear", "bicubic", "lanczos", "box", "hamming".
std::optional<Resample> resample_from_name(std::string_view name);

// Resizes an 8-bit image with 1 to 4 interleaved channels (CV_8UC1..CV_8UC4) to width x height
// exactly as Pillow's Image.resize((width, height), resample) does for modes L / RGB / RGBX
// (not RGBA/LA, which Pillow premultiplies by alpha). Same size returns a copy. Parallel over rows;
// the result does not depend on the thread count.
cv::Mat pil_resize(const cv::Mat& image, int width, int height, Resample resample);

}  // namespace tessera
