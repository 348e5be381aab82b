// Segmenter's training pass (vision/include/tessera/segmenter_train.hpp) against PyTorch autograd
// through the Segmenter port (tests/reference/make_segmenter_train_fixture.py), against the
// inference pass (load_model on the saved folder), and the training loop's resume.
//
// Tolerance: relative error max|got − want| / max|want| ≤ 1e-4 per tensor (fp32 against float64).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <string>
#include <unistd.h>
#include <vector>

#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/segmentation.hpp"
#include "tessera/segmenter_train.hpp"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-4;

template <class A, class B>
double rel_err(const A& got, const B& want, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num = std::max(num, std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
    den = std::max(den, std::abs(static_cast<double>(want[i])));
  }
  return den > 0 ? num / den : num;
}

std::string fixture(const std::string& rel) {
  return std::string(TESSERA_FIXTURES) + "/segmenter_train/" + rel;
}

struct Batch {
  Tensor pixels;
  std::vector<int32_t> labels;
};
Batch fixture_batch() {
  const SafeTensors st = SafeTensors::open(fixture("batch.safetensors"));
  Batch b{st.read("pixel_values"), {}};
  const Tensor labels = st.read("labels");
  for (int64_t i = 0; i < labels.numel(); ++i) b.labels.push_back(static_cast<int32_t>(labels[i]));
  return b;
}

fs::path temp_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("tessera-segtrain-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace

TEST_CASE("Segmenter training gradient matches PyTorch autograd", "[segmenter_train]") {
  const SegmenterTrainModel model = load_segmenter_train_model(fixture("model"));
  const Batch batch = fixture_batch();
  const SafeTensors want = SafeTensors::open(fixture("expected.safetensors"));
  SegmenterTrainActivations acts;
  std::vector<float> grads(model.vit.weights.size(), 0.0f);
  const double loss = segmenter_train_loss_and_grad(model, batch.pixels, batch.labels, acts, grads);
  const double want_loss = want.read("loss")[0];
  CHECK(std::abs(loss - want_loss) <= kTol * std::abs(want_loss));
  const Tensor want_logits = want.read("logits");
  REQUIRE(acts.logits.shape() == want_logits.shape());
  CHECK(rel_err(acts.logits.data(), want_logits.data(), static_cast<size_t>(want_logits.numel())) <= kTol);
  const auto named = segmenter_named_tensors(model, grads);
  REQUIRE(named.size() == want.names().size() - 2);  // every parameter, besides loss and logits
  for (const auto& [name, g] : named) {
    INFO(name);
    const Tensor w = want.read("grad." + name);
    REQUIRE(w.shape() == g.shape());
    CHECK(rel_err(g.data(), w.data(), static_cast<size_t>(w.numel())) <= kTol);
  }
}

TEST_CASE("Segmenter: one SGD step at lr 1 leaves w - g", "[segmenter_train]") {
  SegmenterTrainModel model = load_segmenter_train_model(fixture("model"));
  const Batch batch = fixture_batch();
  SegmenterTrainActivations acts;
  std::vector<float> g(model.vit.weights.size(), 0.0f);
  segmenter_train_loss_and_grad(model, batch.pixels, batch.labels, acts, g);
  const std::vector<float> before = model.vit.weights;
  SegmenterTrainState state;
  TrainStepOptions o;
  o.optimizer = Optimizer::Sgd, o.lr = 1.0f, o.weight_decay = 0, o.clip_grad = 0, o.momentum = 0;
  segmenter_train_step(model, state, batch.pixels, batch.labels, o);
  size_t mismatches = 0;
  for (size_t i = 0; i < before.size(); ++i) mismatches += model.vit.weights[i] != before[i] - g[i];
  CHECK(mismatches == 0);
  CHECK(state.opt.step == 1);
}

TEST_CASE("A saved Segmenter reloads through load_model with the training forward's logits",
          "[segmenter_train]") {
  // The fixture's random model, and a new one from a preset (its own config.json).
  VitConfig c = segmenter_train_preset("segmenter-digits", 32);
  c.hidden_size = 24, c.num_hidden_layers = 2, c.intermediate_size = 48;
  SegmenterTrainModel fresh = make_segmenter_train_model(c, {"background", "a", "b"}, 7);
  // A zero head would make the comparison trivial: give it values.
  std::span<float> head = fresh.vit.view(std::span<float>(fresh.vit.weights), "classifier.weight");
  for (size_t i = 0; i < head.size(); ++i) head[i] = 0.01f * static_cast<float>(i % 17) - 0.08f;
  const SegmenterTrainModel loaded = load_segmenter_train_model(fixture("model"));
  int index = 0;
  for (const SegmenterTrainModel* m : std::vector<const SegmenterTrainModel*>{&loaded, &fresh}) {
    INFO("model " << index);
    const fs::path dir = temp_dir("save" + std::to_string(index++));
    save_segmenter_train_model(*m, dir.string());
    const int64_t size = m->vit.config.image_height;
    Tensor px({2, 3, size, size});
    for (int64_t i = 0; i < px.numel(); ++i) px[i] = std::sin(0.37f * static_cast<float>(i));
    SegmenterTrainActivations acts;
    const Tensor& train_logits = segmenter_train_forward(*m, px, acts);
    const auto model = load_model(dir.string());
    REQUIRE(model->segmentation != nullptr);
    ModelWorkspace ws;
    const Tensor logits = segmentation_logits(segmentation_masks(*model, px, ws));
    REQUIRE(logits.shape() == train_logits.shape());
    CHECK(rel_err(train_logits.data(), logits.data(), static_cast<size_t>(logits.numel())) <= kTol);
    // And back into training, weight for weight.
    const SegmenterTrainModel again = load_segmenter_train_model(dir.string());
    CHECK(again.vit.weights == m->vit.weights);
    CHECK(again.num_classes == m->num_classes);
    fs::remove_all(dir);
  }
}

TEST_CASE("Segmenter training refuses what it cannot train", "[segmenter_train]") {
  const SegmenterTrainModel model = load_segmenter_train_model(fixture("model"));
  SegmenterTrainActivations acts;
  CHECK_THROWS_WITH(segmenter_train_forward(model, Tensor({1, 3, 24, 24}), acts),
                    Catch::Contains("image_size"));
  CHECK_THROWS_WITH(load_segmenter_train_model(std::string(TESSERA_FIXTURES) + "/conformance/segmenter-mask-rand"),
                    Catch::Contains("linear decoder"));
  CHECK_THROWS_WITH(segmenter_train_preset("segmenter-huge", 64), Catch::Contains("segmenter-ti"));
}

TEST_CASE("Segmenter training loop: resumed run is bit-identical, the loss falls", "[segmenter_train]") {
  // A small data set: light squares (class 1) and dark discs (class 2) on grey, 40x32 images.
  const fs::path data = temp_dir("data");
  fs::create_directories(data / "images"), fs::create_directories(data / "masks");
  for (int i = 0; i < 8; ++i) {
    cv::Mat img(32, 40, CV_8UC3, cv::Scalar(128, 128, 128)), mask(32, 40, CV_8U, cv::Scalar(0));
    const int x = 4 + 3 * i, y = 2 + 2 * i;
    cv::rectangle(img, cv::Rect(x, y, 10, 10), cv::Scalar(240, 240, 240), cv::FILLED);
    cv::rectangle(mask, cv::Rect(x, y, 10, 10), cv::Scalar(1), cv::FILLED);
    cv::circle(img, cv::Point(36 - 3 * i, 26 - i), 5, cv::Scalar(20, 20, 20), cv::FILLED);
    cv::circle(mask, cv::Point(36 - 3 * i, 26 - i), 5, cv::Scalar(2), cv::FILLED);
    const std::string stem = "s" + std::to_string(i);
    cv::imwrite((data / "images" / (stem + ".png")).string(), img);
    cv::imwrite((data / "masks" / (stem + ".png")).string(), mask);
  }
  const std::vector<SegmentationPair> pairs = load_segmentation_folder(data.string(), 3);
  PreprocessConfig pre;
  pre.height = pre.width = 16;
  VitConfig c = segmenter_train_preset("segmenter-digits", 16);
  c.hidden_size = 24, c.num_hidden_layers = 2, c.intermediate_size = 48;
  SegmenterTrainOptions o;
  o.epochs = 3, o.batch = 4, o.seed = 5, o.warmup_steps = 1;
  o.step.lr = 3e-3f;
  const SegmenterTrainModel init = make_segmenter_train_model(c, {"background", "square", "disc"}, 3);

  SegmenterTrainModel full = init;
  SegmenterTrainState full_state;
  std::vector<double> losses;
  train_segmenter(full, full_state, pairs, pre, o, [&](const SegmenterProgress& p) { losses.push_back(p.loss); });
  REQUIRE(losses.size() == 6);
  CHECK(losses.back() < losses.front());

  // Killed after step 3, checkpointed, resumed in a fresh model.
  SegmenterTrainModel part = init;
  SegmenterTrainState part_state;
  train_segmenter(part, part_state, pairs, pre, o, {}, 3);
  const std::string ckpt = (data / "ckpt.safetensors").string();
  save_train_checkpoint(ckpt, part.vit, part_state.opt, {{"seed", "5"}});
  SegmenterTrainModel resumed = init;
  SegmenterTrainState resumed_state;
  load_train_checkpoint(ckpt, resumed.vit, resumed_state.opt);
  CHECK(resumed_state.opt.step == 3);
  train_segmenter(resumed, resumed_state, pairs, pre, o);
  CHECK(resumed.vit.weights == full.vit.weights);
  fs::remove_all(data);
}

TEST_CASE("segmentation_sample moves image and mask together", "[segmenter_train]") {
  const fs::path data = temp_dir("sample");
  fs::create_directories(data / "images"), fs::create_directories(data / "masks");
  cv::Mat img(48, 48, CV_8UC3, cv::Scalar(0, 0, 0)), mask(48, 48, CV_8U, cv::Scalar(0));
  cv::rectangle(img, cv::Rect(16, 12, 14, 20), cv::Scalar(255, 255, 255), cv::FILLED);
  cv::rectangle(mask, cv::Rect(16, 12, 14, 20), cv::Scalar(1), cv::FILLED);
  cv::imwrite((data / "images" / "a.png").string(), img);
  cv::imwrite((data / "masks" / "a.png").string(), mask);
  const SegmentationPair pair{(data / "images" / "a.png").string(), (data / "masks" / "a.png").string()};
  PreprocessConfig pre;
  pre.height = pre.width = 24;
  for (uint64_t seed : {0ull, 1ull, 2ull, 99ull}) {
    INFO("seed " << seed);
    std::vector<float> px(3 * 24 * 24);
    std::vector<int32_t> labels(24 * 24);
    segmentation_sample(pair, pre, true, seed, px.data(), labels.data(), 24, 24);
    // Where the mask says 1 the picture is bright, and where it says 0 dark (away from edges,
    // where bilinear and nearest may differ by a pixel).
    int agree = 0, total = 0;
    for (int i = 0; i < 24 * 24; ++i) {
      ++total;
      agree += (labels[i] == 1) == (px[i] > 0.0f);
    }
    CHECK(agree >= total - 24 * 4);
  }
  fs::remove_all(data);
}
