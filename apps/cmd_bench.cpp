// tessera bench: median time per image, images/s, achieved GFLOP/s, load time and peak RSS of a
// model (a folder, or random weights of a standard size: ViT classifiers, YOLOS-Ti, Segmenter-S),
// or the machine's GEMM rate (--gemm).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "commands.hpp"
#include "tessera/error.hpp"
#include "tessera/detection.hpp"
#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/segmentation.hpp"

namespace tessera::cli {
namespace {

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;  // Linux reports KiB
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

WeightType parse_dtype(const std::string& s) {
  if (s == "fp32") return WeightType::F32;
  if (s == "bf16") return WeightType::BF16;
  if (s == "int8") return WeightType::INT8;
  fail("--dtype must be fp32, bf16 or int8, got '" + s + "'");
}

// GEMM rate on the linear-layer shapes of ViT-B/16 at 224 (197 tokens per image); returns the
// rate and prints the table (as_json: fills `out` instead).
double bench_gemm(const std::string& dtype, int64_t batch, int iterations, bool as_json,
                  nlohmann::json& out) {
  const WeightType type = parse_dtype(dtype);
  struct Shape3 { int64_t M, K, N; const char* what; };
  const int64_t M = 197 * batch;
  const Shape3 shapes[] = {{M, 768, 2304, "qkv"}, {M, 768, 768, "attn out"},
                           {M, 768, 3072, "fc1"}, {M, 3072, 768, "fc2"}};
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0, 1);
  nlohmann::json rows = nlohmann::json::array();
  double total_flop = 0, total_ms = 0;
  if (!as_json)
    std::printf("GEMM %s, %d threads, kernel %s\n%-9s %6s %6s %6s %10s %10s\n", dtype.c_str(),
                num_threads(), linear_kernel_name(type).c_str(), "layer", "M", "K", "N", "ms", "GFLOP/s");
  for (const auto& s : shapes) {
    std::vector<float> w(s.N * s.K), x(s.M * s.K), y(s.M * s.N);
    for (auto& v : w) v = dist(rng) * 0.02f;
    for (auto& v : x) v = dist(rng);
    PackedLinear packed = pack_linear(w.data(), nullptr, s.N, s.K, type);
    // Warm-up: at least 2 passes and 50 ms. A vCPU that sat idle takes a few ms to come back to
    // full speed; 2 passes of a 1.7 ms GEMM were too short, and the first shape read 30-50% slow.
    const double warm_from = now_ms();
    for (int i = 0; i < 2 || now_ms() - warm_from < 50; ++i)
      linear(x.data(), s.M, s.K, packed, y.data(), s.N);
    std::vector<double> times;
    for (int i = 0; i < iterations; ++i) {
      double t0 = now_ms();
      linear(x.data(), s.M, s.K, packed, y.data(), s.N);
      times.push_back(now_ms() - t0);
    }
    double ms = median(times), flop = 2.0 * s.M * s.K * s.N;
    total_flop += flop, total_ms += ms;
    if (as_json)
      rows.push_back({{"layer", s.what}, {"M", s.M}, {"K", s.K}, {"N", s.N}, {"ms_median", ms},
                      {"gflops", flop / ms / 1e6}});
    else
      std::printf("%-9s %6lld %6lld %6lld %10.3f %10.1f\n", s.what, (long long)s.M, (long long)s.K,
                  (long long)s.N, ms, flop / ms / 1e6);
  }
  const double rate = total_flop / total_ms / 1e6;
  if (as_json)
    out = {{"gemm", rows}, {"gflops", rate}, {"dtype", dtype}, {"threads", num_threads()},
           {"kernel", linear_kernel_name(type)}, {"batch", batch}};
  else
    std::printf("all ViT-B layers: %.1f GFLOP/s\n", rate);
  return rate;
}

// --gemm: the one --dtype asked for, or all three and their ratios to fp32 (JSON: "dtypes"),
// then the CPU's register-only fp32 FMA peak at the same thread count (JSON: "fma_peak_gflops").
int bench_gemm_command(const std::string& dtype, bool dtype_given, int64_t batch, int iterations,
                       bool as_json) {
  double fp32_rate = 0;
  nlohmann::json out;
  if (!as_json)
    std::printf("kernel family %s (CPU: %s; features seen: %s)\n\n", isa_name(isa_family()),
                isa_name(cpu_isa_family()), cpu_features_seen().c_str());
  if (dtype_given) {
    fp32_rate = bench_gemm(dtype, batch, iterations, as_json, out);
    if (dtype != "fp32") fp32_rate = 0;
  } else {
    nlohmann::json all = nlohmann::json::array();
    double rates[3];
    const char* names[3] = {"fp32", "bf16", "int8"};
    for (int i = 0; i < 3; ++i) {
      nlohmann::json j;
      rates[i] = bench_gemm(names[i], batch, iterations, as_json, j);
      all.push_back(j);
      if (!as_json && i < 2) std::printf("\n");
    }
    fp32_rate = rates[0];
    out = {{"dtypes", all}};
    if (!as_json)
      std::printf("\nGEMM rate: fp32 %.1f, bf16 %.1f (%.2fx), int8 %.1f (%.2fx) GFLOP/s\n", rates[0],
                  rates[1], rates[1] / rates[0], rates[2], rates[2] / rates[0]);
  }
  const double peak = fma_peak_gflops();
  if (as_json) {
    out["fma_peak_gflops"] = peak;
    out["isa"] = isa_name(isa_family());
    out["cpu_features"] = cpu_features_seen();
    out["fma_peak_threads"] = num_threads();
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("fp32 FMA peak (%s family, registers only, %d thread%s): %.1f GFLOP/s",
                isa_name(isa_family()), num_threads(), num_threads() == 1 ? "" : "s", peak);
    if (fp32_rate > 0) std::printf("; the fp32 GEMM rate is %.0f%% of it", 100 * fp32_rate / peak);
    std::printf("\n");
  }
  return 0;
}

size_t block_bytes(const VitLayer& l) {
  return l.qkv.packed_bytes + l.attn_out.packed_bytes + l.fc1.packed_bytes + l.fc2.packed_bytes;
}

// Bytes of the packed weights the forward pass streams (the GEMM layouts, in the chosen dtype).
double packed_weight_mb(const Model& m) {
  size_t bytes = m.encoder.patch_embed.packed_bytes;
  for (const VitLayer& l : m.encoder.layers) bytes += block_bytes(l);
  bytes += m.classifier.head.packed_bytes + m.classifier.head_dist.packed_bytes +
           m.classifier.pooler.packed_bytes;
  if (const DetectionHead* d = m.detection.get()) {
    for (const MlpHead* mlp : {&d->class_head, &d->box_head})
      for (const PackedLinear& l : mlp->layers) bytes += l.packed_bytes;
    bytes += d->input_projection.packed_bytes;
    for (const DetrDecoderLayer& l : d->layers)
      for (const PackedLinear* p : {&l.self_qk, &l.self_v, &l.self_out, &l.cross_q, &l.cross_k,
                                    &l.cross_v, &l.cross_out, &l.fc1, &l.fc2})
        bytes += p->packed_bytes;
  }
  if (const SegmentationHead* s = m.segmentation.get()) {
    bytes += s->head.packed_bytes + s->proj_dec.packed_bytes + s->proj_patch.packed_bytes +
             s->proj_classes.packed_bytes;
    for (const VitLayer& l : s->blocks) bytes += block_bytes(l);
  }
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

// What one timed run computes: the encoder and the whole head, to the outputs a user reads.
std::string timed_outputs(const Model& m, int64_t h, int64_t w) {
  if (m.detection)
    return "logits and pred_boxes (" + std::to_string(m.detection->num_slots) + " slots)";
  if (m.segmentation) {
    const int64_t p = m.encoder.config.patch_size;
    return "class masks " + std::to_string(m.segmentation->num_classes) + "x" +
           std::to_string((h + p - 1) / p) + "x" + std::to_string((w + p - 1) / p) +
           " (patch grid; upsampling to the input size not timed)";
  }
  return m.classifier.num_labels ? "logits" : "features";
}

constexpr const char* kFooter = R"(Random weights (--arch) are built as the loaders build real checkpoints of that shape:
  vit-ti16 vit-s16 vit-b16 vit-l16  ImageNet-1k ViT classifiers, default input 224x224
  yolos-ti     hustvl/yolos-tiny (192 wide, 12 layers, 100 detection tokens, 91 labels),
               default input 512x688 (height x width: the yolos-tiny processor's 512-pixel short
               side on a 4:3 photo, the width rounded to whole 16-pixel patches)
  segmenter-s  Segmenter ViT-S/16 with the mask transformer (2 layers), 150 ADE20K classes,
               default input 512x512
A timed run is the whole model: encoder and head. Detectors: through the class logits and boxes.
Segmenters: through the class masks at the patch grid (1/16 of the input each way); the bilinear
upsampling to the input size is neither timed nor counted (tessera segment goes from these masks
to label maps). GFLOP/s counts 2 FLOPs per multiply-add of every matrix product (encoder and head).)";

}  // namespace

void add_bench(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("bench", "Measure speed: a model, or the machine's GEMM rate");
  static std::string model_dir, arch = "vit-b16", dtype = "fp32";
  static int64_t batch = 1, image_size = 0;
  static int threads = 0, iterations = 10;
  static bool as_json = false, gemm = false;
  cmd->add_option("--model", model_dir, "Model folder (default: random weights, see --arch)");
  cmd->add_option("--arch", arch,
                  "Random-weight model: vit-ti16, vit-s16, vit-b16, vit-l16, yolos-ti (512x688), "
                  "segmenter-s (512x512); see below");
  cmd->add_option("--batch", batch, "Images per forward pass")->check(CLI::Range(1, 4096));
  cmd->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS or all cores)");
  cmd->add_option("--image-size", image_size,
                  "Square input size (default: the model's; yolos-ti: 512x688)");
  static int64_t height = 0, width = 0;  // a non-square input (detectors keep the aspect ratio)
  cmd->add_option("--height", height, "Input height (overrides --image-size)")->check(CLI::Range(1, 100000));
  cmd->add_option("--width", width, "Input width (overrides --image-size)")->check(CLI::Range(1, 100000));
  static CLI::Option* dtype_option = nullptr;
  dtype_option = cmd->add_option("--dtype", dtype, "Weights: fp32, bf16 or int8");
  cmd->add_option("--iterations", iterations, "Timed runs (median is reported)")->check(CLI::Range(1, 100000));
  cmd->add_flag("--json", as_json, "Print one JSON object");
  cmd->add_flag("--gemm", gemm,
                "Measure the GEMM rate on ViT-B shapes instead of a model (fp32, bf16 and int8 "
                "unless --dtype picks one), and the CPU's register-only fp32 FMA peak");
  static std::string isa;
  cmd->add_option("--isa", isa,
                  "Cap the kernel family: avx512, avx2 or generic (as TESSERA_ISA; the CPU's "
                  "widest family by default)");
  cmd->footer(kFooter);
  cmd->callback([&action] {
    action = [] {
      apply_threads(threads);
      if (!isa.empty()) set_isa_cap(parse_isa(isa, "--isa"));
      if (gemm) return bench_gemm_command(dtype, dtype_option->count() > 0, batch, iterations, as_json);
      const WeightType type = parse_dtype(dtype);
      double t0 = now_ms();
      auto model = model_dir.empty() ? random_model(arch, image_size ? image_size : 224, type)
                                     : load_model(model_dir, type);
      const double load_ms = now_ms() - t0;
      const VitConfig& c = model->encoder.config;
      // yolos-ti's position grid is 800x1333, but its processor resizes the short side to 512.
      const bool yolos_ti = model_dir.empty() && arch == "yolos-ti";
      int64_t h0 = c.image_height, w0 = c.image_width;
      if (model->detection && model->detection->window > 0 && !image_size && !(height && width)) {
        // the encoder's size is its window's; the input's is the processor's
        const PreprocessConfig& pc = model_preprocessor(*model).config;
        check(pc.do_resize && pc.resize_rule == ResizeRule::exact,
              model_dir + ": a windowed detector without a fixed-size processor: give --image-size or --height/--width");
        h0 = pc.height, w0 = pc.width;
      }
      const int64_t h = height ? height : image_size ? image_size : yolos_ti ? 512 : h0;
      const int64_t w = width ? width : image_size ? image_size : yolos_ti ? 688 : w0;
      Tensor x({batch, c.num_channels, h, w});
      std::mt19937 rng(3);
      std::normal_distribution<float> dist(0, 1);
      for (float& v : x.span()) v = dist(rng);
      ModelWorkspace ws;
      std::vector<double> times;
      double first_ms = 0;  // the first forward pass: workspace sizing, first touch of the weights
      for (int i = 0; i < iterations + 2; ++i) {  // two warm-up runs size the workspace
        double s = now_ms();
        if (model->segmentation) segmentation_masks(*model, x, ws);  // model_forward would upsample
        else model_forward(*model, x, ws);
        if (i == 0) first_ms = now_ms() - s;
        if (i >= 2) times.push_back((now_ms() - s) / batch);
      }
      const double ms = median(times);
      const double flop = model_flops(*model, h, w);
      const double gflops = flop / ms / 1e6;
      const std::string name = model_dir.empty() ? arch : model_dir;
      const std::string timed = timed_outputs(*model, h, w);
      if (as_json) {
        nlohmann::json j = {{"model", name}, {"ms_per_image_median", ms}, {"images_per_second", 1000.0 / ms},
                            {"gflops", gflops}, {"gflop_per_image", flop / 1e9}, {"timed", timed},
                            {"load_ms", load_ms}, {"first_forward_ms", first_ms},
                            {"weights_cache", model->weights_cache}, {"peak_rss_mb", peak_rss_mb()},
                            {"packed_weights_mb", packed_weight_mb(*model)},
                            {"batch", batch}, {"threads", num_threads()}, {"dtype", dtype},
                            {"image_size", {h, w}}, {"iterations", iterations},
                            {"kernel", linear_kernel_name(type)}, {"isa", isa_name(isa_family())}};
        std::printf("%s\n", j.dump(2).c_str());
      } else {
        std::printf("%s %s, %lldx%lld, batch %lld, %d threads, kernel %s\n", name.c_str(), dtype.c_str(),
                    (long long)h, (long long)w, (long long)batch, num_threads(),
                    linear_kernel_name(type).c_str());
        std::printf("  timed: encoder + head, through the %s\n", timed.c_str());
        std::printf("  %.2f ms/image (median of %d), %.1f images/s, %.1f GFLOP/s (%.2f GFLOP/image)\n",
                    ms, iterations, 1000.0 / ms, gflops, flop / 1e9);
        std::printf("  load %.1f ms (packed-weight cache: %s), first forward %.1f ms, peak RSS %.1f MB "
                    "(packed weights %.1f MB)\n",
                    load_ms, model->weights_cache.c_str(), first_ms, peak_rss_mb(),
                    packed_weight_mb(*model));
      }
      return 0;
    };
  });
}

}  // namespace tessera::cli
