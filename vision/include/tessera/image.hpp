#pragma once
// Image decoding to the RGB picture a Python user of Pillow sees:
//   ImageOps.exif_transpose(Image.open(path)).convert("RGB")
// which is what Hugging Face / timm processors receive, plus the EXIF orientation (Pillow and the
// processors leave it alone; Tessera applies it, as a photo viewer does, so a phone photo is upright).
//  - grayscale (+alpha) → gray replicated to R, G, B;   RGBA / LA / palette+transparency → alpha dropped,
//    not composited (Pillow's convert("RGB") does the same);   palette → palette colours;
//  - 16-bit samples → 8-bit by their high byte (v >> 8). Pillow does exactly this for 16-bit RGB/RGBA
//    PNGs; for 16-bit grayscale it opens mode "I" and convert("RGB") clips at 255 (almost all white),
//    which Tessera deliberately does not copy;
//  - float images (EXR/HDR/float TIFF) are refused, and so is GIF (OpenCV 4.6 has no GIF decoder);
//  - CMYK JPEGs go through OpenCV's CMYK->RGB, which can differ from Pillow's by one level.
// Formats: whatever this OpenCV decodes (JPEG, PNG, WebP, BMP, TIFF, PNM, ...).
// Errors are tessera::Error with one line naming the file: missing, directory, unreadable, empty,
// corrupt / truncated / unsupported, too large.
#include <opencv2/core.hpp>

#include <cstdint>
#include <span>
#include <string>

namespace tessera {

// Largest image accepted: 2^28 pixels (16384 x 16384). Checked from the PNG / JPEG header before
// decoding; for other formats after decoding (OpenCV refuses above 2^30 pixels on its own).
inline constexpr int64_t kMaxImagePixels = int64_t(1) << 28;

// CV_8UC3, RGB order, continuous.
cv::Mat load_image_rgb(const std::string& path);
// The same from encoded bytes; `name` is used in error messages.
cv::Mat decode_image_rgb(std::span<const uint8_t> bytes, const std::string& name);

// A label map (segmentation mask): a PNG, one channel, 8- or 16-bit, its values as stored
// (CV_8UC1 or CV_16UC1). Anything else, a header over kMaxImagePixels, or a PNG OpenCV cannot
// decode: a one-line Error naming the file.
cv::Mat load_label_map(const std::string& path);

}  // namespace tessera
