// tessera segment: label maps for a folder of any size, in one tbb::parallel_pipeline that overlaps
// decoding, batched inference and encoding, with a bounded number of batches in flight.
//
// Guarantees: outputs mirror the input tree under --out and each is written atomically (a
// ".partial" file renamed into place), so an existing output is a complete one; --resume skips
// inputs whose requested outputs all exist; a label map depends only on its image (images of the
// same pre-processed size are batched together, never padded across images, and every kernel is
// deterministic whatever the thread count); --shard I/N keeps the inputs whose output path hashes
// (FNV-1a 64) to I modulo N, so N workers cover every input exactly once whatever order they list
// the folder in. A failing image is reported with its reason and the run goes on; exit code 1 if
// any failed.
#include <tbb/parallel_pipeline.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <set>
#include <sstream>

#include "commands.hpp"
#include "tessera/atomic_file.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/segmentation.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {
namespace {

// The shared input options (--model, inputs, --batch, --threads, --processor, --max-tokens) and
// segment's own.
struct Options : InputOptions {
  std::string out_dir, shard = "0/1", fractions;
  bool color = false, overlay = false, resume = false;
  bool sliding = false, no_sliding = false;  // neither: as the model's config.json says
  int64_t window = 0, stride = 0;
  Options() { batch = 4; }
};
const InputOptionsHelp kSegmentInputs{"segment", "Segmentation model folder (default: the bundled digit segmenter)",
                                      "", "Images per forward pass (same-size images only)", 1024};

// One input: where it comes from and the relative output stem (mirrors the input tree).
struct Input {
  std::string path;
  fs::path rel;  // e.g. "a/b/photo" (no extension)
};

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Relative output stem of each image: below a folder argument, relative to the folder; from an
// @list, relative to the list's folder (absolute or outside: the file name); a file: its name.
std::vector<Input> collect_inputs(const std::vector<std::string>& args) {
  std::vector<Input> out;
  for (const std::string& arg : args) {
    std::error_code ec;
    fs::path root;
    if (arg.size() > 1 && arg[0] == '@') root = fs::absolute(fs::path(arg.substr(1))).parent_path();
    else if (fs::is_directory(arg, ec)) root = fs::absolute(fs::path(arg));
    for (const std::string& p : expand_inputs({arg})) {
      fs::path rel;
      if (!root.empty()) {
        rel = fs::absolute(p).lexically_normal().lexically_relative(root.lexically_normal());
        if (rel.empty() || *rel.begin() == ".." || rel.filename().empty()) rel = fs::path(p).filename();
      } else {
        rel = fs::path(p).filename();
      }
      rel.replace_extension();
      out.push_back({p, rel});
    }
  }
  return out;
}

// Writes bytes to dest atomically and durably: DEST.partial, fsync, rename, fsync of the folder.
void write_atomic(const fs::path& dest, const std::vector<uchar>& bytes) {
  fs::create_directories(dest.parent_path());
  write_file_atomic(dest.string(), bytes.data(), bytes.size());
}

void write_image(const fs::path& dest, const cv::Mat& m, const std::vector<int>& params = {}) {
  std::vector<uchar> bytes;
  if (!cv::imencode(dest.extension().string(), m, bytes, params)) fail(dest.string() + ": cannot encode");
  write_atomic(dest, bytes);
}

// A class's colour (RGB): draw.hpp's class_colour, the colour detect and view draw that class id's
// boxes in, so a class (a digit) looks the same in every tool.
cv::Vec3b class_color(int c) {
  const cv::Scalar bgr = class_colour(c);
  return {static_cast<uchar>(bgr[2]), static_cast<uchar>(bgr[1]), static_cast<uchar>(bgr[0])};
}

// The index of the class named "background" (any case), or -1.
int background_class(const std::vector<std::string>& names) {
  for (size_t c = 0; c < names.size(); ++c) {
    std::string n = names[c];
    for (char& ch : n) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (n == "background") return static_cast<int>(c);
  }
  return -1;
}

cv::Mat colorize(const cv::Mat& labels, int background) {  // → BGR for imencode; background black
  std::vector<cv::Vec3b> lut;
  cv::Mat out(labels.size(), CV_8UC3);
  for (int y = 0; y < labels.rows; ++y)
    for (int x = 0; x < labels.cols; ++x) {
      const int c = labels.depth() == CV_8U ? labels.at<uint8_t>(y, x) : labels.at<uint16_t>(y, x);
      if (static_cast<size_t>(c) >= lut.size()) {
        const size_t from = lut.size();
        lut.resize(static_cast<size_t>(c) + 1);
        for (size_t k = from; k < lut.size(); ++k) {
          const cv::Vec3b rgb = static_cast<int>(k) == background ? cv::Vec3b(0, 0, 0) : class_color(static_cast<int>(k));
          lut[k] = {rgb[2], rgb[1], rgb[0]};
        }
      }
      out.at<cv::Vec3b>(y, x) = lut[static_cast<size_t>(c)];
    }
  return out;
}

std::vector<int64_t> histogram(const cv::Mat& labels, int64_t n_cls) {
  std::vector<int64_t> h(n_cls + 1, 0);  // last bin: values beyond n_cls (a foreign label PNG)
  for (int y = 0; y < labels.rows; ++y)
    for (int x = 0; x < labels.cols; ++x) {
      int c = labels.depth() == CV_8U ? labels.at<uint8_t>(y, x) : labels.at<uint16_t>(y, x);
      ++h[std::min<int64_t>(c, n_cls)];
    }
  return h;
}

// Original (RGB) with each class's colour painted over it (not a "background" class), with a legend of the classes present
// (largest first, at most 12) in a panel to its right (draw.hpp's with_legend_beside).
// `background`: background_class(names).
cv::Mat overlay_image(const cv::Mat& rgb, const cv::Mat& labels, const std::vector<int64_t>& hist,
                      const std::vector<std::string>& names, int background) {
  cv::Mat bgr;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  // A class named "background" is left unpainted (the picture as it is), so the objects' colours
  // stand out; every other class is painted 65% over the picture.
  cv::Mat out;
  cv::addWeighted(bgr, 0.35, colorize(labels, background), 0.65, 0.0, out);
  if (background >= 0) bgr.copyTo(out, labels == background);
  std::vector<int> present;
  for (size_t c = 0; c + 1 < hist.size(); ++c)
    if (hist[c] > 0) present.push_back(static_cast<int>(c));
  std::stable_sort(present.begin(), present.end(), [&](int a, int b) { return hist[a] > hist[b]; });
  if (present.size() > 12) present.resize(12);
  const double total = static_cast<double>(labels.total());
  std::vector<std::string> lines;
  std::vector<cv::Scalar> swatches;
  for (const int c : present) {
    const cv::Vec3b rgbc = class_color(c);
    char text[256];
    std::snprintf(text, sizeof text, "%s %.1f%%", c < static_cast<int>(names.size()) ? names[c].c_str() : "?",
                  100.0 * hist[c] / total);
    lines.push_back(text);
    swatches.emplace_back(rgbc[2], rgbc[1], rgbc[0], c == background ? -1 : 0);  // unpainted: no swatch
  }
  // Beside the picture, never over it; a small picture is enlarged (nearest neighbour, whole
  // factors) so that it and its legend can be read.
  return with_legend_beside(out, lines, swatches);
}

struct Item {
  size_t index = 0;
  bool skipped = false;  // complete from an earlier run (--resume)
  std::string error;
  cv::Mat rgb;           // kept only for the overlay
  cv::Size original;
  Tensor pixels;         // [3, h, w]
  SegmentationMasks masks;  // batch of one
  Tensor logits;            // sliding window: [1, n_cls, H', W']
  std::vector<int64_t> hist;
};
using Batch = std::vector<Item>;

class Progress {
 public:
  Progress(size_t total) : total_(total), tty_(isatty(2)), start_(clock::now()), last_(start_) {}
  void update(size_t done, bool final = false) {
    const auto now = clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!final && since < (tty_ ? 0.2 : 10.0)) return;
    last_ = now;
    const double t = std::chrono::duration<double>(now - start_).count();
    const double rate = t > 0 ? done / t : 0;
    const double eta = rate > 0 ? (total_ - done) / rate : 0;
    char eta_s[32];
    std::snprintf(eta_s, sizeof eta_s, "%d:%02d:%02d", static_cast<int>(eta) / 3600,
                  static_cast<int>(eta) / 60 % 60, static_cast<int>(eta) % 60);
    if (tty_) {
      const int width = 30, fill = total_ ? static_cast<int>(width * done / total_) : width;
      std::fprintf(stderr, "\r[%s%s] %zu/%zu  %.1f images/s  ETA %s ", std::string(fill, '#').c_str(),
                   std::string(width - fill, ' ').c_str(), done, total_, rate, eta_s);
      if (final) std::fprintf(stderr, "\n");
    } else if (!final) {
      std::fprintf(stderr, "tessera segment: %zu/%zu, %.1f images/s, ETA %s\n", done, total_, rate, eta_s);
    }
    std::fflush(stderr);
  }
  double seconds() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

 private:
  using clock = std::chrono::steady_clock;
  size_t total_;
  bool tty_;
  clock::time_point start_, last_;
};

int run_segment(const Options& given) {
  Options o = given;
  int shard_i = 0, shard_n = 1;
  {
    char slash = 0;
    std::istringstream in(o.shard);
    if (!(in >> shard_i >> slash >> shard_n) || slash != '/' || shard_n < 1 || shard_i < 0 ||
        shard_i >= shard_n || !in.eof())
      fail("--shard must be I/N with 0 <= I < N, got \"" + o.shard + "\"");
  }
  apply_input_options(o, kSegmentInputs);
  auto model = load_model(o.model_dir);
  if (!model->segmentation) fail(o.model_dir + ": " + model->architecture + " is not a segmentation model");
  const int64_t n_cls = model->segmentation->num_classes;
  const int background = background_class(model->labels);  // black in colour maps, unpainted in overlays
  Preprocessor pre = o.processor.empty() ? model_preprocessor(*model) : Preprocessor::from_file(o.processor);
  pre.patch_size = model->encoder.config.patch_size;
  if (pre.config.do_center_crop)
    fail(pre.source + ": a center crop cannot be mapped back to the whole image; segmentation needs a "
         "processor that only resizes (or keeps the size)");
  int64_t window = o.window, stride = o.stride;
  // Sliding windows by default for a model whose config.json declares them (trained on crops).
  const bool sliding = o.sliding || (!o.no_sliding && (model->segmentation->window_size > 0 || window > 0));
  if (sliding) {
    if (window == 0) window = model->segmentation->window_size;
    if (window == 0) window = model->encoder.config.image_height;
    if (stride == 0 && window == model->segmentation->window_size) stride = model->segmentation->window_stride;
    if (window <= 0 || stride < 0) fail("--window and --stride must be positive");
    if (stride == 0) stride = std::max<int64_t>(1, window * 2 / 3);
    // Every window runs window x window pixels: refused now, not after allocating it per image.
    check_token_budget(model->encoder.config.patch_size, window, window, "--window " + std::to_string(window));
  }

  // Inputs of this shard, in the order given; output collisions are failures, not overwrites.
  std::vector<Input> all = collect_inputs(o.inputs);
  if (all.empty()) fail("no images found in the given inputs");
  std::vector<Input> inputs;
  for (auto& in : all)
    if (fnv1a(in.rel.generic_string()) % static_cast<uint64_t>(shard_n) == static_cast<uint64_t>(shard_i))
      inputs.push_back(std::move(in));
  std::map<std::string, size_t> first_owner;
  std::vector<std::string> collision(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto [it, fresh] = first_owner.emplace(inputs[i].rel.generic_string(), i);
    if (!fresh) collision[i] = inputs[i].path + ": its output " + inputs[i].rel.generic_string() +
                               ".png is already taken by " + inputs[it->second].path;
  }
  const fs::path out_dir(o.out_dir);
  fs::create_directories(out_dir);
  auto output = [&](size_t i, const std::string& suffix) {
    fs::path p = out_dir / inputs[i].rel;
    p += suffix;
    return p;
  };
  auto complete = [&](size_t i) {
    std::error_code ec;
    if (!fs::exists(output(i, ".png"), ec)) return false;
    if (o.color && !fs::exists(output(i, "_color.png"), ec)) return false;
    if (o.overlay && !fs::exists(output(i, "_overlay.jpg"), ec)) return false;
    return true;
  };

  // Per-class fractions for every input of this run (done and skipped), rewritten whole and renamed
  // at the end; a skipped image's come from its label PNG.
  std::ofstream fractions;
  fs::path fractions_path, fractions_tmp;
  const bool jsonl = !o.fractions.empty() && fs::path(o.fractions).extension() == ".jsonl";
  if (!o.fractions.empty()) {
    fractions_path = o.fractions;
    if (fractions_path.is_relative()) fractions_path = out_dir / fractions_path;
    if (shard_n > 1) {  // shards share --out: each writes its own fractions file
      const std::string ext = fractions_path.extension().string();
      fractions_path.replace_filename(fractions_path.stem().string() + ".shard-" + std::to_string(shard_i) +
                                      "-of-" + std::to_string(shard_n) + ext);
    }
    fractions_tmp = fractions_path;
    fractions_tmp += ".partial";
    fractions.open(fractions_tmp, std::ios::trunc);
    if (!fractions) fail(fractions_tmp.string() + ": cannot write");
    if (!jsonl) {
      fractions << "image";
      for (const auto& name : model->labels) {
        std::string q = name;
        for (size_t p = 0; (p = q.find('"', p)) != std::string::npos; p += 2) q.insert(p, "\"");
        fractions << ",\"" << q << "\"";
      }
      fractions << "\n";
    }
  }

  size_t next = 0, done = 0, skipped = 0, failed = 0;
  Progress progress(inputs.size());
  const int threads = num_threads();
  const size_t live = static_cast<size_t>(std::clamp(threads + 1, 2, 8));
  ModelWorkspace ws;
  std::vector<int> png_params{cv::IMWRITE_PNG_COMPRESSION, 1};

  run_in_arena([&] {
    tbb::parallel_pipeline(
        live,
        // 1. next batch of inputs (serial, in order); --resume marks the complete ones
        tbb::make_filter<void, std::shared_ptr<Batch>>(
            tbb::filter_mode::serial_in_order,
            [&](tbb::flow_control& fc) -> std::shared_ptr<Batch> {
              if (next >= inputs.size()) {
                fc.stop();
                return nullptr;
              }
              auto b = std::make_shared<Batch>();
              for (; next < inputs.size() && static_cast<int64_t>(b->size()) < o.batch; ++next) {
                Item it;
                it.index = next;
                it.error = collision[next];
                it.skipped = it.error.empty() && o.resume && complete(next);
                b->push_back(std::move(it));
              }
              return b;
            }) &
            // 2. decode + pre-process (parallel across batches)
            tbb::make_filter<std::shared_ptr<Batch>, std::shared_ptr<Batch>>(
                tbb::filter_mode::parallel,
                [&](std::shared_ptr<Batch> b) {
                  for (Item& it : *b) {
                    if (!it.error.empty()) continue;
                    try {
                      if (it.skipped) {
                        if (fractions.is_open()) {
                          const cv::Mat l = load_label_map(output(it.index, ".png").string());
                          it.hist = histogram(l, n_cls);
                        }
                        continue;
                      }
                      cv::Mat rgb = load_image_rgb(inputs[it.index].path);
                      it.original = rgb.size();
                      if (!sliding) pre.check_tokens(rgb.size(), inputs[it.index].path);
                      it.pixels = pre.image(rgb);
                      if (o.overlay) it.rgb = rgb;
                    } catch (const std::exception& e) {
                      it.error = e.what();
                    }
                  }
                  return b;
                }) &
            // 3. inference (serial; parallel inside): same-size images together, never padded
            tbb::make_filter<std::shared_ptr<Batch>, std::shared_ptr<Batch>>(
                tbb::filter_mode::serial_in_order,
                [&](std::shared_ptr<Batch> b) {
                  std::map<Shape, std::vector<size_t>> groups;
                  for (size_t i = 0; i < b->size(); ++i)
                    if ((*b)[i].error.empty() && !(*b)[i].skipped) groups[(*b)[i].pixels.shape()].push_back(i);
                  for (const auto& [shape, members] : groups) {
                    try {
                      if (sliding) {
                        for (size_t i : members) {
                          Item& it = (*b)[i];
                          it.logits = segmentation_sliding_window(
                              *model, it.pixels.reshape({1, shape[0], shape[1], shape[2]}), window, stride, ws);
                        }
                        continue;
                      }
                      const int64_t n = static_cast<int64_t>(members.size()), per = shape_numel(shape);
                      Tensor x({n, shape[0], shape[1], shape[2]});
                      for (int64_t j = 0; j < n; ++j)
                        std::copy_n((*b)[members[j]].pixels.data(), per, x.data() + j * per);
                      SegmentationMasks m = segmentation_masks(*model, x, ws);
                      const int64_t one = m.masks.numel() / n;
                      for (int64_t j = 0; j < n; ++j) {
                        Item& it = (*b)[members[j]];
                        it.masks = m;
                        Shape s = m.masks.shape();
                        s[0] = 1;
                        it.masks.masks = Tensor(s);
                        std::copy_n(m.masks.data() + j * one, one, it.masks.masks.data());
                        it.pixels = Tensor();
                      }
                    } catch (const std::exception& e) {
                      for (size_t i : members) (*b)[i].error = inputs[(*b)[i].index].path + ": " + e.what();
                    }
                  }
                  return b;
                }) &
            // 4. label maps at the original size, encode, write atomically (parallel)
            tbb::make_filter<std::shared_ptr<Batch>, std::shared_ptr<Batch>>(
                tbb::filter_mode::parallel,
                [&](std::shared_ptr<Batch> b) {
                  for (Item& it : *b) {
                    if (!it.error.empty() || it.skipped) continue;
                    try {
                      const int oh = it.original.height, ow = it.original.width;
                      cv::Mat labels = sliding ? segmentation_labels(it.logits, 0, oh, ow)
                                                 : segmentation_labels(it.masks, 0, oh, ow);
                      it.masks = {};
                      it.logits = Tensor();
                      it.hist = histogram(labels, n_cls);
                      // Extras first, the label PNG last: the label map's presence means "done".
                      if (o.color) write_image(output(it.index, "_color.png"), colorize(labels, background), png_params);
                      if (o.overlay)
                        write_image(output(it.index, "_overlay.jpg"),
                                    overlay_image(it.rgb, labels, it.hist, model->labels, background),
                                    {cv::IMWRITE_JPEG_QUALITY, 90});
                      it.rgb.release();
                      write_image(output(it.index, ".png"), labels, png_params);
                    } catch (const std::exception& e) {
                      it.error = inputs[it.index].path + ": " + e.what();
                    }
                  }
                  return b;
                }) &
            // 5. report, fractions, progress (serial, in order)
            tbb::make_filter<std::shared_ptr<Batch>, void>(
                tbb::filter_mode::serial_in_order, [&](std::shared_ptr<Batch> b) {
                  for (Item& it : *b) {
                    if (!it.error.empty()) {
                      ++failed;
                      std::fprintf(stderr, "%stessera: error: %s\n", isatty(2) ? "\r" : "", it.error.c_str());
                      continue;
                    }
                    it.skipped ? ++skipped : ++done;
                    if (fractions.is_open() && !it.hist.empty()) {
                      int64_t total = 0;
                      for (int64_t c = 0; c < n_cls; ++c) total += it.hist[c];
                      total += it.hist[n_cls];
                      const std::string rel = inputs[it.index].rel.generic_string() + ".png";
                      char num[32];
                      if (jsonl) {
                        nlohmann::json f = nlohmann::json::object();
                        for (int64_t c = 0; c < n_cls; ++c)
                          if (it.hist[c]) f[model->labels[c]] = static_cast<double>(it.hist[c]) / total;
                        nlohmann::json line = {{"fractions", f}};
                        set_name(line, "image", inputs[it.index].path);  // non-UTF-8: + image_hex
                        set_name(line, "labels", rel);
                        fractions << dump_json(line) << "\n";
                      } else {
                        std::string q = inputs[it.index].path;
                        for (size_t p = 0; (p = q.find('"', p)) != std::string::npos; p += 2) q.insert(p, "\"");
                        fractions << '"' << q << '"';
                        for (int64_t c = 0; c < n_cls; ++c) {
                          std::snprintf(num, sizeof num, ",%.6g", static_cast<double>(it.hist[c]) / total);
                          fractions << num;
                        }
                        fractions << "\n";
                      }
                    }
                  }
                  progress.update(done + skipped + failed);
                }));
  });
  progress.update(done + skipped + failed, true);
  if (fractions.is_open()) {
    fractions.close();
    if (!fractions) fail(fractions_tmp.string() + ": write failed");
    fs::rename(fractions_tmp, fractions_path);
  }
  const double secs = progress.seconds();
  std::fprintf(stderr,
               "tessera segment: %zu done, %zu skipped, %zu failed (%zu of %zu inputs in shard %d/%d) in "
               "%.1f s, %.2f images/s\n",
               done, skipped, failed, inputs.size(), all.size(), shard_i, shard_n, secs,
               secs > 0 ? done / secs : 0.0);
  return failed ? 1 : 0;
}

}  // namespace

void add_segment(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("segment", "Per-pixel label maps for images and folders (batch export)");
  static Options o;
  add_input_options(cmd, o, kSegmentInputs);
  cmd->add_option("--out", o.out_dir, "Output folder (mirrors the input tree)")->required();
  cmd->add_flag("--color", o.color, "Also write <stem>_color.png (a colour per class)");
  cmd->add_flag("--overlay", o.overlay, "Also write <stem>_overlay.jpg (blended, with a legend)");
  cmd->add_option("--fractions", o.fractions,
                  "Per-class pixel fractions for the run: FILE.csv or FILE.jsonl (relative to --out; "
                  "with --shard I/N: FILE.shard-I-of-N.csv)");
  cmd->add_flag("--resume", o.resume, "Skip inputs whose requested outputs all exist");
  cmd->add_option("--shard", o.shard, "I/N: this worker's share (0 <= I < N), by a hash of the output path");
  auto* on = cmd->add_flag("--sliding-window", o.sliding,
                           "Segmenter's sliding-window inference (default: on when the model's config.json "
                           "has an \"inference\" window, as a model trained on crops does)");
  cmd->add_flag("--no-sliding-window", o.no_sliding, "One pass over the whole (pre-processed) image")->excludes(on);
  cmd->add_option("--window", o.window, "Window size (default: config inference.window_size, else training size)");
  cmd->add_option("--stride", o.stride, "Window stride (default: config inference.window_stride, else 2/3 window)");
  cmd->callback([&action] { action = [] { return run_segment(o); }; });
}

}  // namespace tessera::cli
