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

#include "tessera/detection.hpp"
#include "tessera/detr_train.hpp"
#include "tessera/error.hpp"
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
  bool frozen = false;  // the encoder trains frozen (a windowed one): its gradients are not compared
};
const Case kCases[] = {{"detr-vit-step", "conformance/detr-vit-rand", 1},
                       {"detr-vit-aux-step", "models/detr-vit-aux-rand", 3},
                       // a DINOv2 backbone (LayerScale, mask_token), at 56x35 (the grid interpolated)
                       {"detr-dinov2-step", "models/detr-dinov2-rand", 2},
                       // Tessera's windowed encoder: 32x32 windows every 16 pixels of a 64x48 input,
                       // merged; the memory's values with the sine code
                       {"detr-window-step", "models/detr-window-rand", 2, true}};

VitTrainModel load_case(const Case& c) {
  VitTrainModel model = load_detr_train_model(fixtures(c.model));
  model.frozen_encoder = c.frozen;
  return model;
}

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
    const VitTrainModel model = load_case(c);
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
    const VitTrainModel model = load_case(c);
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
      if (!st.contains("grad." + p.name) || model.is_frozen(p)) continue;
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

TEST_CASE("windows cut from an image and merged back give the image's own patch grid", "[detr_train]") {
  CHECK(window_anchors(64, 32, 16) == std::vector<int64_t>{0, 16, 32});
  CHECK(window_anchors(56, 32, 16) == std::vector<int64_t>{0, 16, 24});  // the last flush with the end
  CHECK(window_anchors(32, 32, 8) == std::vector<int64_t>{0});
  CHECK_THROWS_AS(window_anchors(24, 32, 16), Error);
  // rows of each window = its patches' pixel means (one row per patch, two channels' worth);
  // merged, every grid cell must hold its own patch's means whatever windows covered it.
  // H: windows at 0, 16, 32 and one flush with the edge at 40; W: at 0 and 16.
  const int64_t B = 2, C = 2, H = 64, W = 40, win = 24, stride = 16, p = 8, g = win / p;
  Tensor px({B, C, H, W});
  for (int64_t i = 0; i < px.numel(); ++i) px[i] = static_cast<float>(std::sin(0.731 * i) + 0.01 * i);
  const Tensor windows = cut_windows(px, win, stride);
  const int64_t n = static_cast<int64_t>(window_anchors(H, win, stride).size() * window_anchors(W, win, stride).size());
  REQUIRE(n == 4 * 2);
  REQUIRE(windows.dim(0) == B * n);
  auto patch_mean = [&](const float* img, int64_t h, int64_t w, int64_t c, int64_t py, int64_t px_) {
    double s = 0;
    for (int64_t y = 0; y < p; ++y)
      for (int64_t x = 0; x < p; ++x) s += img[(c * h + py * p + y) * w + px_ * p + x];
    return static_cast<float>(s / (p * p));
  };
  const int64_t first = 1, tokens = first + g * g;  // a class token before the patches
  std::vector<float> rows(static_cast<size_t>(B * n * tokens * C), -99.0f);
  for (int64_t i = 0; i < B * n; ++i)
    for (int64_t t = 0; t < g * g; ++t)
      for (int64_t c = 0; c < C; ++c)
        rows[((i * tokens + first + t) * C) + c] =
            patch_mean(windows.data() + i * C * win * win, win, win, c, t / g, t % g);
  std::vector<float> merged(static_cast<size_t>(B * (H / p) * (W / p) * C));
  merge_windows(rows.data(), B, H, W, win, stride, p, tokens, first, C, merged.data());
  double worst = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H / p; ++y)
      for (int64_t x = 0; x < W / p; ++x)
        for (int64_t c = 0; c < C; ++c)
          worst = std::max(worst, static_cast<double>(std::abs(
                                      merged[((b * (H / p) + y) * (W / p) + x) * C + c] -
                                      patch_mean(px.data() + b * C * H * W, H, W, c, y, x))));
  CHECK(worst <= 1e-5);
}

TEST_CASE("merge_windows centre: each window's rows weighted by how central their patch lies", "[detr_train]") {
  // Every row of window w holds the value w (its index), so a merged cell is the weighted mean of
  // the indices of the windows over it: computed here straight from the window origins, a weight
  // (min(i, g-1-i) + 1) along each axis per patch position i of the g in a window.
  const int64_t B = 2, H = 64, W = 40, win = 24, stride = 16, p = 4, g = win / p, d = 3, first = 1;
  const std::vector<int64_t> ys = window_anchors(H, win, stride), xs = window_anchors(W, win, stride);
  const int64_t n = static_cast<int64_t>(ys.size() * xs.size()), tokens = first + g * g;
  std::vector<float> rows(static_cast<size_t>(B * n * tokens * d));
  for (int64_t i = 0; i < B * n; ++i)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t k = 0; k < d; ++k) rows[static_cast<size_t>((i * tokens + t) * d + k)] = static_cast<float>(i % n + 10 * k);
  std::vector<float> mean(static_cast<size_t>(B * (H / p) * (W / p) * d)), centre(mean.size());
  merge_windows(rows.data(), B, H, W, win, stride, p, tokens, first, d, mean.data());
  merge_windows(rows.data(), B, H, W, win, stride, p, tokens, first, d, centre.data(), true);
  double worst_mean = 0, worst_centre = 0;
  int differ = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H / p; ++y)
      for (int64_t x = 0; x < W / p; ++x) {
        double sw = 0, swv = 0, count = 0, sum = 0;
        for (size_t wy = 0; wy < ys.size(); ++wy)
          for (size_t wx = 0; wx < xs.size(); ++wx) {
            const int64_t iy = y - ys[wy] / p, ix = x - xs[wx] / p;
            if (iy < 0 || iy >= g || ix < 0 || ix >= g) continue;
            const double wgt = static_cast<double>((std::min(iy, g - 1 - iy) + 1) * (std::min(ix, g - 1 - ix) + 1));
            const double v = static_cast<double>(wy * xs.size() + wx);
            sw += wgt, swv += wgt * v, count += 1, sum += v;
          }
        REQUIRE(count > 0);
        for (int64_t k = 0; k < d; ++k) {
          const size_t at = static_cast<size_t>(((b * (H / p) + y) * (W / p) + x) * d + k);
          worst_mean = std::max(worst_mean, std::abs(mean[at] - (sum / count + 10 * k)));
          worst_centre = std::max(worst_centre, std::abs(centre[at] - (swv / sw + 10 * k)));
          differ += std::abs(centre[at] - mean[at]) > 1e-3;
        }
      }
  CHECK(worst_mean <= 1e-5);
  CHECK(worst_centre <= 1e-5);
  CHECK(differ > 100);  // the weighting matters where windows overlap
}

TEST_CASE("a windowed DETR encoder trains frozen only", "[detr_train]") {
  const Case& c = kCases[3];
  VitTrainModel model = load_detr_train_model(fixtures(c.model));
  REQUIRE(model.detr.window == 32);
  REQUIRE(model.detr.window_stride == 16);
  const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + c.step + ".safetensors"));
  DetrTrainActivations acts;
  CHECK_THROWS_WITH(detr_train_forward(model, st.read("pixel_values"), acts), Catch::Contains("frozen"));
  model.frozen_encoder = true;
  Tensor small({1, 3, 24, 40});  // under the window
  CHECK_THROWS_WITH(detr_train_forward(model, small, acts), Catch::Contains("at least 32"));
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
