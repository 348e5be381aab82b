#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include <opencv2/imgproc.hpp>

#include "commands.hpp"
#include "tessera/attention_map.hpp"
#include "tessera/draw.hpp"
#include "tessera/image.hpp"
#include "tessera/error.hpp"
#include "tessera/parallel.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {
bool is_image_name(const fs::path& p) {
  static const std::set<std::string> exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff",
                                             ".webp", ".pgm", ".ppm", ".pnm", ".jp2", ".exr", ".hdr", ".pbm"};
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), ::tolower);
  return exts.count(e) > 0;
}
}  // namespace

std::vector<std::string> expand_inputs(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (const std::string& arg : args) {
    if (arg.size() > 1 && arg[0] == '@') {
      fs::path list(arg.substr(1));
      std::ifstream in(list);
      if (!in) fail(list.string() + ": cannot read the input list");
      std::string line;
      while (std::getline(in, line)) {
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
        if (line.empty() || line[0] == '#') continue;
        fs::path p(line);
        out.push_back(p.is_absolute() ? p.string() : (list.parent_path() / p).lexically_normal().string());
      }
      continue;
    }
    std::error_code ec;
    if (fs::is_directory(arg, ec)) {
      std::vector<std::string> found;
      for (auto it = fs::recursive_directory_iterator(arg, fs::directory_options::skip_permission_denied, ec);
           it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (ec) break;
        if (it->is_regular_file(ec) && is_image_name(it->path())) found.push_back(it->path().string());
      }
      std::sort(found.begin(), found.end());
      out.insert(out.end(), found.begin(), found.end());
    } else {
      out.push_back(arg);
    }
  }
  return out;
}

std::string attention_output_path(const std::string& out, size_t index, const std::string& image_path,
                                  size_t total) {
  if (total == 1) return out;
  const fs::path o(out);
  const std::string name = o.stem().string() + "_" + std::to_string(index) + "_" +
                           fs::path(image_path).stem().string() + o.extension().string();
  return (o.parent_path() / name).string();
}

void write_attention_map(const Model& model, const PreprocessConfig& config, const std::vector<Tensor>& attention,
                         int64_t image, int64_t height, int64_t width, const std::string& image_path,
                         const std::string& out_path) {
  const Tensor map = attention_rollout(attention, image, model.encoder.config, height, width);
  cv::Mat bgr;
  cv::cvtColor(load_image_rgb(image_path), bgr, cv::COLOR_RGB2BGR);
  write_image_atomic(out_path, render_attention(bgr, map, config, model.encoder.config.patch_size));
}

void apply_threads(int threads) {
  if (threads < 0) fail("--threads must be 0 (all cores) or a positive count");
  set_num_threads(threads);
}

}  // namespace tessera::cli
