// Segmenter heads against the upstream (conformance examples computed by rstrudel/segmenter, and
// the validated port's cases at other sizes and backbones), label maps, sliding windows, and the
// `tessera segment` exporter: outputs, failures, determinism, resume after SIGKILL, shards.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <opencv2/imgcodecs.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "tessera/draw.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/segmentation.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

constexpr float kTolerance = 1e-4f;  // float32 port vs float32 upstream (conformance README)

std::vector<fs::path> segmenter_dirs() {
  std::vector<fs::path> dirs;
  for (const char* root : {"conformance", "models"})
    for (const auto& e : fs::directory_iterator(fs::path(TESSERA_FIXTURES) / root))
      if (e.path().filename().string().rfind("segmenter-", 0) == 0) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

float max_abs_diff(const Tensor& a, const Tensor& b) {
  float m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

std::string cli() {
  const char* c = std::getenv("TESSERA_CLI");
  return c ? c : std::string(TESSERA_BINARY_DIR) + "/apps/tessera";
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs the CLI through the shell; returns the exit code, stderr in *err.
int run(const std::string& args, std::string* err = nullptr) {
  fs::path log = fs::temp_directory_path() / ("tessera_seg_" + std::to_string(getpid()) + ".log");
  int rc = std::system((cli() + " " + args + " 2> " + log.string()).c_str());
  if (err) *err = slurp(log);
  fs::remove(log);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("tessera_seg_test_" + std::to_string(getpid()) + "_" +
                                        std::to_string(std::random_device{}()));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

// The mask conformance model with a processor that keeps images at their own size (as Segmenter
// segments them), normalisation 0.5/0.5.
fs::path make_model_folder(const fs::path& dir) {
  const fs::path src = fs::path(TESSERA_FIXTURES) / "conformance/segmenter-mask-rand";
  fs::create_directories(dir);
  fs::copy_file(src / "config.json", dir / "config.json");
  fs::create_symlink(src / "model.safetensors", dir / "model.safetensors");
  std::ofstream(dir / "preprocessor_config.json")
      << R"({"image_processor_type": "ViTImageProcessor", "do_resize": false, "do_rescale": true,
            "rescale_factor": 0.00392156862745098, "do_normalize": true,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})";
  return dir;
}

cv::Mat noise(int h, int w, int type, unsigned seed) {
  cv::Mat m(h, w, type);
  cv::RNG rng(seed);
  rng.fill(m, cv::RNG::UNIFORM, 0, CV_MAT_DEPTH(type) == CV_16U ? 65535 : 255);
  return m;
}

std::set<std::string> label_files(const fs::path& root) {
  std::set<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file() && e.path().extension() == ".png" && name.find("_color") == std::string::npos)
      out.insert(e.path().lexically_relative(root).generic_string());
  }
  return out;
}

}  // namespace

TEST_CASE("Segmenter heads reproduce the upstream logits to 1e-4 at every size and backbone") {
  int cases = 0;
  std::set<std::string> kinds;
  for (const fs::path& dir : segmenter_dirs()) {
    INFO("model " << dir.string());
    std::shared_ptr<const Model> model;
    REQUIRE_NOTHROW(model = load_model(dir.string()));
    REQUIRE(model->segmentation);
    kinds.insert(model->segmentation->decoder == SegmenterDecoder::Linear ? "linear" : "mask");
    for (const auto& c : fs::directory_iterator(dir / "cases")) {
      INFO("case " << c.path().filename().string());
      Tensor x = SafeTensors::open((c.path() / "inputs.safetensors").string()).get("pixel_values");
      Tensor want = SafeTensors::open((c.path() / "expected.safetensors").string()).get("logits");
      ModelWorkspace ws;
      NamedTensors out = model_forward(*model, x, ws);
      const Tensor& got = output(out, "logits");
      REQUIRE(got.shape() == want.shape());
      CHECK(max_abs_diff(got, want) <= kTolerance);
      // The row-by-row label map at the input size picks a class whose logit is the maximum.
      SegmentationMasks masks = segmentation_masks(*model, x, ws);
      const int64_t n = want.dim(1), H = want.dim(2), W = want.dim(3);
      for (int64_t b = 0; b < want.dim(0); ++b) {
        cv::Mat labels = segmentation_labels(masks, b, static_cast<int>(H), static_cast<int>(W));
        int worse = 0;
        for (int64_t y = 0; y < H; ++y)
          for (int64_t xx = 0; xx < W; ++xx) {
            float best = -1e30f;
            for (int64_t k = 0; k < n; ++k) best = std::max(best, want[((b * n + k) * H + y) * W + xx]);
            const int l = labels.at<uint8_t>(static_cast<int>(y), static_cast<int>(xx));
            worse += want[((b * n + l) * H + y) * W + xx] < best - 1e-4f;
          }
        CHECK(worse == 0);
      }
      ++cases;
    }
  }
  CHECK(kinds.size() == 2);
  CHECK(cases >= 16);
}

TEST_CASE("sliding-window inference averages Segmenter's windows like segm/model/utils.py") {
  const fs::path dir = fs::path(TESSERA_FIXTURES) / "models/segmenter-mask-sizes-rand";
  auto model = load_model(dir.string());
  Tensor x = SafeTensors::open((dir / "sliding/inputs.safetensors").string()).get("pixel_values");
  Tensor want = SafeTensors::open((dir / "sliding/expected.safetensors").string()).get("logits");
  ModelWorkspace ws;
  Tensor got = segmentation_sliding_window(*model, x, 64, 40, ws, 3);
  REQUIRE(got.shape() == want.shape());
  CHECK(max_abs_diff(got, want) <= kTolerance);
}

TEST_CASE("Segmenter loading is strict") {
  TempDir t;
  const fs::path src = fs::path(TESSERA_FIXTURES) / "conformance/segmenter-linear-rand";
  fs::copy_file(src / "model.safetensors", t.path / "model.safetensors");
  std::string cfg = slurp(src / "config.json");
  auto with = [&](const std::string& from, const std::string& to) {
    std::string c = cfg;
    c.replace(c.find(from), from.size(), to);
    std::ofstream(t.path / "config.json") << c;
  };
  with("\"n_cls\": 5", "\"n_cls\": 6");
  CHECK_THROWS_WITH(load_model(t.path.string()), Catch::Contains("decoder.head.weight") && Catch::Contains("[6, 64]"));
  with("\"n_layers\": 2", "\"n_layers\": 1");
  CHECK_THROWS_WITH(load_model(t.path.string()), Catch::Contains("more encoder blocks"));
  with("\"name\": \"linear\"", "\"name\": \"mask_transformer\", \"n_layers\": 1, \"n_heads\": 4, \"d_model\": 64, \"d_ff\": 256");
  CHECK_THROWS_WITH(load_model(t.path.string()), Catch::Contains("decoder.proj_dec.weight"));
}

TEST_CASE("tessera segment exports label maps for a folder, reports bad images and resumes") {
  TempDir t;
  const fs::path model = make_model_folder(t.path / "model");
  const fs::path in = t.path / "in";
  fs::create_directories(in / "a/b");
  CHECK(cv::imwrite((in / "a/rgb.png").string(), noise(70, 90, CV_8UC3, 1)));
  CHECK(cv::imwrite((in / "a/b/photo.jpg").string(), noise(100, 60, CV_8UC3, 2)));
  CHECK(cv::imwrite((in / "gray.png").string(), noise(50, 50, CV_8UC1, 3)));
  CHECK(cv::imwrite((in / "deep16.png").string(), noise(40, 72, CV_16UC3, 4)));
  CHECK(cv::imwrite((in / "alpha.png").string(), noise(33, 47, CV_8UC4, 5)));
  for (int i = 0; i < 6; ++i)  // same size: batched together
    CHECK(cv::imwrite((in / "same" / ("s" + std::to_string(i) + ".png")).string(),
                      (fs::create_directories(in / "same"), noise(48, 64, CV_8UC3, 10 + i))));
  std::ofstream(in / "corrupt.png") << "\x89PNG\r\n\x1a\n not really a png";

  const fs::path out = t.path / "out";
  std::string err;
  const std::string common = "--model " + model.string() + " " + in.string();
  CHECK(run("segment " + common + " --out " + out.string() + " --color --overlay --fractions f.csv --batch 4 --threads 2",
            &err) == 1);
  INFO(err);
  CHECK(err.find("corrupt.png") != std::string::npos);
  CHECK(err.find("11 done, 0 skipped, 1 failed") != std::string::npos);

  const std::vector<std::string> names = load_model(model.string())->labels;
  const std::map<std::string, cv::Size> sizes = {
      {"a/rgb.png", {90, 70}}, {"a/b/photo.png", {60, 100}}, {"gray.png", {50, 50}},
      {"deep16.png", {72, 40}}, {"alpha.png", {47, 33}}};
  for (const auto& [rel, size] : sizes) {
    INFO(rel);
    cv::Mat l = cv::imread((out / rel).string(), cv::IMREAD_UNCHANGED);
    REQUIRE(!l.empty());
    CHECK(l.type() == CV_8UC1);
    CHECK(l.size() == size);
    double lo, hi;
    cv::minMaxLoc(l, &lo, &hi);
    CHECK(hi < 5);
    const std::string stem = rel.substr(0, rel.size() - 4);
    // The colour map: each class in class_colour, the colour detect and view give its boxes
    // (one colour per class across tools); a class named "background" black.
    const cv::Mat colour = cv::imread((out / (stem + "_color.png")).string());
    CHECK(colour.size() == size);
    int mismatches = 0;
    for (int y = 0; y < l.rows; ++y)
      for (int x = 0; x < l.cols; ++x) {
        const int c = l.at<uint8_t>(y, x);
        const cv::Scalar want = c < static_cast<int>(names.size()) && names[c] == "background" ? cv::Scalar(0, 0, 0)
                                                                                               : class_colour(c);
        mismatches += colour.at<cv::Vec3b>(y, x) != cv::Vec3b(static_cast<uchar>(want[0]), static_cast<uchar>(want[1]),
                                                              static_cast<uchar>(want[2]));
      }
    CHECK(mismatches == 0);
    // The overlay: the picture enlarged by a whole factor to a shorter side of at least 256,
    // the legend in a panel to its right.
    const int s = (256 + std::min(size.width, size.height) - 1) / std::min(size.width, size.height);
    const cv::Mat o = cv::imread((out / (stem + "_overlay.jpg")).string());
    CHECK(o.cols > size.width * s);
    CHECK(o.rows >= size.height * s);
  }
  CHECK(label_files(out).size() == 11);
  CHECK(!fs::exists(out / "corrupt.png"));
  // The exported map is the library's label map of the decoded image.
  {
    auto m = load_model(model.string());
    cv::Mat rgb = load_image_rgb((in / "a/b/photo.jpg").string());
    Tensor px = model_preprocessor(*m).image(rgb);
    ModelWorkspace ws;
    SegmentationMasks masks = segmentation_masks(*m, px.reshape({1, 3, px.dim(1), px.dim(2)}), ws);
    cv::Mat want = segmentation_labels(masks, 0, rgb.rows, rgb.cols);
    cv::Mat got = cv::imread((out / "a/b/photo.png").string(), cv::IMREAD_UNCHANGED);
    CHECK(cv::countNonZero(want != got) == 0);
  }
  // fractions: a header and one row per exported image, each summing to 1
  {
    std::ifstream f(out / "f.csv");
    std::string line;
    std::getline(f, line);
    CHECK(line.rfind("image,\"class_0\"", 0) == 0);
    int rows = 0;
    while (std::getline(f, line)) {
      ++rows;
      double sum = 0;
      std::stringstream ss(line.substr(line.rfind('"') + 2));
      for (std::string v; std::getline(ss, v, ',');) sum += std::stod(v);
      CHECK(std::abs(sum - 1.0) < 1e-4);
    }
    CHECK(rows == 11);
  }

  SECTION("the same label maps whatever the thread count and batch size") {
    const fs::path out2 = t.path / "out2";
    CHECK(run("segment " + common + " --out " + out2.string() + " --batch 1 --threads 1") == 1);
    for (const std::string& rel : label_files(out)) CHECK(slurp(out / rel) == slurp(out2 / rel));
  }
  SECTION("an @list mirrors the paths it lists, relative to the list's folder") {
    std::ofstream(t.path / "list.txt") << "in/a/b/photo.jpg\n" << (in / "gray.png").string() << "\n";
    const fs::path out3 = t.path / "out3";
    CHECK(run("segment --model " + model.string() + " --out " + out3.string() + " @" + (t.path / "list.txt").string()) == 0);
    CHECK(label_files(out3) == std::set<std::string>{"in/a/b/photo.png", "in/gray.png"});
    CHECK(slurp(out3 / "in/a/b/photo.png") == slurp(out / "a/b/photo.png"));
  }
  SECTION("--resume skips complete inputs and leaves them alone") {
    const auto before = fs::last_write_time(out / "a/rgb.png");
    fs::remove(out / "gray.png");
    CHECK(run("segment " + common + " --out " + out.string() + " --resume --color --overlay --fractions f.csv", &err) == 1);
    CHECK(err.find("1 done, 10 skipped, 1 failed") != std::string::npos);
    CHECK(fs::last_write_time(out / "a/rgb.png") == before);
    CHECK(fs::exists(out / "gray.png"));
    std::ifstream f(out / "f.csv");
    CHECK(std::count(std::istreambuf_iterator<char>(f), {}, '\n') == 12);
  }
  SECTION("--shard I/N: disjoint shards whose union is the whole set") {
    std::set<std::string> all;
    size_t total = 0;
    for (int i = 0; i < 3; ++i) {
      const fs::path o = t.path / ("shard" + std::to_string(i));
      run("segment " + common + " --out " + o.string() + " --fractions f.csv --shard " + std::to_string(i) + "/3");
      CHECK(fs::exists(o / ("f.shard-" + std::to_string(i) + "-of-3.csv")));
      auto files = label_files(o);
      total += files.size();
      all.insert(files.begin(), files.end());
    }
    CHECK(total == all.size());
    CHECK(all == label_files(out));
    CHECK(run("segment " + common + " --out " + (t.path / "x").string() + " --shard 3/3", &err) == 1);
    CHECK(err.find("--shard must be I/N") != std::string::npos);
  }
}

TEST_CASE("a killed export, restarted with --resume, completes without redoing finished images") {
  TempDir t;
  const fs::path model = make_model_folder(t.path / "model");
  const fs::path in = t.path / "in";
  fs::create_directories(in);
  const int n = 40;
  for (int i = 0; i < n; ++i)
    cv::imwrite((in / ("img" + std::to_string(100 + i) + ".png")).string(), noise(128, 128, CV_8UC3, 100 + i));
  const fs::path out = t.path / "out";
  const std::string exe = cli();
  pid_t pid = fork();
  if (pid == 0) {
    freopen("/dev/null", "w", stderr);
    execl(exe.c_str(), exe.c_str(), "segment", "--model", model.c_str(), "--out", out.c_str(), in.c_str(),
          "--threads", "1", "--batch", "1", "--color", static_cast<char*>(nullptr));
    _exit(127);
  }
  // Kill it as soon as a few images are finished.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  size_t finished = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    finished = fs::exists(out) ? label_files(out).size() : 0;
    if (finished >= 3) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  REQUIRE(WIFSIGNALED(status));
  std::map<std::string, fs::file_time_type> before;
  for (const std::string& rel : label_files(out)) before[rel] = fs::last_write_time(out / rel);
  INFO(before.size() << " label maps before the kill");
  REQUIRE(before.size() >= 3);
  REQUIRE(before.size() < static_cast<size_t>(n));  // the kill landed mid-run

  std::string err;
  CHECK(run("segment --model " + model.string() + " --out " + out.string() + " " + in.string() +
            " --threads 2 --color --resume", &err) == 0);
  INFO(err);
  auto after = label_files(out);
  CHECK(after.size() == static_cast<size_t>(n));
  for (const std::string& rel : after) {
    cv::Mat l = cv::imread((out / rel).string(), cv::IMREAD_UNCHANGED);
    CHECK(l.size() == cv::Size(128, 128));
    const std::string stem = rel.substr(0, rel.size() - 4);
    CHECK(!cv::imread((out / (stem + "_color.png")).string()).empty());
  }
  for (const auto& [rel, when] : before) CHECK(fs::last_write_time(out / rel) == when);
  // skipped = those complete at the kill (a label map is written last, so its presence means complete)
  CHECK(err.find(std::to_string(n - before.size()) + " done, " + std::to_string(before.size()) + " skipped, 0 failed") !=
        std::string::npos);
  for (const auto& e : fs::recursive_directory_iterator(out))
    if (e.path().extension() == ".partial") FAIL("leftover " << e.path());
}

TEST_CASE("more than 255 classes give 16-bit label PNGs") {
  TempDir t;
  const fs::path dir = t.path / "m300";
  fs::create_directories(dir);
  const int64_t d = 16, p = 8, f = 32, n = 300;
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 0.5f);
  std::vector<std::pair<std::string, Tensor>> w;
  auto add = [&](const std::string& name, Shape s) {
    Tensor x(s);
    for (float& v : x.span()) v = g(rng);
    w.emplace_back(name, x);
  };
  add("encoder.patch_embed.proj.weight", {d, 3, p, p});
  add("encoder.patch_embed.proj.bias", {d});
  add("encoder.cls_token", {1, 1, d});
  add("encoder.pos_embed", {1, 1 + 16, d});
  for (const char* k : {"norm1", "norm2"}) {
    add(std::string("encoder.blocks.0.") + k + ".weight", {d});
    add(std::string("encoder.blocks.0.") + k + ".bias", {d});
  }
  add("encoder.blocks.0.attn.qkv.weight", {3 * d, d});
  add("encoder.blocks.0.attn.qkv.bias", {3 * d});
  add("encoder.blocks.0.attn.proj.weight", {d, d});
  add("encoder.blocks.0.attn.proj.bias", {d});
  add("encoder.blocks.0.mlp.fc1.weight", {f, d});
  add("encoder.blocks.0.mlp.fc1.bias", {f});
  add("encoder.blocks.0.mlp.fc2.weight", {d, f});
  add("encoder.blocks.0.mlp.fc2.bias", {d});
  add("encoder.norm.weight", {d});
  add("encoder.norm.bias", {d});
  add("decoder.head.weight", {n, d});
  add("decoder.head.bias", {n});
  for (int64_t c = 256; c < n; ++c) w.back().second[c] += 3.0f;  // so that labels past 255 win somewhere
  save_safetensors((dir / "model.safetensors").string(), w);
  std::ofstream(dir / "config.json") << R"({"architectures": ["Segmenter"], "model_type": "segmenter", "n_cls": 300,
    "encoder": {"image_size": [32, 32], "patch_size": 8, "n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32},
    "decoder": {"name": "linear"}})";
  std::ofstream(dir / "preprocessor_config.json") << R"({"image_processor_type": "ViTImageProcessor", "do_resize": false, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5]})";
  cv::imwrite((t.path / "x.png").string(), noise(64, 80, CV_8UC3, 9));
  std::string err;
  CHECK(run("segment --model " + dir.string() + " --out " + (t.path / "out").string() + " " +
            (t.path / "x.png").string(), &err) == 0);
  INFO(err);
  cv::Mat l = cv::imread((t.path / "out/x.png").string(), cv::IMREAD_UNCHANGED);
  REQUIRE(!l.empty());
  CHECK(l.type() == CV_16UC1);
  CHECK(l.size() == cv::Size(80, 64));
  double lo, hi;
  cv::minMaxLoc(l, &lo, &hi);
  CHECK(hi < 300);
  CHECK(hi > 255);  // random logits over 300 classes: some label beyond 8 bits shows up
}

TEST_CASE("tessera infer writes Segmenter's per-pixel logits (1e-4), at the training size and others") {
  TempDir t;
  for (const char* c : {"conformance/segmenter-linear-rand/cases/native", "conformance/segmenter-mask-rand/cases/native",
                        "models/segmenter-linear-sizes-rand/cases/72x56", "models/segmenter-mask-sizes-rand/cases/61x77"}) {
    INFO(c);
    const fs::path cs = fs::path(TESSERA_FIXTURES) / c;
    const fs::path out = t.path / "out.safetensors";
    CHECK(run("infer --model " + cs.parent_path().parent_path().string() + " --inputs " +
              (cs / "inputs.safetensors").string() + " --outputs " + out.string() + " > /dev/null") == 0);
    Tensor got = SafeTensors::open(out.string()).get("logits");
    Tensor want = SafeTensors::open((cs / "expected.safetensors").string()).get("logits");
    REQUIRE(got.shape() == want.shape());
    CHECK(max_abs_diff(got, want) <= kTolerance);
  }
}

TEST_CASE("tessera segment --sliding-window gives the library's sliding-window label map") {
  TempDir t;
  const fs::path model = make_model_folder(t.path / "model");
  cv::imwrite((t.path / "wide.png").string(), noise(50, 130, CV_8UC3, 21));
  std::string err;
  CHECK(run("segment --model " + model.string() + " --out " + (t.path / "out").string() +
            " --sliding-window --window 64 --stride 40 " + (t.path / "wide.png").string(), &err) == 0);
  INFO(err);
  auto m = load_model(model.string());
  cv::Mat rgb = load_image_rgb((t.path / "wide.png").string());
  Tensor px = model_preprocessor(*m).image(rgb);
  ModelWorkspace ws;
  Tensor logits = segmentation_sliding_window(*m, px.reshape({1, 3, 50, 130}), 64, 40, ws);
  CHECK(logits.shape() == Shape{1, 5, 64, 166});  // short side enlarged to the window
  cv::Mat want = segmentation_labels(logits, 0, 50, 130);
  cv::Mat got = cv::imread((t.path / "out/wide.png").string(), cv::IMREAD_UNCHANGED);
  REQUIRE(got.size() == want.size());
  CHECK(cv::countNonZero(want != got) == 0);
}
