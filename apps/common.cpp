#include <glob.h>

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
#include "tessera/limits.hpp"
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
      std::error_code ec;
      const auto st = fs::status(list, ec);
      if (fs::exists(st) && !fs::is_regular_file(st))  // a directory, /dev/zero, a FIFO: never read forever
        fail(list.string() + ": the input list is not a regular file");
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
    if (arg.find_first_of("*?[") != std::string::npos && !fs::exists(arg, ec)) {
      glob_t g{};
      const int rc = ::glob(arg.c_str(), 0, nullptr, &g);
      std::vector<std::string> found;
      if (rc == 0)
        for (size_t i = 0; i < g.gl_pathc; ++i) found.emplace_back(g.gl_pathv[i]);
      ::globfree(&g);
      if (found.empty()) {
        out.push_back(arg);  // reported as missing, per image
        continue;
      }
      std::sort(found.begin(), found.end());
      const std::vector<std::string> expanded = expand_inputs(found);  // a glob may match folders
      out.insert(out.end(), expanded.begin(), expanded.end());
      continue;
    }
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

void add_max_tokens_option(CLI::App* cmd, int64_t& max_tokens) {
  cmd->add_option("--max-tokens", max_tokens,
                  "Refuse an image that would make more patch tokens than this (default: TESSERA_MAX_TOKENS, "
                  "else " + std::to_string(default_max_tokens()) + " on this machine)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
}

void apply_max_tokens(int64_t max_tokens) {
  set_max_tokens(max_tokens);
  max_tokens = tessera::max_tokens();  // a bad TESSERA_MAX_TOKENS is reported now, not mid-run
}

bool is_valid_utf8(const std::string& s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are invalid too.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
      return false;
    i += len;
  }
  return true;
}

void set_name(nlohmann::json& object, const std::string& key, const std::string& name) {
  object[key] = name;
  if (is_valid_utf8(name)) return;
  static const char* digits = "0123456789abcdef";
  std::string hex;
  for (unsigned char c : name) hex += digits[c >> 4], hex += digits[c & 15];
  object[key + "_hex"] = hex;
}

std::string dump_json(const nlohmann::json& j, int indent) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

void apply_threads(int threads) {
  if (threads < 0) fail("--threads must be 0 (all cores) or a positive count");
  set_num_threads(threads);
}

}  // namespace tessera::cli

namespace tessera::cli {

std::string bundled_model(const std::string& task) {
  const char* name = task == "detect" ? "digits-detector" : task == "segment" ? "digits-segmenter" : "digits";
  std::vector<fs::path> roots;
  if (const char* env = std::getenv("TESSERA_MODELS"); env && *env) roots.emplace_back(env);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    roots.push_back(exe.parent_path().parent_path().parent_path() / "assets" / "models");  // build/apps/tessera
    roots.push_back(exe.parent_path().parent_path() / "share" / "tessera" / "models");    // installed
  }
  roots.push_back(fs::path(TESSERA_SOURCE_ROOT) / "assets" / "models");
  for (const fs::path& r : roots)
    if (fs::is_regular_file(r / name / "config.json", ec)) {
      const std::string dir = (r / name).lexically_normal().string();
      std::fprintf(stderr, "tessera: no --model given; using the bundled %s model %s (its accuracy and limits: %s)\n",
                   task == "detect" ? "detection" : task == "segment" ? "segmentation" : "classification", dir.c_str(),
                   (r / name / "README.md").lexically_normal().c_str());
      return dir;
    }
  fail(std::string("no --model given and the bundled model '") + name + "' was not found (looked in $TESSERA_MODELS, " +
       "assets/models beside the build, share/tessera/models); pass --model DIR");
}

}  // namespace tessera::cli

namespace tessera::cli {

void add_input_options(CLI::App* cmd, InputOptions& o, const InputOptionsHelp& help) {
  auto* model = cmd->add_option("--model", o.model_dir, help.model);
  if (help.task.empty()) model->required();
  cmd->add_option("inputs", o.inputs,
                  "Images, folders (recursive), @list.txt (one path per line) or quoted globs ('dir/*.png')" +
                      (help.inputs.empty() ? std::string() : "; " + help.inputs))
      ->required();
  if (!help.batch.empty())
    cmd->add_option("--batch", o.batch, help.batch)->check(CLI::Range(int64_t{1}, help.max_batch));
  cmd->add_option("--threads", o.threads, "Threads (default: TESSERA_NUM_THREADS, else every core)");
  cmd->add_option("--processor", o.processor, "preprocessor_config.json to use instead of the model folder's");
  add_max_tokens_option(cmd, o.max_tokens);
}

void apply_input_options(InputOptions& o, const InputOptionsHelp& help) {
  apply_threads(o.threads);
  apply_max_tokens(o.max_tokens);
  if (o.model_dir.empty() && !help.task.empty()) o.model_dir = bundled_model(help.task);
}

}  // namespace tessera::cli
