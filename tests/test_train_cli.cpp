// `tessera train --task classify` end to end: one SGD step with lr 1 through the command line
// leaves w − g (g from PyTorch, tests/reference/make_cli_train_fixture.py); a run killed with
// SIGKILL at random moments and resumed ends byte-identical to an uninterrupted one, on another
// thread count; the log, curves and model card are written; bad data is a one-line error before
// anything trains.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "cli_util.hpp"
#include "tessera/metrics.hpp"
#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/segmentation.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

using Run = test::CliRun;
using test::run_cli;
using test::slurp;

fs::path scratch(const std::string& name) { return test::scratch_dir("train_cli", name); }

std::string cli() {
  const char* c = std::getenv("TESSERA_CLI");
  REQUIRE(c != nullptr);
  return c;
}

std::string fixture(const std::string& rel) { return (fs::path(TESSERA_FIXTURES) / rel).string(); }

// The fixture ViT with the processor of the CLI fixture, as one model folder.
fs::path model_folder(const std::string& name) {
  const fs::path d = scratch(name);
  for (const char* f : {"config.json", "model.safetensors"})
    fs::copy_file(fixture(std::string("models/vit-p4-h48-noqkvbias-rand/") + f), d / f);
  fs::copy_file(fixture("train/cli-step/preprocessor_config.json"), d / "preprocessor_config.json");
  return d;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// A model folder's weights before and after one SGD step at lr 1 against the reference gradient
// (expected: grad.<name> for every tensor): the relative error of the gradient the step applied,
// max |(w − w₁) − g| / max |g|, at most 1e-4 (+ the float32 rounding of w − g itself).
void check_sgd_step(const fs::path& before_dir, const fs::path& after_dir, const std::string& expected_file) {
  const SafeTensors before = SafeTensors::open((before_dir / "model.safetensors").string());
  const SafeTensors after = SafeTensors::open((after_dir / "model.safetensors").string());
  const SafeTensors expected = SafeTensors::open(expected_file);
  REQUIRE(after.names() == before.names());
  int checked = 0;
  for (const std::string& name : before.names()) {
    const Tensor w = before.get(name), w1 = after.get(name), g = expected.get("grad." + name);
    REQUIRE(w1.shape() == w.shape());
    REQUIRE(g.numel() == w.numel());
    double err = 0, scale = 0, wmax = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      err = std::max(err, std::abs(static_cast<double>(w[i]) - w1[i] - g[i]));
      scale = std::max(scale, std::abs(static_cast<double>(g[i])));
      wmax = std::max(wmax, std::abs(static_cast<double>(w[i])));
    }
    INFO(name << ": max error " << err << ", max |g| " << scale);
    if (scale == 0)
      CHECK(err <= 1e-6 * wmax);  // a zero gradient leaves w (up to the rounding of w − 0·noise)
    else
      CHECK(err <= 1e-4 * scale + 1e-6 * wmax);
    ++checked;
  }
  CHECK(checked == static_cast<int>(before.names().size()));
}

}  // namespace

TEST_CASE("train: one SGD step with lr 1 of each family and head leaves w - g (PyTorch)", "[train_cli]") {
  // make_cli_head_fixtures.py: a DINOv2 classifier, a timm ViT with register tokens and LayerScale,
  // the DETR head with auxiliary loss, transformers' own random YOLOS, and Segmenter with the mask
  // transformer and with the linear decoder.
  struct Case {
    const char* task;
    const char* model;
    const char* data;  // under tests/fixtures/train
    const char* dir;
    int batch;  // every image of the fixture: one step over all of them
  };
  for (const Case& c : {Case{"classify", "models/dinov2-cls-rand", "cli-dinov2-step/images", "cli-dinov2-step", 6},
                        Case{"classify", "models/timm/vit_small_patch14_reg4_dinov2-cls", "cli-timm-step/images",
                             "cli-timm-step", 5},
                        Case{"detect", "models/detr-vit-aux-rand", "cli-detr-step/annotations.json", "cli-detr-step", 4},
                        Case{"detect", "conformance/yolos-tiny-rand", "cli-yolos-step/annotations.json", "cli-yolos-step",
                             4},
                        Case{"segment", "segmenter_train/mask/model", "cli-segmenter-mask-step", "cli-segmenter-mask-step",
                             4},
                        Case{"segment", "segmenter_train/model", "cli-segmenter-linear-step",
                             "cli-segmenter-linear-step", 4}}) {
    INFO(c.model);
    fs::path init = fixture(c.model);
    const fs::path processor = fixture(std::string("train/") + c.dir + "/preprocessor_config.json");
    if (fs::exists(processor)) {  // the model folder with the fixture's processor beside it
      const fs::path d = scratch(std::string("init-") + c.dir);
      for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(init / f, d / f);
      fs::copy_file(processor, d / "preprocessor_config.json");
      init = d;
    }
    const fs::path out = scratch(std::string("sgd-") + c.dir) / "model";
    const Run r = run_cli(std::string("train --task ") + c.task + " --init " + init.string() + " --data " +
                          fixture(std::string("train/") + c.data) + " --out " + out.string() +
                          " --optimizer sgd --lr 1 --warmup 0 --weight-decay 0 --clip-grad 0 --max-steps 1"
                          " --no-shuffle --no-augment --batch " + std::to_string(c.batch) + " --threads 2");
    INFO(r.out << r.err);
    REQUIRE(r.code == 0);
    check_sgd_step(init, out, fixture(std::string("train/") + c.dir + "/expected.safetensors"));
    CHECK_NOTHROW(load_model(out.string()));
  }
}

TEST_CASE("train: one SGD step with lr 1 through the CLI leaves w - g (PyTorch)", "[train_cli]") {
  const fs::path init = model_folder("init");
  const fs::path out = scratch("sgd") / "model";
  const Run r = run_cli("train --task classify --init " + init.string() + " --data " + fixture("train/cli-step/images") +
                        " --out " + out.string() +
                        " --optimizer sgd --lr 1 --warmup 0 --weight-decay 0 --clip-grad 0 --max-steps 1"
                        " --no-shuffle --no-augment --batch 6 --threads 2");
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  const SafeTensors before = SafeTensors::open((init / "model.safetensors").string());
  const SafeTensors after = SafeTensors::open((out / "model.safetensors").string());
  const SafeTensors expected = SafeTensors::open(fixture("train/cli-step/expected.safetensors"));
  REQUIRE(after.names() == before.names());
  int checked = 0;
  for (const std::string& name : before.names()) {
    const Tensor w = before.get(name), w1 = after.get(name), g = expected.get("grad." + name);
    REQUIRE(w1.shape() == w.shape());
    REQUIRE(g.numel() == w.numel());
    // Relative error of the gradient the step applied: max |(w − w₁) − g| / max |g|.
    double err = 0, scale = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      err = std::max(err, std::abs(static_cast<double>(w[i]) - w1[i] - g[i]));
      scale = std::max(scale, std::abs(static_cast<double>(g[i])));
    }
    INFO(name << ": max error " << err << ", max |g| " << scale);
    if (scale == 0)
      CHECK(err == 0);
    else
      CHECK(err <= 1e-4 * scale + 1e-6 * [&] {  // + the float32 rounding of w − g itself
              double m = 0;
              for (int64_t i = 0; i < w.numel(); ++i) m = std::max(m, std::abs(static_cast<double>(w[i])));
              return m;
            }());
    ++checked;
  }
  CHECK(checked == static_cast<int>(before.names().size()));
  // The folder is complete, loads for inference and says what it is.
  CHECK(fs::exists(out / "preprocessor_config.json"));
  CHECK(fs::exists(out / "config.json"));
  CHECK(fs::exists(out / "curves.png"));
  CHECK(count_lines(slurp(out / "log.csv")) == 2);  // header + one step
  CHECK(!fs::exists(out / "checkpoint.safetensors"));  // removed once the model is published
  CHECK(slurp(out / "README.md").find("--optimizer sgd --lr 1") != std::string::npos);
  CHECK_NOTHROW(load_model(out.string()));
}

TEST_CASE("train --precision bf16: the same SGD step to bf16's precision, and it says so", "[train_cli][bf16]") {
  // The step of the test above with the linear layers' GEMMs on bf16 operands: the applied
  // gradient is PyTorch's fp32 one to bf16's precision (2e-2 of its largest entry per tensor),
  // and not to fp32's (the setting reaches the GEMMs).
  const fs::path init = model_folder("init");
  const fs::path out = scratch("sgd-bf16") / "model";
  const Run r = run_cli("train --task classify --init " + init.string() + " --data " + fixture("train/cli-step/images") +
                        " --out " + out.string() +
                        " --optimizer sgd --lr 1 --warmup 0 --weight-decay 0 --clip-grad 0 --max-steps 1"
                        " --no-shuffle --no-augment --batch 6 --threads 2 --precision bf16");
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  CHECK(r.out.find("precision: bf16 GEMMs with fp32 sums") != std::string::npos);
  const SafeTensors before = SafeTensors::open((init / "model.safetensors").string());
  const SafeTensors after = SafeTensors::open((out / "model.safetensors").string());
  const SafeTensors expected = SafeTensors::open(fixture("train/cli-step/expected.safetensors"));
  double worst = 0;
  for (const std::string& name : before.names()) {
    const Tensor w = before.get(name), w1 = after.get(name), g = expected.get("grad." + name);
    double err = 0, scale = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      err = std::max(err, std::abs(static_cast<double>(w[i]) - w1[i] - g[i]));
      scale = std::max(scale, std::abs(static_cast<double>(g[i])));
    }
    INFO(name << ": max error " << err << ", max |g| " << scale);
    if (scale > 0) {
      CHECK(err <= 2e-2 * scale);
      worst = std::max(worst, err / scale);
    }
  }
  CHECK(worst > 1e-4);
  const Run bad = run_cli("train --task classify --init " + init.string() + " --data " +
                          fixture("train/cli-step/images") + " --out " + (scratch("sgd-bf16") / "x").string() +
                          " --precision fp16");
  CHECK(bad.code != 0);
  CHECK(bad.err.find("--precision") != std::string::npos);
}

TEST_CASE("train: killed at random moments and resumed, a run ends byte-identical (1 vs 2 threads)", "[train_cli]") {
  const fs::path init = model_folder("init2");
  const std::string args = " train --init " + init.string() + " --data " + fixture("train/cli-step/images") +
                           " --val " + fixture("train/cli-step/images") +
                           " --epochs 150 --batch 2 --lr 1e-3 --warmup 10 --checkpoint-every 7 --seed 3";
  const fs::path ref = scratch("ref") / "model";
  Run r = run_cli(args.substr(1) + " --threads 1 --out " + ref.string());
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  const std::string reference = slurp(ref / "model.safetensors");
  REQUIRE(!reference.empty());

  std::mt19937 rng(20261206);
  std::uniform_int_distribution<int> delay_ms(20, 400);
  int kills = 0;
  const char* rounds_env = std::getenv("TESSERA_KILL_ROUNDS");
  const int rounds = rounds_env ? std::max(1, std::atoi(rounds_env)) / 4 + 1 : 4;
  for (int round = 0; round < rounds; ++round) {
    const fs::path out = scratch("run" + std::to_string(round)) / "model";
    for (int attempt = 0;; ++attempt) {
      const std::string kill = attempt < 6 ? "timeout -s KILL " + std::to_string(delay_ms(rng) / 1000.0) + " " : "";
      const int status = std::system((kill + cli() + args + " --threads 2 --resume --out " + out.string() +
                                      " >/dev/null 2>&1").c_str());
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) break;
      REQUIRE(WIFEXITED(status));
      REQUIRE(WEXITSTATUS(status) == 137);
      ++kills;
    }
    INFO("round " << round);
    CHECK(slurp(out / "model.safetensors") == reference);
    // The log has every step once, whatever was killed.
    CHECK(count_lines(slurp(out / "log.csv")) == 1 + 150 * 3);
    CHECK(count_lines(slurp(out / "val.csv")) == 1 + 150);
  }
  CHECK(kills >= 1);
  std::printf("train kill-resume: %d rounds, %d runs killed, every final model byte-identical\n", rounds, kills);
}

TEST_CASE("train --resume refuses a checkpoint of the other --precision", "[train_cli][bf16]") {
  // A run killed after its first checkpoint (fp32), resumed with --precision bf16: a one-line
  // error naming the precision, not a run that silently changes precision half-way.
  const fs::path init = model_folder("init-precision");
  const std::string args = " train --task classify --init " + init.string() + " --data " +
                           fixture("train/cli-step/images") + " --epochs 400 --batch 2 --checkpoint-every 2 --seed 3";
  const fs::path out = scratch("precision") / "model";
  for (int attempt = 0; attempt < 20 && !fs::exists(out / "checkpoint.safetensors"); ++attempt) {
    fs::remove_all(out);
    const int status = std::system(("timeout -s KILL " + std::to_string(0.3 + 0.1 * attempt) + " " + cli() + args +
                                    " --threads 1 --out " + out.string() + " >/dev/null 2>&1").c_str());
    REQUIRE(WIFEXITED(status));
  }
  REQUIRE(fs::exists(out / "checkpoint.safetensors"));
  const Run r = run_cli(args.substr(1) + " --threads 1 --resume --precision bf16 --out " + out.string());
  INFO(r.err);
  CHECK(r.code != 0);
  CHECK(r.err.find("another precision (fp32, this run: bf16)") != std::string::npos);
}

TEST_CASE("train: bad data is a one-line error naming it, before training", "[train_cli]") {
  const fs::path init = model_folder("init3");
  const fs::path dir = scratch("bad");
  SECTION("empty folder") {
    fs::create_directories(dir / "empty");
    const Run r = run_cli("train --init " + init.string() + " --data " + (dir / "empty").string() + " --out " +
                          (dir / "o").string());
    CHECK(r.code != 0);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.err.find((dir / "empty").string()) != std::string::npos);
  }
  SECTION("corrupt image") {
    fs::create_directories(dir / "data" / "cat");
    std::ofstream(dir / "data" / "cat" / "broken.png") << "not a png";
    const Run r = run_cli("train --init " + init.string() + " --data " + (dir / "data").string() + " --out " +
                          (dir / "o").string() + " --no-augment --batch 1");
    CHECK(r.code != 0);
    CHECK(r.err.find("broken.png") != std::string::npos);
    CHECK(!fs::exists(dir / "o" / "model.safetensors"));
  }
  SECTION("missing digits.png") {
    const Run r = run_cli("train --arch vit-digits --data digits:train --digits-png /nonexistent/digits.png --out " +
                          (dir / "o").string());
    CHECK(r.code != 0);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.err.find("/nonexistent/digits.png") != std::string::npos);
  }
  SECTION("neither --init nor --arch") {
    const Run r = run_cli("train --data " + fixture("train/cli-step/images") + " --out " + (dir / "o").string());
    CHECK(r.code != 0);
    CHECK(r.err.find("--arch") != std::string::npos);
  }
  SECTION("--sub-batches: classification's, and only what divides the batch") {
    const Run d = run_cli("train --task detect --arch detr-digits --image-size 32 --data " +
                          (dir / "none.json").string() + " --sub-batches 2 --out " + (dir / "o").string());
    CHECK(d.code != 0);
    CHECK(count_lines(d.err) == 1);
    CHECK(d.err.find("--sub-batches is for classification") != std::string::npos);
    const Run c = run_cli("train --init " + init.string() + " --data " + fixture("train/cli-step/images") +
                          " --batch 3 --sub-batches 2 --max-steps 1 --no-augment --out " + (dir / "o").string());
    CHECK(c.code != 0);
    CHECK(count_lines(c.err) == 1);
    CHECK(c.err.find("--sub-batches 2 does not divide the batch of 3") != std::string::npos);
    CHECK(!fs::exists(dir / "o"));  // refused before anything is written
    const Run f = run_cli("train --init " + init.string() + " --data " + fixture("train/cli-step/images") +
                          " --batch 2 --freeze-encoder --sub-batches 2 --max-steps 1 --out " + (dir / "o").string());
    CHECK(f.code != 0);
    CHECK(count_lines(f.err) == 1);
    CHECK(f.err.find("--freeze-encoder") != std::string::npos);
    CHECK(!fs::exists(dir / "o"));
  }
}

TEST_CASE("train --freeze-encoder: only the classifier changes (a linear probe on cached features)", "[train_cli]") {
  const fs::path init = model_folder("init4");
  const fs::path out = scratch("probe") / "model";
  const Run r = run_cli("train --init " + init.string() + " --data " + fixture("train/cli-step/images") + " --out " +
                        out.string() + " --freeze-encoder --epochs 5 --batch 2 --lr 1e-2 --threads 2");
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  const SafeTensors before = SafeTensors::open((init / "model.safetensors").string());
  const SafeTensors after = SafeTensors::open((out / "model.safetensors").string());
  for (const std::string& name : before.names()) {
    const Tensor w = before.get(name), w1 = after.get(name);
    bool same = true;
    for (int64_t i = 0; i < w.numel(); ++i) same = same && w[i] == w1[i];
    INFO(name);
    CHECK(same == (name.rfind("classifier.", 0) != 0));
  }
  // --precision bf16: the probe's head sums in double and the cached features are encoded in fp32
  // (what inference feeds it), so the run is fp32's byte for byte; features encoded in bf16 would
  // move the classifier (checked by removing the encoding's fp32 scope: this then fails).
  const fs::path out16 = scratch("probe16") / "model";
  const Run r16 = run_cli("train --init " + init.string() + " --data " + fixture("train/cli-step/images") + " --out " +
                          out16.string() + " --freeze-encoder --epochs 5 --batch 2 --lr 1e-2 --threads 2 --precision bf16");
  INFO(r16.out << r16.err);
  REQUIRE(r16.code == 0);
  // Every tensor (the empty prefix) bit-identical between the fp32 and the bf16 run.
  CHECK(test::check_frozen(out, out16, "").same == static_cast<int>(after.names().size()));
}

TEST_CASE("train --freeze-encoder on a Dinov2Model: a linear probe, written as Dinov2ForImageClassification",
          "[train_cli]") {
  // The common case: a features-only DINOv2 folder, a new head on [class token, mean of the patches].
  const fs::path init = scratch("dinov2-base");
  for (const char* f : {"config.json", "model.safetensors"})
    fs::copy_file(fixture(std::string("conformance/dinov2-small-rand/") + f), init / f);
  std::ofstream(init / "preprocessor_config.json")
      << R"({"image_processor_type": "BitImageProcessor", "do_resize": true, "size": {"height": 56, "width": 56},
            "resample": 3, "do_center_crop": false, "do_rescale": true, "rescale_factor": 0.00392156862745098,
            "do_normalize": true, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})";
  const fs::path out = scratch("dinov2-probe") / "model";
  const Run r = run_cli("train --init " + init.string() + " --data " + fixture("train/cli-step/images") + " --out " +
                        out.string() + " --freeze-encoder --epochs 3 --batch 2 --lr 1e-2 --threads 2");
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("a new classification head") != std::string::npos);
  const auto model = load_model(out.string());
  CHECK(model->architecture == "Dinov2ForImageClassification");
  CHECK(model->labels.size() == 4);
  // The encoder is the base model's, bit for bit, under the classifier's "dinov2." names.
  const SafeTensors before = SafeTensors::open((init / "model.safetensors").string());
  const SafeTensors after = SafeTensors::open((out / "model.safetensors").string());
  int compared = 0;
  for (const std::string& name : before.names()) {
    INFO(name);
    REQUIRE(after.contains("dinov2." + name));
    const Tensor w = before.get(name), w1 = after.get("dinov2." + name);
    CHECK(std::equal(w.data(), w.data() + w.numel(), w1.data()));
    ++compared;
  }
  CHECK(compared > 10);
  CHECK(after.contains("classifier.weight"));
}

TEST_CASE("train --task segment --crops: a Segmenter that segment and eval run with sliding windows", "[train_cli]") {
  // Light squares (class 1) and dark discs (class 2) on grey, 44x36 images and label maps.
  const fs::path data = scratch("segdata");
  fs::create_directories(data / "images"), fs::create_directories(data / "masks");
  for (int i = 0; i < 6; ++i) {
    cv::Mat img(36, 44, CV_8UC3, cv::Scalar(128, 128, 128)), mask(36, 44, CV_8U, cv::Scalar(0));
    cv::rectangle(img, cv::Rect(4 + 4 * i, 3 + 2 * i, 9, 9), cv::Scalar(240, 240, 240), cv::FILLED);
    cv::rectangle(mask, cv::Rect(4 + 4 * i, 3 + 2 * i, 9, 9), cv::Scalar(1), cv::FILLED);
    cv::circle(img, cv::Point(38 - 4 * i, 28 - i), 5, cv::Scalar(20, 20, 20), cv::FILLED);
    cv::circle(mask, cv::Point(38 - 4 * i, 28 - i), 5, cv::Scalar(2), cv::FILLED);
    cv::imwrite((data / "images" / ("s" + std::to_string(i) + ".png")).string(), img);
    cv::imwrite((data / "masks" / ("s" + std::to_string(i) + ".png")).string(), mask);
  }
  const fs::path out = scratch("segcrops") / "model";
  const Run r = run_cli("train --task segment --data " + data.string() + " --out " + out.string() +
                        " --arch segmenter-digits --crops --image-size 16 --hidden-size 24 --layers 1 --heads 2"
                        " --max-steps 6 --batch 2 --lr 3e-3 --threads 2");
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("16x16 crops at the images' own resolution") != std::string::npos);
  const nlohmann::json cfg = nlohmann::json::parse(slurp(out / "config.json"));
  CHECK(cfg["inference"]["window_size"] == 16);
  CHECK(cfg["inference"]["window_stride"] == 10);
  CHECK(nlohmann::json::parse(slurp(out / "preprocessor_config.json"))["do_resize"] == false);
  CHECK_FALSE(fs::exists(out / "checkpoint.safetensors"));

  // segment: sliding windows by default, the same label map as asked for explicitly; one pass
  // over the whole image on request.
  const fs::path image = data / "images" / "s2.png";
  const fs::path a = scratch("seg-default"), b = scratch("seg-sliding"), c = scratch("seg-onepass");
  for (const auto& [dir, flag] : {std::pair{a, ""}, {b, " --sliding-window --window 16 --stride 10"},
                                  {c, " --no-sliding-window"}}) {
    const Run s = run_cli("segment --model " + out.string() + " --out " + dir.string() + flag + " " + image.string());
    INFO(flag << s.err);
    REQUIRE(s.code == 0);
  }
  const cv::Mat la = cv::imread((a / "s2.png").string(), cv::IMREAD_UNCHANGED);
  const cv::Mat lb = cv::imread((b / "s2.png").string(), cv::IMREAD_UNCHANGED);
  const cv::Mat lc = cv::imread((c / "s2.png").string(), cv::IMREAD_UNCHANGED);
  REQUIRE(la.size() == cv::Size(44, 36));
  REQUIRE(lc.size() == la.size());
  CHECK(cv::countNonZero(la != lb) == 0);
  CHECK(run_cli("segment --model " + out.string() + " --out " + c.string() +
                " --sliding-window --no-sliding-window " + image.string()).code != 0);

  // eval measures what segment outputs, image for image.
  const fs::path all = scratch("seg-all");
  REQUIRE(run_cli("segment --model " + out.string() + " --out " + all.string() + " " + (data / "images").string()).code == 0);
  SegmentationConfusion confusion(3);
  for (int i = 0; i < 6; ++i) {
    const std::string name = "s" + std::to_string(i) + ".png";
    confusion.add(cv::imread((data / "masks" / name).string(), cv::IMREAD_UNCHANGED),
                  cv::imread((all / name).string(), cv::IMREAD_UNCHANGED), name);
  }
  const fs::path json = scratch("segeval") / "e.json";
  const Run e = run_cli("eval --model " + out.string() + " --data " + data.string() + " --json " + json.string());
  INFO(e.err);
  REQUIRE(e.code == 0);
  CHECK(nlohmann::json::parse(slurp(json))["mIoU"].get<double>() == Approx(confusion.mean_iou()).epsilon(1e-12));

  // --init this Segmenter --image-size 32: the same model on whole images resized to 32x32 (its
  // position table resampled as Segmenter resamples it at inference, its decoder kept). With SGD
  // at lr 0 its outputs on a 32x32 input are the crop-trained model's on that input in one pass
  // (to 1e-5 of their peak: the same resampling, done once instead of per call); it has no
  // sliding window, and its processor resizes.
  const fs::path resized = scratch("segresized") / "model";
  const Run rs = run_cli("train --task segment --data " + data.string() + " --out " + resized.string() + " --init " +
                         out.string() + " --image-size 32 --max-steps 1 --batch 2 --optimizer sgd --lr 0 --threads 2");
  INFO(rs.out << rs.err);
  REQUIRE(rs.code == 0);
  CHECK(rs.err.find("re-sized from 16x16 to 32x32 (whole images resized)") != std::string::npos);
  CHECK_FALSE(nlohmann::json::parse(slurp(resized / "config.json")).contains("inference"));
  CHECK(nlohmann::json::parse(slurp(resized / "preprocessor_config.json"))["do_resize"] == true);
  Tensor px({1, 3, 32, 32});
  for (int64_t k = 0; k < px.numel(); ++k) px[k] = static_cast<float>(std::sin(0.173 * k) * 2.0);
  const auto crop_model = load_model(out.string()), resized_model = load_model(resized.string());
  ModelWorkspace w1, w2;
  const NamedTensors o1 = model_forward(*crop_model, px, w1), o2 = model_forward(*resized_model, px, w2);
  REQUIRE(o1.size() == o2.size());
  for (size_t k = 0; k < o1.size(); ++k) {
    INFO(o1[k].first);
    REQUIRE(o1[k].second.shape() == o2[k].second.shape());
    float peak = 0, diff = 0;
    for (int64_t e = 0; e < o1[k].second.numel(); ++e)
      peak = std::max(peak, std::fabs(o1[k].second[e])), diff = std::max(diff, std::fabs(o1[k].second[e] - o2[k].second[e]));
    CHECK(peak > 0);
    CHECK(diff <= 1e-5f * peak);
  }
}

TEST_CASE("train --task segment --decoder mask_transformer: Segmenter's mask transformer, new and fine-tuned",
          "[train_cli]") {
  const fs::path data = scratch("segmask");
  fs::create_directories(data / "images"), fs::create_directories(data / "masks");
  for (int i = 0; i < 4; ++i) {
    cv::Mat img(16, 16, CV_8UC3, cv::Scalar(128, 128, 128)), mask(16, 16, CV_8U, cv::Scalar(0));
    cv::rectangle(img, cv::Rect(2 + i, 3, 6, 6), cv::Scalar(240, 240, 240), cv::FILLED);
    cv::rectangle(mask, cv::Rect(2 + i, 3, 6, 6), cv::Scalar(1), cv::FILLED);
    cv::imwrite((data / "images" / ("m" + std::to_string(i) + ".png")).string(), img);
    cv::imwrite((data / "masks" / ("m" + std::to_string(i) + ".png")).string(), mask);
  }
  const fs::path out = scratch("segmask-model") / "model";
  const Run r = run_cli("train --task segment --data " + data.string() + " --out " + out.string() +
                        " --arch segmenter-digits --image-size 16 --hidden-size 24 --layers 1 --heads 2"
                        " --decoder mask_transformer --decoder-layers 1 --max-steps 3 --batch 2 --threads 2");
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  const nlohmann::json cfg = nlohmann::json::parse(slurp(out / "config.json"));
  CHECK(cfg["decoder"]["name"] == "mask_transformer");
  CHECK(cfg["decoder"]["n_layers"] == 1);
  CHECK(cfg["decoder"]["d_model"] == 24);
  const auto model = load_model(out.string());
  REQUIRE(model->segmentation != nullptr);
  // It fine-tunes as it is; its decoder cannot be changed there.
  const fs::path again = scratch("segmask-again") / "model";
  CHECK(run_cli("train --task segment --data " + data.string() + " --out " + again.string() + " --init " +
                out.string() + " --max-steps 1 --batch 2 --threads 1").code == 0);
  // --freeze-encoder: the decoder trains, the encoder's tensors keep their values.
  const fs::path frozen = scratch("segmask-frozen") / "model";
  REQUIRE(run_cli("train --task segment --data " + data.string() + " --out " + frozen.string() + " --init " +
                  out.string() + " --freeze-encoder --max-steps 2 --batch 2 --lr 1e-2 --threads 1").code == 0);
  const test::FrozenCount frozen_count = test::check_frozen(out, frozen, "encoder.");
  CHECK(frozen_count.same > 10);
  CHECK(frozen_count.changed > 5);
  const Run bad = run_cli("train --task segment --data " + data.string() + " --out " + again.string() + " --init " +
                          out.string() + " --decoder linear --decoder-layers 2 --max-steps 1");
  CHECK(bad.code != 0);
  CHECK(bad.err.find("keeps its decoder") != std::string::npos);
}

TEST_CASE("train --init a timm / torchvision folder: fine-tuned on new classes, written back in its family",
          "[train_cli]") {
  struct Family {
    const char *dir, *name, *qkv, *head;
  };
  for (const Family& f : {Family{"models/timm/vit_tiny_patch16_224-token-dynamic", "timm", "blocks.0.attn.qkv.weight",
                                 "head.weight"},
                          Family{"models/tv-vit-rand", "torchvision",
                                 "encoder.layers.encoder_layer_0.self_attention.in_proj_weight", "heads.head.weight"}}) {
    INFO(f.name);
    const fs::path out = scratch(f.name) / "model";
    const Run r = run_cli("train --init " + fixture(f.dir) + " --data " + fixture("train/cli-step/images") + " --out " +
                          out.string() + " --max-steps 2 --batch 2 --threads 2");
    INFO(r.out << r.err);
    REQUIRE(r.code == 0);
    const nlohmann::json cfg = nlohmann::json::parse(slurp(out / "config.json"));
    CHECK(cfg["num_classes"] == 4);
    // No preprocessor_config.json: the processor stays timm's pretrained_cfg / torchvision's defaults.
    CHECK_FALSE(fs::exists(out / "preprocessor_config.json"));
    const SafeTensors st = SafeTensors::open((out / "model.safetensors").string());
    CHECK(st.contains(f.qkv));
    CHECK(st.contains(f.head));
    CHECK_FALSE(st.contains("classifier.weight"));
    const auto model = load_model(out.string());
    CHECK(model->model_type == f.name);
    CHECK(model->labels == std::vector<std::string>{"airplane", "automobile", "bird", "cat"});
    const Run c = run_cli("classify --model " + out.string() + " " + fixture("train/cli-step/images/bird"));
    INFO(c.err);
    CHECK(c.code == 0);
  }
}

TEST_CASE("train --init --image-size fine-tunes a classifier at another resolution", "[train_cli]") {
  // The bundled digit classifier (20x20, patch 4) fine-tuned at 32x32: the written folder is a
  // 32x32 model (config image_size, an 8x8 position grid, a processor of that size) that
  // load_model runs at 32x32 without interpolation, and it still reads the digits.
  const fs::path out = test::scratch_dir("train_cli", "size32") / "model";
  const std::string digits = std::string(TESSERA_SOURCE_DIR) + "/assets/models/digits";
  const test::CliRun r = test::run_cli("train --task classify --data digits:test --init " + digits +
                                       " --image-size 32 --max-steps 10 --batch 32 --lr 1e-4 --no-augment --threads 2"
                                       " --out " + out.string());
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("fine-tuning") != std::string::npos);
  const nlohmann::json cfg = nlohmann::json::parse(test::slurp(out / "config.json"));
  CHECK(cfg["image_size"] == 32);
  const nlohmann::json pre = nlohmann::json::parse(test::slurp(out / "preprocessor_config.json"));
  CHECK(pre["size"]["height"] == 32);
  CHECK(pre["size"]["width"] == 32);
  const SafeTensors st = SafeTensors::open((out / "model.safetensors").string());
  CHECK(st.info("vit.embeddings.position_embeddings").shape == Shape{1, 1 + 64, 64});
  const auto model = load_model(out.string());
  CHECK(model->encoder.config.image_height == 32);
  // 10 small steps at the new size keep the classifier's skill (measured on the test cells it
  // trained on here: the point is that the resized table and processor fit together).
  const test::CliRun e = test::run_cli("eval --model " + out.string() + " --data digits:test");
  INFO(e.out << e.err);
  REQUIRE(e.code == 0);
  const auto at = e.out.find("top-1");
  REQUIRE(at != std::string::npos);
  CHECK(std::atof(e.out.c_str() + e.out.find_first_of("0123456789", at + 5)) > 90.0);
  // A timm folder keeps its size: a one-line error, not a silently ignored option.
  const std::string timm = std::string(TESSERA_FIXTURES) + "/models/timm/vit_tiny_patch16_224-avg-nofcnorm";
  const test::CliRun t = test::run_cli("train --task classify --data digits:test --init " + timm +
                                       " --image-size 64 --max-steps 1 --out " + (out.parent_path() / "timm").string());
  CHECK(t.code != 0);
  CHECK(t.err.find("trains at its own size") != std::string::npos);
}

TEST_CASE("train --task segment --box-loss: patch tokens taught their boxes, the head left out", "[train_cli]") {
  // Light rectangles (class 1) on grey, 40x32, their boxes in a COCO file beside the masks.
  const fs::path data = scratch("boxdata");
  fs::create_directories(data / "images"), fs::create_directories(data / "masks");
  nlohmann::json coco = {{"images", nlohmann::json::array()}, {"annotations", nlohmann::json::array()},
                         {"categories", {{{"id", 1}, {"name", "box"}}}}};
  for (int i = 0; i < 6; ++i) {
    cv::Mat img(32, 40, CV_8UC3, cv::Scalar(128, 128, 128)), mask(32, 40, CV_8U, cv::Scalar(0));
    const cv::Rect r(3 + 4 * i, 2 + 3 * i, 8 + i, 9);
    cv::rectangle(img, r, cv::Scalar(240, 240, 240), cv::FILLED);
    cv::rectangle(mask, r, cv::Scalar(1), cv::FILLED);
    const std::string name = "s" + std::to_string(i) + ".png";
    cv::imwrite((data / "images" / name).string(), img);
    cv::imwrite((data / "masks" / name).string(), mask);
    coco["images"].push_back({{"id", i + 1}, {"file_name", "images/" + name}, {"width", 40}, {"height", 32}});
    coco["annotations"].push_back({{"id", i + 1}, {"image_id", i + 1}, {"category_id", 1},
                                   {"bbox", {r.x, r.y, r.width, r.height}}, {"area", r.area()}, {"iscrowd", 0}});
  }
  std::ofstream(data / "annotations.json") << coco.dump();
  const std::string base = "train --task segment --data " + data.string() +
                           " --arch segmenter-digits --image-size 16 --hidden-size 24 --layers 1 --heads 2 --batch 2 --threads 2";
  const fs::path out = scratch("boxrun") / "model";
  const Run r = run_cli(base + " --max-steps 6 --lr 3e-3 --box-loss 2 --out " + out.string());
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("patch-box loss (weight 2): 6 boxes from") != std::string::npos);
  const std::string log = slurp(out / "log.csv");
  CHECK(log.substr(0, log.find('\n')).find("box_l1") != std::string::npos);
  // The training-only head is not part of the model: the same tensors as a run without it.
  const fs::path plain = scratch("boxplain") / "model";
  REQUIRE(run_cli(base + " --max-steps 1 --out " + plain.string()).code == 0);
  CHECK(SafeTensors::open((out / "model.safetensors").string()).names() ==
        SafeTensors::open((plain / "model.safetensors").string()).names());
  REQUIRE(load_model(out.string())->segmentation != nullptr);

  // --resume continues the head too (its weights and AdamW moments are in the checkpoint): a run
  // killed after a checkpoint and resumed ends byte-identical to an uninterrupted one. (Without
  // the head's state the resumed encoder would get other box gradients and other weights.)
  {
    const std::string run = base + " --box-loss 2 --lr 3e-3 --max-steps 3000 --checkpoint-every 10";
    const fs::path ref = scratch("boxref") / "model";
    REQUIRE(run_cli(run + " --out " + ref.string()).code == 0);
    const fs::path part = scratch("boxresume") / "model";
    bool interrupted = false;
    for (double delay = 0.15; delay < 20 && !interrupted; delay *= 1.5) {
      fs::remove_all(part);
      const int status = std::system(("timeout -s KILL " + std::to_string(delay) + " " + cli() + " " + run +
                                      " --out " + part.string() + " >/dev/null 2>&1").c_str());
      REQUIRE(WIFEXITED(status));
      if (WEXITSTATUS(status) == 0) break;  // finished first: the machine is faster than the delays
      REQUIRE(WEXITSTATUS(status) == 137);
      interrupted = fs::exists(part / "checkpoint.safetensors");
    }
    REQUIRE(interrupted);
    const Run resumed = run_cli(run + " --resume --out " + part.string());
    INFO(resumed.err);
    REQUIRE(resumed.code == 0);
    CHECK(resumed.err.find("resuming ") != std::string::npos);
    CHECK(slurp(part / "model.safetensors") == slurp(ref / "model.safetensors"));
    // A checkpoint of another --box-loss is not continued.
    const fs::path other = scratch("boxother") / "model";
    for (double delay = 0.15; delay < 20 && !fs::exists(other / "checkpoint.safetensors"); delay *= 1.5) {
      fs::remove_all(other);
      std::system(("timeout -s KILL " + std::to_string(delay) + " " + cli() + " " + run + " --out " + other.string() +
                   " >/dev/null 2>&1").c_str());
    }
    const Run mixed = run_cli(base + " --lr 3e-3 --max-steps 3000 --checkpoint-every 10 --resume --out " + other.string());
    CHECK(mixed.code != 0);
    CHECK(mixed.err.find("written by a run with another --box-loss") != std::string::npos);
  }

  const fs::path o = scratch("boxbad") / "model";
  const Run frozen = run_cli(base + " --box-loss 1 --freeze-encoder --max-steps 1 --out " + o.string());
  CHECK(frozen.code != 0);
  CHECK(frozen.err.find("--box-loss trains the encoder's patch tokens; it cannot be frozen") != std::string::npos);
  const Run lonely = run_cli(base + " --boxes " + (data / "annotations.json").string() + " --max-steps 1 --out " + o.string());
  CHECK(lonely.code != 0);
  CHECK(lonely.err.find("--boxes is the data of --box-loss") != std::string::npos);
  // A COCO file without one of the images names both.
  coco["images"].erase(coco["images"].begin() + 5);
  coco["annotations"].erase(coco["annotations"].begin() + 5);
  const fs::path partial = data / "partial.json";
  std::ofstream(partial) << coco.dump();
  const Run missing = run_cli(base + " --box-loss 1 --boxes " + partial.string() + " --max-steps 1 --out " + o.string());
  CHECK(missing.code != 0);
  CHECK(missing.err.find(partial.string() + ": has no image s5.png") != std::string::npos);
  const Run detect = run_cli("train --task detect --data " + (data / "annotations.json").string() +
                             " --arch detr-digits --box-loss 1 --out " + o.string());
  CHECK(detect.code != 0);
  CHECK(detect.err.find("--box-loss and --boxes are for segmentation") != std::string::npos);
  CHECK_FALSE(fs::exists(o));
}
