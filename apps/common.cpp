#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "commands.hpp"
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

void apply_threads(int threads) {
  if (threads < 0) fail("--threads must be 0 (all cores) or a positive count");
  set_num_threads(threads);
}

}  // namespace tessera::cli
