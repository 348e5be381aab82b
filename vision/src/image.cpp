// Decoding with OpenCV, normalised to what Pillow's convert("RGB") gives (see image.hpp).
#include "tessera/image.hpp"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/limits.hpp"

namespace tessera {
namespace {

struct HeaderSize {
  int64_t width, height;
};

uint32_t be32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3]; }
uint32_t be16(const uint8_t* p) { return (uint32_t(p[0]) << 8) | p[1]; }

bool is_png(std::span<const uint8_t> b) {
  static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  return b.size() >= 8 && std::memcmp(b.data(), sig, 8) == 0;
}
bool is_jpeg(std::span<const uint8_t> b) { return b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF; }

uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24); }
uint32_t le16(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8); }

bool starts_with(std::span<const uint8_t> b, const char* magic, size_t n) {
  return b.size() >= n && std::memcmp(b.data(), magic, n) == 0;
}

// PNM (P1-P6): "Pn" then width, height (and maxval), separated by white space and # comments.
// PAM (P7): "WIDTH w" / "HEIGHT h" lines up to ENDHDR; only its first 4 KiB are looked at.
std::optional<HeaderSize> pnm_size(std::span<const uint8_t> b) {
  const size_t end = std::min<size_t>(b.size(), 4096);
  size_t pos = 2;
  auto token = [&]() -> std::string {
    for (;;) {
      while (pos < end && std::isspace(b[pos])) ++pos;
      if (pos < end && b[pos] == '#') {
        while (pos < end && b[pos] != '\n') ++pos;
        continue;
      }
      break;
    }
    std::string t;
    while (pos < end && !std::isspace(b[pos]) && t.size() < 32) t += static_cast<char>(b[pos++]);
    return t;
  };
  auto number = [](const std::string& t) -> std::optional<int64_t> {
    if (t.empty() || t.size() > 18 || !std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return std::nullopt;
    return std::stoll(t);
  };
  if (b[1] == '7') {
    std::optional<int64_t> w, h;
    for (std::string t = token(); !t.empty() && t != "ENDHDR"; t = token()) {
      if (t == "WIDTH") w = number(token());
      else if (t == "HEIGHT") h = number(token());
    }
    if (w && h) return HeaderSize{*w, *h};
    return std::nullopt;
  }
  // P1-P6 are read as OpenCV's ReadNumber reads them (over the whole file, as it does): white
  // space and '#' comments (to \n or \r) skipped, then digits, ended by the first other byte,
  // which is consumed ("1621\xd9" is 1621). Anything else where a number starts: OpenCV refuses.
  pos = 2;
  auto read_number = [&]() -> std::optional<int64_t> {
    for (;;) {
      if (pos >= b.size()) return std::nullopt;
      if (b[pos] == '#') {
        while (pos < b.size() && b[pos] != '\n' && b[pos] != '\r') ++pos;
        ++pos;
      } else if (std::isspace(b[pos])) {
        ++pos;
      } else {
        break;
      }
    }
    if (!std::isdigit(b[pos])) return std::nullopt;
    int64_t v = 0;
    for (; pos < b.size() && std::isdigit(b[pos]); ++pos)
      if (v <= std::numeric_limits<int32_t>::max()) v = v * 10 + (b[pos] - '0');  // beyond: OpenCV refuses
    ++pos;
    return v;
  };
  const auto w = read_number();
  const auto h = read_number();
  if (w && h) return HeaderSize{*w, *h};
  return std::nullopt;
}

// TIFF: ImageWidth (256) and ImageLength (257) of the first IFD.
std::optional<HeaderSize> tiff_size(std::span<const uint8_t> b) {
  const bool le = b[0] == 'I';
  auto u16 = [&](size_t at) { return le ? le16(b.data() + at) : be16(b.data() + at); };
  auto u32 = [&](size_t at) { return le ? le32(b.data() + at) : be32(b.data() + at); };
  if (b.size() < 8) return std::nullopt;
  const size_t ifd = u32(4);
  if (ifd + 2 > b.size()) return std::nullopt;
  const size_t count = u16(ifd);
  std::optional<int64_t> w, h;
  for (size_t i = 0; i < count && ifd + 2 + 12 * (i + 1) <= b.size(); ++i) {
    const size_t e = ifd + 2 + 12 * i;
    const uint32_t tag = u16(e), type = u16(e + 2);
    const int64_t value = type == 3 ? u16(e + 8) : u32(e + 8);  // SHORT or LONG
    if (tag == 256) w = value;
    if (tag == 257) h = value;
  }
  if (w && h) return HeaderSize{*w, *h};
  return std::nullopt;
}

// Width and height from the header of every format OpenCV decodes whose header can claim more
// than kMaxImagePixels (PNG, JPEG, PNM/PAM, BMP, TIFF, Sun raster), without decoding anything.
// (WebP cannot exceed 16383 x 16383; the float formats are refused by float_format() first.)
std::optional<HeaderSize> header_size(std::span<const uint8_t> b) {
  if (b.size() >= 3 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7' && std::isspace(b[2])) return pnm_size(b);
  if (starts_with(b, "BM", 2) && b.size() >= 26) {
    if (le32(b.data() + 14) == 12) return HeaderSize{le16(b.data() + 18), le16(b.data() + 20)};  // OS/2 v1
    const int64_t h = static_cast<int32_t>(le32(b.data() + 22));  // negative: stored top-down
    return HeaderSize{static_cast<int32_t>(le32(b.data() + 18)), h < 0 ? -h : h};
  }
  if (starts_with(b, "II*\0", 4) || starts_with(b, "MM\0*", 4)) return tiff_size(b);
  if (starts_with(b, "\x59\xa6\x6a\x95", 4) && b.size() >= 12) return HeaderSize{be32(b.data() + 4), be32(b.data() + 8)};
  if (is_png(b)) {
    if (b.size() < 24 || std::memcmp(b.data() + 12, "IHDR", 4) != 0) return std::nullopt;
    return HeaderSize{be32(b.data() + 16), be32(b.data() + 20)};
  }
  if (is_jpeg(b)) {
    size_t pos = 2;
    while (pos + 9 < b.size()) {
      if (b[pos] != 0xFF) return std::nullopt;
      const uint8_t marker = b[pos + 1];
      if (marker == 0xFF) { ++pos; continue; }
      if ((marker >= 0xD0 && marker <= 0xD9) || marker == 0x01) { pos += 2; continue; }
      const bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
      if (sof) return HeaderSize{be16(b.data() + pos + 7), be16(b.data() + pos + 5)};
      if (marker == 0xDA) return std::nullopt;  // scan data before any frame header: malformed
      pos += 2 + be16(b.data() + pos + 2);
    }
  }
  return std::nullopt;
}

// The float formats OpenCV decodes (refused after decoding anyway, so refused before it: their
// headers can claim gigabytes). The name, or nullptr.
const char* float_format(std::span<const uint8_t> b) {
  if (b.size() >= 3 && b[0] == 'P' && (b[1] == 'F' || b[1] == 'f') && std::isspace(b[2])) return "PFM";
  if (starts_with(b, "#?RADIANCE", 10) || starts_with(b, "#?RGBE", 6)) return "Radiance HDR";
  if (starts_with(b, "\x76\x2f\x31\x01", 4)) return "OpenEXR";
  return nullptr;
}

// libjpeg decodes a truncated file "successfully" (grey rest, a warning on stderr); Pillow refuses
// it ("image file is truncated"). A complete JPEG has an end-of-image marker after its last scan.
bool jpeg_is_truncated(std::span<const uint8_t> b) {
  std::ptrdiff_t last_sos = -1, last_eoi = -1;
  for (size_t i = 0; i + 1 < b.size(); ++i) {
    if (b[i] != 0xFF) continue;
    if (b[i + 1] == 0xDA) last_sos = static_cast<std::ptrdiff_t>(i);
    else if (b[i + 1] == 0xD9) last_eoi = static_cast<std::ptrdiff_t>(i);
  }
  return last_eoi < last_sos || last_eoi < 0;
}

std::string pixels_str(int64_t w, int64_t h) {
  return std::to_string(w) + "x" + std::to_string(h) + " (" +
         std::to_string(static_cast<int64_t>(static_cast<double>(w) * static_cast<double>(h) / 1e6)) + " Mpixel)";
}

void check_size(int64_t w, int64_t h, const std::string& name) {
  if (static_cast<double>(w) * static_cast<double>(h) > static_cast<double>(kMaxImagePixels))
    fail(name + ": image is " + pixels_str(w, h) + ", more than the limit of " +
         std::to_string(kMaxImagePixels) + " pixels");
}

// The file-size and header-size checks, then cv::imdecode inside a try; `what` is how messages
// name the thing ("image", "the label map"). An empty Mat where OpenCV decodes nothing.
cv::Mat checked_imdecode(std::span<const uint8_t> bytes, const std::string& name, int flags, const std::string& what) {
  if (bytes.size() > static_cast<size_t>(std::numeric_limits<int>::max()))
    fail(name + ": file of " + std::to_string(bytes.size() >> 20) + " MiB is too large to be decoded (limit 2 GiB)");
  if (auto hs = header_size(bytes)) {
    if (hs->width == 0 || hs->height == 0) fail(name + ": cannot decode " + what + " (zero width or height in the header)");
    check_size(hs->width, hs->height, name);
  }
  const cv::Mat buf(1, static_cast<int>(bytes.size()), CV_8U, const_cast<uint8_t*>(bytes.data()));
  try {
    return cv::imdecode(buf, flags);
  } catch (const cv::Exception& e) {
    fail(name + ": cannot decode " + what + " (OpenCV: " + std::string(e.err.empty() ? e.what() : e.err) + ")");
  }
}

}  // namespace

cv::Mat decode_image_rgb(std::span<const uint8_t> bytes, const std::string& name) {
  if (bytes.empty()) fail(name + ": empty file, not an image");
  // DICOM ("DICM" at 128): OpenCV hands it to GDCM, which aborts the process (an assert) on a
  // malformed file. Tessera reads photographs and label maps, not medical images.
  if (bytes.size() >= 132 && std::memcmp(bytes.data() + 128, "DICM", 4) == 0)
    fail(name + ": cannot decode image (DICOM is not supported; convert it to PNG)");
  if (const char* f = float_format(bytes))
    fail(name + ": cannot decode image (" + std::string(f) + " is a float format; only 8- and 16-bit images are accepted)");
  // ANYDEPTH keeps 16-bit samples (converted below the way Pillow does); ANYCOLOR keeps gray as
  // gray; neither is IMREAD_UNCHANGED, so OpenCV applies the EXIF orientation.
  cv::Mat m = checked_imdecode(bytes, name, cv::IMREAD_ANYDEPTH | cv::IMREAD_ANYCOLOR, "image");
  if (m.empty()) {
    if (bytes.size() >= 6 && (std::memcmp(bytes.data(), "GIF87a", 6) == 0 || std::memcmp(bytes.data(), "GIF89a", 6) == 0))
      fail(name + ": cannot decode image (GIF is not supported by this OpenCV build; convert it to PNG)");
    fail(name + ": cannot decode image (corrupt or unsupported format)");
  }
  if (is_jpeg(bytes) && jpeg_is_truncated(bytes)) fail(name + ": cannot decode image (truncated JPEG)");
  check_size(m.cols, m.rows, name);

  if (m.depth() == CV_16U) {
    // The high byte, v >> 8, as Pillow unpacks 16-bit PNG samples (convertTo would round v / 256).
    cv::Mat high(m.rows, m.cols, CV_MAKETYPE(CV_8U, m.channels()));
    for (int y = 0; y < m.rows; ++y) {
      const uint16_t* s = m.ptr<uint16_t>(y);
      uint8_t* d = high.ptr<uint8_t>(y);
      for (int i = 0; i < m.cols * m.channels(); ++i) d[i] = static_cast<uint8_t>(s[i] >> 8);
    }
    m = high;
  } else if (m.depth() != CV_8U) {
    fail(name + ": cannot decode image (unsupported sample type " + cv::typeToString(m.type()) +
         "; only 8- and 16-bit images are accepted)");
  }
  cv::Mat rgb;
  switch (m.channels()) {
    case 1: cv::cvtColor(m, rgb, cv::COLOR_GRAY2RGB); break;
    case 3: cv::cvtColor(m, rgb, cv::COLOR_BGR2RGB); break;
    case 4: cv::cvtColor(m, rgb, cv::COLOR_BGRA2RGB); break;  // alpha dropped, not composited
    default: fail(name + ": cannot decode image (" + std::to_string(m.channels()) + " channels)");
  }
  return rgb;
}

namespace {

// The whole file, or a one-line Error naming it.
std::vector<uint8_t> read_image_file(const std::string& path) {
  namespace fs = std::filesystem;
  // The OS would see the name cut at its first NUL (an @list line of NULs would name the list's
  // own folder, or nothing): refuse it, printably.
  if (path.find('\0') != std::string::npos)
    fail(brief_text(path, 200) + ": file name contains a NUL byte; no such file can exist");
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) fail(path + ": cannot access (" + ec.message() + ")");
  if (!fs::exists(st)) fail(path + ": no such file");
  if (fs::is_directory(st)) fail(path + ": is a directory, not an image file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open for reading (" + std::strerror(errno) + ")");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  in.seekg(0, std::ios::beg);
  if (size < 0) fail(path + ": cannot read (not a regular file?)");
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    fail(path + ": read error (" + std::strerror(errno) + ")");
  return bytes;
}

}  // namespace

cv::Mat load_image_rgb(const std::string& path) { return decode_image_rgb(read_image_file(path), path); }

cv::Mat load_label_map(const std::string& path) {
  const std::vector<uint8_t> bytes = read_image_file(path);
  // PNG only: no other decoder is reached (OpenCV would try every format it knows on these bytes).
  if (!is_png(bytes)) fail(path + ": a label map must be a PNG (this file is not one)");
  const cv::Mat m = checked_imdecode(bytes, path, cv::IMREAD_UNCHANGED, "the label map");
  if (m.empty()) fail(path + ": cannot decode the label map (corrupt PNG)");
  if (m.channels() != 1 || (m.depth() != CV_8U && m.depth() != CV_16U))
    fail(path + ": a label map must be a one-channel 8- or 16-bit PNG, this one is " + cv::typeToString(m.type()));
  return m;
}

}  // namespace tessera
