// The ViT + DETR head's training pass (vision/include/tessera/detr_train.hpp) against PyTorch
// autograd through the plain-torch port of HF ViTModel + transformers 4.36 DetrDecoder and the
// DetrLoss port (tests/reference/make_detr_train_fixtures.py), against the inference pass
// (load_model + model_forward on the same folder), and its SGD step and export.
//
// Tolerance: relative error max|got − want| / max|want| ≤ 1e-4 per tensor (fp32 against float64).
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "tessera/detr_train.hpp"
#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"

#include "rel_err.hpp"

using namespace tessera;

namespace {

using test::kTol;
using test::rel_err;
using test::values;

std::string fixtures(const std::string& rel) { return std::string(TESSERA_FIXTURES) + "/" + rel; }

struct Case {
  const char* step;   // train/<step>.safetensors
  const char* model;  // the folder it was made from
  int64_t outputs;    // supervised outputs (decoder layers with auxiliary loss, else 1)
};
const Case kCases[] = {{"detr-vit-step", "conformance/detr-vit-rand", 1},
                       {"detr-vit-aux-step", "models/detr-vit-aux-rand", 3},
                       // a DINOv2 backbone (LayerScale, mask_token), at 56x35 (the grid interpolated)
                       {"detr-dinov2-step", "models/detr-dinov2-rand", 2}};

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

TEST_CASE("DETR head training forward gives the inference forward's logits and boxes", "[detr_train]") {
  for (const Case& c : kCases) {
    INFO(c.step);
    const VitTrainModel model = load_detr_train_model(fixtures(c.model));
    CHECK(model.detr.auxiliary_loss == (c.outputs > 1));
    const auto inference = load_model(fixtures(c.model));
    const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + c.step + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    DetrTrainActivations acts;
    detr_train_forward(model, pixels, acts);
    REQUIRE(static_cast<int64_t>(acts.heads.size()) == c.outputs);
    ModelWorkspace ws;
    const NamedTensors out = model_forward(*inference, pixels, ws);
    CHECK(rel_err(acts.heads.back().logits, values(output(out, "logits"))) <= kTol);
    CHECK(rel_err(acts.heads.back().boxes, values(output(out, "pred_boxes"))) <= kTol);
    CHECK(rel_err(acts.heads.back().logits, values(st.read("logits"))) <= kTol);  // and PyTorch's
    CHECK(rel_err(acts.heads.back().boxes, values(st.read("pred_boxes"))) <= kTol);
  }
}

TEST_CASE("DETR head gradients match PyTorch autograd through the set loss", "[detr_train]") {
  for (const Case& c : kCases) {
    INFO(c.step);
    const VitTrainModel model = load_detr_train_model(fixtures(c.model));
    const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + c.step + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    const auto targets = read_targets(st, pixels.dim(0));
    DetrTrainActivations acts;
    std::vector<float> grads(model.weights.size(), 0.0f);
    SetLossResult detail;
    const double loss = detr_train_loss_and_grad(model, pixels, targets, acts, grads, &detail);
    const double want = st.read("loss")[0];
    CHECK(std::abs(loss - want) <= kTol * std::abs(want));
    const Tensor terms = st.read("terms");
    REQUIRE(static_cast<int64_t>(detail.layers.size()) == c.outputs);
    for (int64_t l = 0; l < c.outputs; ++l) {
      INFO("supervised output " << l);
      CHECK(std::abs(detail.layers[l].class_loss - terms[l * 3]) <= kTol * std::abs(terms[l * 3]));
      CHECK(std::abs(detail.layers[l].l1_loss - terms[l * 3 + 1]) <= kTol * std::abs(terms[l * 3 + 1]));
      CHECK(std::abs(detail.layers[l].giou_loss - terms[l * 3 + 2]) <= kTol * std::abs(terms[l * 3 + 2]));
    }
    int64_t compared = 0, head = 0;
    for (const TrainParam& p : model.params) {
      if (!st.contains("grad." + p.name)) continue;
      INFO(p.name);
      const auto got = model.view(std::span<const float>(grads), p.name);
      CHECK(rel_err(got, values(st.read("grad." + p.name))) <= kTol);
      ++compared;
      head += !p.name.starts_with(model.base);
    }
    CHECK(compared >= 60);
    CHECK(head == static_cast<int64_t>(3 + 26 * model.detr.layers + 2 + 2 + 6));  // every head tensor
  }
}

TEST_CASE("a DETR head SGD step with lr 1 leaves w - g", "[detr_train]") {
  const Case& c = kCases[1];
  VitTrainModel model = load_detr_train_model(fixtures(c.model));
  const std::vector<float> before = model.weights;
  const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + c.step + ".safetensors"));
  const Tensor pixels = st.read("pixel_values");
  const auto targets = read_targets(st, pixels.dim(0));
  TrainStepOptions o;
  o.optimizer = Optimizer::Sgd, o.lr = 1.0f, o.weight_decay = 0.0f, o.clip_grad = 0.0f;
  VitTrainState state;
  detr_train_step(model, state, pixels, targets, o);
  int64_t compared = 0;
  for (const TrainParam& p : model.params) {
    if (!st.contains("grad." + p.name)) continue;
    INFO(p.name);
    const Tensor g = st.read("grad." + p.name);
    std::vector<float> want(static_cast<size_t>(p.numel()));
    for (int64_t i = 0; i < p.numel(); ++i) want[i] = before[p.offset + i] - g[i];
    CHECK(rel_err(model.view(std::span<const float>(model.weights), p.name), want) <= kTol);
    ++compared;
  }
  CHECK(compared == static_cast<int64_t>(model.params.size()));
}

TEST_CASE("a new DETR head model saves as a folder that load_model runs alike", "[detr_train]") {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("tessera-detr-train-" + std::to_string(::getpid()))).string();
  DetrHeadConfig head;
  VitConfig c = detr_train_preset("detr-digits", 32, 32, &head);
  c.num_hidden_layers = 2, head.layers = 2, head.queries = 5;
  VitTrainModel model = make_detr_train_model(c, head, {"N/A", "a", "b"}, 7);
  Tensor pixels({2, 3, 32, 32});
  for (int64_t i = 0; i < pixels.numel(); ++i) pixels[i] = static_cast<float>(std::sin(0.37 * i));
  std::vector<DetectionTarget> targets(2);
  targets[0].labels = {1, 2}, targets[0].boxes = {{0.3f, 0.4f, 0.2f, 0.3f}, {0.7f, 0.6f, 0.3f, 0.2f}};
  targets[1].labels = {2}, targets[1].boxes = {{0.5f, 0.5f, 0.4f, 0.4f}};
  VitTrainState state;
  TrainStepOptions o;
  o.lr = 1e-3f;
  double first = 0, last = 0;
  for (int s = 0; s < 8; ++s) {
    const double loss = detr_train_step(model, state, pixels, targets, o).loss;
    (s == 0 ? first : last) = loss;
  }
  CHECK(last < first);
  save_vit_train_model(model, dir, detr_preprocessor_json(32, 32));
  const auto inference = load_model(dir);
  REQUIRE(inference->detection);
  DetrTrainActivations acts;
  for (int64_t size : {32, 48}) {  // the training size and another (position table interpolated)
    Tensor px({1, 3, size, size});
    for (int64_t i = 0; i < px.numel(); ++i) px[i] = static_cast<float>(std::cos(0.11 * i));
    detr_train_forward(model, px, acts);
    ModelWorkspace ws;
    const NamedTensors out = model_forward(*inference, px, ws);
    CHECK(rel_err(acts.heads.back().logits, values(output(out, "logits"))) <= kTol);
    CHECK(rel_err(acts.heads.back().boxes, values(output(out, "pred_boxes"))) <= kTol);
  }
  const VitTrainModel again = load_detr_train_model(dir);
  CHECK(again.weights == model.weights);
  std::filesystem::remove_all(dir);
}

TEST_CASE("a DETR head on a pre-trained ViT classifier keeps its encoder", "[detr_train]") {
  const VitTrainModel vit = load_vit_train_model(fixtures("conformance/vit-tiny-rand"));
  DetrHeadConfig head;
  head.d_model = 16, head.queries = 4, head.layers = 1, head.heads = 2, head.ffn = 32;
  const int64_t size = vit.config.image_height * 2;
  const VitTrainModel m = detr_from_vit(vit, head, {"N/A", "x"}, size, size, 3);
  CHECK(m.config.image_height == size);
  for (const TrainParam& p : vit.params) {
    if (!p.name.starts_with("vit.") || p.name.ends_with("position_embeddings")) continue;
    INFO(p.name);
    const auto a = vit.view(std::span<const float>(vit.weights), p.name);
    const auto b = m.view(std::span<const float>(m.weights), p.name);
    CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
  }
  CHECK_THROWS_WITH(detr_from_vit(vit, head, {"x"}, size, size + vit.config.patch_size, 3),
                    Catch::Contains("square"));
  CHECK_THROWS_WITH(load_detr_train_model(fixtures("conformance/vit-tiny-rand")), Catch::Contains("vit-detr"));

  // A DINOv2 classifier (layer scale, mask token): its whole encoder kept, the position table too
  // (DINOv2 interpolates at every size, in training and at inference); the folder written is a
  // vit-detr one with the classifier's own Dinov2Config that load_model runs alike.
  for (const char* name : {"models/dinov2-cls-rand", "models/dinov2-swiglu-cls-rand"}) {
    INFO(name);
    const VitTrainModel dino = load_vit_train_model(fixtures(name));
    const int64_t dsize = dino.config.patch_size * (dino.config.grid_height() + 2);
    VitTrainModel d = detr_from_vit(dino, head, {"N/A", "x", "y"}, dsize, dsize, 5);
    CHECK(d.base == "dinov2.");
    int64_t kept = 0;
    for (const TrainParam& p : dino.params) {
      if (!p.name.starts_with("dinov2.")) continue;
      INFO(p.name);
      const auto a = dino.view(std::span<const float>(dino.weights), p.name);
      const auto b = d.view(std::span<const float>(d.weights), p.name);
      CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
      ++kept;
    }
    CHECK(kept > 10);
    Tensor px({2, 3, dsize, dsize});
    for (int64_t i = 0; i < px.numel(); ++i) px[i] = static_cast<float>(std::sin(0.23 * i));
    std::vector<DetectionTarget> targets(2);
    targets[0].labels = {1}, targets[0].boxes = {{0.4f, 0.5f, 0.3f, 0.2f}};
    targets[1].labels = {2, 1}, targets[1].boxes = {{0.6f, 0.3f, 0.2f, 0.3f}, {0.3f, 0.7f, 0.2f, 0.2f}};
    VitTrainState state;
    TrainStepOptions o;
    o.lr = 1e-3f;
    for (int s = 0; s < 2; ++s) detr_train_step(d, state, px, targets, o);
    const std::string dir = (std::filesystem::temp_directory_path() /
                             ("tessera-detr-dinov2-" + std::to_string(::getpid()))).string();
    save_vit_train_model(d, dir, detr_preprocessor_json(dsize, dsize));
    const auto inference = load_model(dir);
    REQUIRE(inference->detection);
    DetrTrainActivations acts;
    detr_train_forward(d, px, acts);
    ModelWorkspace ws;
    const NamedTensors out = model_forward(*inference, px, ws);
    CHECK(rel_err(acts.heads.back().logits, values(output(out, "logits"))) <= kTol);
    CHECK(rel_err(acts.heads.back().boxes, values(output(out, "pred_boxes"))) <= kTol);
    CHECK(load_detr_train_model(dir).weights == d.weights);
    std::filesystem::remove_all(dir);
  }
  CHECK_THROWS_WITH(detr_train_preset("detr-huge", 64, 64, nullptr), Catch::Contains("unknown DETR preset"));
}
