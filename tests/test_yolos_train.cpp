// YOLOS's training pass (vision/include/tessera/yolos_train.hpp) against PyTorch autograd through
// the transformers 4.40 YolosForObjectDetection port and the YolosLoss port
// (tests/reference/make_yolos_train_fixtures.py), against the inference pass (load_model +
// model_forward on the same folder), and its SGD step and export.
//
// Tolerance: relative error max|got − want| / max|want| ≤ 1e-4 per tensor (fp32 against float64).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/yolos_train.hpp"

#include "rel_err.hpp"

using namespace tessera;

namespace {

using test::kTol;
using test::rel_err;
using test::values;

std::string fixtures(const std::string& rel) { return std::string(TESSERA_FIXTURES) + "/" + rel; }
const std::string kModel = "conformance/yolos-tiny-rand";

std::vector<DetectionTarget> read_targets(const SafeTensors& st, int64_t batch) {
  std::vector<DetectionTarget> targets(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) {
    const std::string n = std::to_string(i);
    if (!st.contains("target_labels." + n)) continue;
    const Tensor labels = st.read("target_labels." + n), boxes = st.read("target_boxes." + n);
    for (int64_t k = 0; k < labels.numel(); ++k) {
      targets[i].labels.push_back(static_cast<int64_t>(labels[k]));
      targets[i].boxes.push_back({boxes[k * 4], boxes[k * 4 + 1], boxes[k * 4 + 2], boxes[k * 4 + 3]});
    }
  }
  return targets;
}

}  // namespace

TEST_CASE("YOLOS training forward gives the inference forward's logits and boxes", "[yolos_train]") {
  for (const char* fixture : {"yolos-tiny-step", "yolos-tiny-64x64-step"}) {
    INFO(fixture);
    const VitTrainModel model = load_yolos_train_model(fixtures(kModel));
    const auto inference = load_model(fixtures(kModel));
    const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + fixture + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    VitTrainActivations acts;
    yolos_train_forward(model, pixels, acts);
    ModelWorkspace ws;
    const NamedTensors out = model_forward(*inference, pixels, ws);
    CHECK(rel_err(acts.logits, values(output(out, "logits"))) <= kTol);
    CHECK(rel_err(acts.boxes, values(output(out, "pred_boxes"))) <= kTol);
    CHECK(rel_err(acts.logits, values(st.read("logits"))) <= kTol);  // and PyTorch's
    CHECK(rel_err(acts.boxes, values(st.read("pred_boxes"))) <= kTol);
  }
}

TEST_CASE("YOLOS gradients match PyTorch autograd through the set loss", "[yolos_train]") {
  for (const char* fixture : {"yolos-tiny-step", "yolos-tiny-64x64-step"}) {
    INFO(fixture);
    const VitTrainModel model = load_yolos_train_model(fixtures(kModel));
    const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + fixture + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    const auto targets = read_targets(st, pixels.dim(0));
    VitTrainActivations acts;
    std::vector<float> grads(model.weights.size(), 0.0f);
    SetLossResult detail;
    const double loss = yolos_train_loss_and_grad(model, pixels, targets, acts, grads, &detail);
    const double want = st.read("loss")[0];
    CHECK(std::abs(loss - want) <= kTol * std::abs(want));
    const Tensor terms = st.read("terms");
    CHECK(std::abs(detail.layers.at(0).class_loss - terms[0]) <= kTol * std::abs(terms[0]));
    CHECK(std::abs(detail.layers.at(0).l1_loss - terms[1]) <= kTol * std::abs(terms[1]));
    CHECK(std::abs(detail.layers.at(0).giou_loss - terms[2]) <= kTol * std::abs(terms[2]));
    int64_t compared = 0;
    for (const TrainParam& p : model.params) {
      if (!st.contains("grad." + p.name)) continue;
      INFO(p.name);
      const auto got = model.view(std::span<const float>(grads), p.name);
      CHECK(rel_err(got, values(st.read("grad." + p.name))) <= kTol);
      ++compared;
    }
    CHECK(compared >= 30);
  }
}

TEST_CASE("YOLOS with mid position embeddings trains: outputs and gradients match", "[yolos_train]") {
  // models/yolos-mid-rand (use_mid_position_embeddings, 3 layers: 2 mid tables) at 64x48, its 3x5
  // grid and both mid tables resampled to 4x3 (make_yolos_train_fixtures.py MID_CASES).
  const std::string folder = fixtures("models/yolos-mid-rand");
  const VitTrainModel model = load_yolos_train_model(folder);
  CHECK(model.config.mid_position_embeddings);
  const SafeTensors st = SafeTensors::open(fixtures("train/yolos-mid-64x48-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  const auto targets = read_targets(st, pixels.dim(0));
  VitTrainActivations acts;
  std::vector<float> grads(model.weights.size(), 0.0f);
  const double loss = yolos_train_loss_and_grad(model, pixels, targets, acts, grads);
  CHECK(std::abs(loss - st.read("loss")[0]) <= kTol * std::abs(st.read("loss")[0]));
  CHECK(rel_err(acts.logits, values(st.read("logits"))) <= kTol);
  const auto inference = load_model(folder);
  ModelWorkspace ws;
  CHECK(rel_err(acts.boxes, values(output(model_forward(*inference, pixels, ws), "pred_boxes"))) <= kTol);
  int64_t compared = 0;
  for (const TrainParam& p : model.params) {
    if (!st.contains("grad." + p.name)) continue;
    INFO(p.name);
    CHECK(rel_err(model.view(std::span<const float>(grads), p.name), values(st.read("grad." + p.name))) <= kTol);
    ++compared;
  }
  CHECK(st.contains("grad.vit.encoder.mid_position_embeddings"));
  CHECK(compared >= 30);
}

TEST_CASE("a YOLOS SGD step with lr 1 leaves w - g", "[yolos_train]") {
  VitTrainModel model = load_yolos_train_model(fixtures(kModel));
  const std::vector<float> before = model.weights;
  const SafeTensors st = SafeTensors::open(fixtures("train/yolos-tiny-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  const auto targets = read_targets(st, pixels.dim(0));
  TrainStepOptions o;
  o.optimizer = Optimizer::Sgd, o.lr = 1.0f, o.weight_decay = 0.0f, o.clip_grad = 0.0f;
  VitTrainState state;
  yolos_train_step(model, state, pixels, targets, o);
  for (const TrainParam& p : model.params) {
    if (!st.contains("grad." + p.name)) continue;
    INFO(p.name);
    const Tensor g = st.read("grad." + p.name);
    std::vector<float> want(static_cast<size_t>(p.numel()));
    for (int64_t i = 0; i < p.numel(); ++i) want[i] = before[p.offset + i] - g[i];
    CHECK(rel_err(model.view(std::span<const float>(model.weights), p.name), want) <= kTol);
  }
}

TEST_CASE("a new YOLOS model saves as a folder that load_model runs alike", "[yolos_train]") {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("tessera-yolos-train-" + std::to_string(::getpid()))).string();
  VitConfig c = yolos_train_preset("yolos-digits", 32, 48);
  c.num_hidden_layers = 2;
  VitTrainModel model = make_yolos_train_model(c, {"N/A", "a", "b"}, 7);
  // A few AdamW steps so that the heads are not at their initial values.
  Tensor pixels({2, 3, 32, 48});
  for (int64_t i = 0; i < pixels.numel(); ++i) pixels[i] = static_cast<float>(std::sin(0.37 * i));
  std::vector<DetectionTarget> targets(2);
  targets[0].labels = {1, 2}, targets[0].boxes = {{0.3f, 0.4f, 0.2f, 0.3f}, {0.7f, 0.6f, 0.3f, 0.2f}};
  targets[1].labels = {2}, targets[1].boxes = {{0.5f, 0.5f, 0.4f, 0.4f}};
  VitTrainState state;
  TrainStepOptions o;
  o.lr = 1e-3f;
  double first = 0, last = 0;
  for (int s = 0; s < 8; ++s) {
    const double loss = yolos_train_step(model, state, pixels, targets, o).loss;
    (s == 0 ? first : last) = loss;
  }
  CHECK(last < first);
  save_vit_train_model(model, dir, yolos_preprocessor_json(32, 48));
  const auto inference = load_model(dir);
  REQUIRE(inference->detection);
  VitTrainActivations acts;
  for (const auto& size : {std::pair<int64_t, int64_t>{32, 48}, {40, 40}}) {  // the training size and another
    Tensor px({1, 3, size.first, size.second});
    for (int64_t i = 0; i < px.numel(); ++i) px[i] = static_cast<float>(std::cos(0.11 * i));
    yolos_train_forward(model, px, acts);
    ModelWorkspace ws;
    const NamedTensors out = model_forward(*inference, px, ws);
    CHECK(rel_err(acts.logits, values(output(out, "logits"))) <= kTol);
    CHECK(rel_err(acts.boxes, values(output(out, "pred_boxes"))) <= kTol);
  }
  // And it reads back for training, unchanged.
  const VitTrainModel again = load_yolos_train_model(dir);
  CHECK(again.weights == model.weights);
  std::filesystem::remove_all(dir);
}

TEST_CASE("YOLOS training refuses what it does not support", "[yolos_train]") {
  CHECK_THROWS_WITH(yolos_train_preset("yolos-huge", 64, 64), Catch::Contains("unknown detection preset"));
  CHECK_THROWS_WITH(yolos_train_preset("yolos-digits", 60, 64), Catch::Contains("multiple of the patch size"));
  CHECK_THROWS_WITH(load_yolos_train_model(fixtures("conformance/vit-tiny-rand")), Catch::Contains("YolosForObjectDetection"));
}
