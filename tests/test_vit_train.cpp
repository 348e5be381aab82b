// The ViT classifier's training pass (vision/include/tessera/vit_train.hpp) against the inference
// pass (model_forward on the same folder) and against PyTorch autograd through the transformers
// ViTForImageClassification port (tests/reference/make_train_fixtures.py).
//
// Tolerance: relative error max|got − want| / max|want| ≤ 1e-4 per tensor (fp32 against float64).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <unistd.h>
#include <string>
#include <vector>

#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/optim.hpp"
#include "tessera/parallel.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/vit_train.hpp"

#include "cli_util.hpp"
#include "rel_err.hpp"

using namespace tessera;

namespace {

using test::kTol;
using test::rel_err;
using test::values;


struct Case {
  std::string model_dir, fixture;
};
const Case kCases[] = {
    {"models/vit-p4-h48-noqkvbias-rand", "vit-p4-h48-noqkvbias-step"},
    {"conformance/vit-tiny-rand", "vit-tiny-step"},
    // 48x40, not the 32x32 training size: the position table is resampled (HF
    // interpolate_pos_encoding, as model_forward does), and its gradient goes back through that.
    {"conformance/vit-tiny-rand", "vit-tiny-48x40-step"},
    // DeiTForImageClassification: a distillation token in the sequence, the head on the class token.
    {"models/deit-nodistill-rand", "deit-nodistill-step"},
    // Dinov2ForImageClassification: layer scale, the head on [class token, mean of the patches].
    {"models/dinov2-cls-rand", "dinov2-cls-step"},
    // ... with SwiGLU MLPs (use_swiglu_ffn), at 42x28 (the position grid interpolated).
    {"models/dinov2-swiglu-cls-rand", "dinov2-swiglu-cls-step"},
};

std::string fixtures(const std::string& rel) { return std::string(TESSERA_FIXTURES) + "/" + rel; }

// A new model small enough to train in a test: 12x12 at patch 4, width 32, 2 layers.
VitConfig tiny_config() {
  VitConfig c;
  c.image_height = c.image_width = 12;
  c.patch_size = 4, c.hidden_size = 32, c.num_hidden_layers = 2, c.num_attention_heads = 2;
  c.intermediate_size = 64, c.layer_norm_eps = 1e-6f;
  return c;
}

}  // namespace

TEST_CASE("training forward gives the inference forward's logits", "[vit_train]") {
  for (const Case& c : kCases) {
    INFO(c.model_dir);
    const VitTrainModel model = load_vit_train_model(fixtures(c.model_dir));
    const auto inference = load_model(fixtures(c.model_dir));
    const SafeTensors st = SafeTensors::open(fixtures("train/" + c.fixture + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    VitTrainActivations acts;
    const std::span<const float> logits = vit_train_forward(model, pixels, acts);
    ModelWorkspace ws;
    const NamedTensors out = model_forward(*inference, pixels, ws);
    const std::vector<float> got(logits.begin(), logits.end());
    CHECK(rel_err(got, values(output(out, "logits"))) <= kTol);
    CHECK(rel_err(got, values(st.read("logits"))) <= kTol);  // and PyTorch's
  }
}

TEST_CASE("one SGD step (lr 1) leaves w − g, g from PyTorch autograd", "[vit_train]") {
  // Through the dispatched GEMM kernels and through the portable ones.
  const bool generic = GENERATE(false, true);
  force_generic_kernels(generic);
  for (const Case& c : kCases) {
    INFO(c.model_dir << (generic ? " (generic kernels)" : " (dispatched kernels)"));
    const VitTrainModel model = load_vit_train_model(fixtures(c.model_dir));
    const SafeTensors st = SafeTensors::open(fixtures("train/" + c.fixture + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    std::vector<int64_t> labels;
    for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
    std::vector<float> grads(model.weights.size(), 0.0f);
    VitTrainActivations acts;
    const double loss = vit_train_loss_and_grad(model, pixels, labels, 0.0f, acts, grads);
    const double want_loss = st.read("loss")[0];
    CHECK(std::abs(loss - want_loss) <= kTol * std::abs(want_loss));

    double max_grad = 0;  // over the whole model
    for (float v : grads) max_grad = std::max(max_grad, static_cast<double>(std::abs(v)));
    std::vector<float> stepped = model.weights;
    sgd_step(stepped, grads, {}, 1.0f);
    int64_t compared = 0;
    for (const TrainParam& p : model.params) {
      if (!st.contains("grad." + p.name)) continue;
      INFO(p.name);
      const std::vector<float> g = values(st.read("grad." + p.name));
      const auto w = model.view(std::span<const float>(model.weights), p.name);
      const auto after = model.view(std::span<const float>(stepped), p.name);
      std::vector<float> got_g(g.size());
      std::vector<double> want_after(g.size());
      for (size_t i = 0; i < g.size(); ++i) {
        got_g[i] = w[i] - after[i];
        want_after[i] = static_cast<double>(w[i]) - g[i];
      }
      CHECK(rel_err(after, want_after) <= kTol);
      // The step itself, not only the weights it moved. The key bias's gradient is 0 in exact
      // arithmetic (q·(k + b) shifts every score of a query by the same q·b, which softmax
      // ignores): PyTorch's is ~1e-17 there, ours fp32 round-off, so that tensor is held to
      // 1e-4 of the largest gradient of the model instead of its own.
      double largest = 0;
      for (float v : g) largest = std::max(largest, static_cast<double>(std::abs(v)));
      if (p.name.find("key.bias") != std::string::npos) {
        REQUIRE(largest < 1e-12);
        double got_largest = 0;
        for (float v : got_g) got_largest = std::max(got_largest, static_cast<double>(std::abs(v)));
        CHECK(got_largest <= kTol * max_grad);
      } else {
        CHECK(rel_err(got_g, g) <= kTol);
      }
      ++compared;
    }
    // Every tensor of the checkpoint is trained (the small model's fixture has them all).
    if (c.fixture == "vit-p4-h48-noqkvbias-step") CHECK(compared == static_cast<int64_t>(model.params.size()));
    CHECK(compared > 0);
  }
  force_generic_kernels(false);
}

TEST_CASE("training gradients are bit-identical for 1 and 2 threads", "[vit_train][threads]") {
  const VitTrainModel model = load_vit_train_model(fixtures("conformance/vit-tiny-rand"));
  const SafeTensors st = SafeTensors::open(fixtures("train/vit-tiny-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  const std::vector<int64_t> labels = {3, 7};
  auto run = [&](int threads) {
    set_num_threads(threads);
    std::vector<float> grads(model.weights.size(), 0.0f);
    VitTrainActivations acts;
    const double loss = vit_train_loss_and_grad(model, pixels, labels, 0.1f, acts, grads);
    grads.push_back(static_cast<float>(loss));
    return grads;
  };
  const std::vector<float> one = run(1), two = run(2);
  set_num_threads(0);
  CHECK(one == two);
}

TEST_CASE("a base model (ViTModel, Dinov2Model) gets a head and trains as its classifier", "[vit_train]") {
  for (const char* from : {"conformance/dinov2-small-rand", "models/dinov2-swiglu-rand", "models/vitmodel-pooler-rand"}) {
    INFO(from);
    VitTrainModel model = load_vit_train_model(fixtures(from));
    CHECK(model.num_labels == 0);
    CHECK(model.architecture.ends_with("ForImageClassification"));
    replace_classifier(model, {"left", "right", "up"});
    CHECK(model.num_labels == 3);
    const int64_t size = model.config.image_height;
    Tensor pixels({2, 3, size, size});
    for (int64_t i = 0; i < pixels.numel(); ++i) pixels[i] = std::sin(0.19f * static_cast<float>(i));
    std::vector<float> grads(model.weights.size(), 0.0f);
    VitTrainActivations acts;
    vit_train_loss_and_grad(model, pixels, {0, 2}, 0.0f, acts, grads);
    sgd_step(model.weights, grads, {}, 0.5f);  // the zero head moves; the encoder then gets gradients
    const std::span<const float> logits = vit_train_forward(model, pixels, acts);
    const std::vector<float> want(logits.begin(), logits.end());
    const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                      ("tessera-base-model-" + std::to_string(::getpid()));
    save_vit_train_model(model, dir.string());
    const auto loaded = load_model(dir.string());
    CHECK(loaded->architecture == model.architecture);
    CHECK(loaded->labels == std::vector<std::string>{"left", "right", "up"});
    ModelWorkspace ws;
    CHECK(rel_err(values(output(model_forward(*loaded, pixels, ws), "logits")), want) <= kTol);
    std::filesystem::remove_all(dir);
  }
}

TEST_CASE("training refuses what it cannot train yet, naming it", "[vit_train]") {
  // A DeiT with a distillation head trains on the distillation loss, and says so.
  {
    const VitTrainModel deit = load_vit_train_model(fixtures("conformance/deit-tiny-distilled-rand"));
    std::vector<float> grads(deit.weights.size());
    VitTrainActivations acts;
    try {
      vit_train_loss_and_grad(deit, Tensor({1, 3, 32, 32}), {0}, 0.0f, acts, grads);
      FAIL("expected an error");
    } catch (const std::exception& e) {
      CHECK(std::string(e.what()).find("vit_train_distillation_loss_and_grad") != std::string::npos);
    }
  }
  const VitTrainModel model = load_vit_train_model(fixtures("conformance/vit-tiny-rand"));
  VitTrainActivations acts;
  CHECK_THROWS_WITH(vit_train_forward(model, Tensor({1, 3, 4, 40}), acts),
                    Catch::Contains("at least one 8-pixel patch"));
  CHECK_THROWS_WITH(vit_train_forward(model, Tensor({1, 1, 32, 32}), acts),
                    Catch::Contains("[batch, 3, height, width]"));
}

TEST_CASE("a trained model is written as the folder it was read from", "[vit_train]") {
  for (const char* from : {"conformance/vit-tiny-rand", "models/dinov2-cls-rand", "models/dinov2-swiglu-cls-rand"}) {
    INFO(from);
    VitTrainModel model = load_vit_train_model(fixtures(from));
    const SafeTensors st = SafeTensors::open(fixtures("train/vit-tiny-step.safetensors"));
    const Tensor pixels = st.read("pixel_values");  // 2 images of 32x32, both models' size
    // One SGD step, so the folder holds weights no fixture has.
    std::vector<float> grads(model.weights.size(), 0.0f);
    VitTrainActivations acts;
    vit_train_loss_and_grad(model, pixels, {1, 2}, 0.0f, acts, grads);
    sgd_step(model.weights, grads, {}, 0.5f);
    const std::span<const float> logits = vit_train_forward(model, pixels, acts);
    const std::vector<float> want(logits.begin(), logits.end());

    const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                      ("tessera-vit-train-" + std::to_string(::getpid()));
    save_vit_train_model(model, dir.string());
    const auto loaded = load_model(dir.string());
    ModelWorkspace ws;
    const Tensor got = output(model_forward(*loaded, pixels, ws), "logits");
    CHECK(rel_err(values(got), want) <= kTol);
    CHECK(loaded->labels.at(0) == "airplane");  // config.json (id2label) went with it
    const VitTrainModel again = load_vit_train_model(dir.string());
    CHECK(again.weights == model.weights);  // bit for bit
    std::filesystem::remove_all(dir);
  }
}

TEST_CASE("20 AdamW steps follow PyTorch's loss curve", "[vit_train][optim]") {
  // torch.optim.AdamW(lr 1e-3, weight decay 0.05 on matrices only) on one batch, float64
  // (make_train_fixtures.py adamw_curve). Each step's loss within 1e-4 relative.
  VitTrainModel model = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  const SafeTensors st = SafeTensors::open(fixtures("train/vit-p4-h48-noqkvbias-adamw.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  std::vector<int64_t> labels;
  for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
  const std::vector<float> want = values(st.read("losses"));
  AdamWOptions options;
  options.lr = 1e-3f;
  options.weight_decay = 0.05f;
  std::vector<float> grads(model.weights.size()), m(grads.size(), 0.0f), v(grads.size(), 0.0f);
  VitTrainActivations acts;
  for (size_t s = 0; s < want.size(); ++s) {
    std::fill(grads.begin(), grads.end(), 0.0f);
    const double loss = vit_train_loss_and_grad(model, pixels, labels, 0.0f, acts, grads);
    INFO("step " << s + 1 << ": loss " << loss << ", PyTorch " << want[s]);
    CHECK(std::abs(loss - want[s]) <= kTol * std::abs(want[s]));
    vit_train_adamw_step(model, grads, m, v, static_cast<int64_t>(s) + 1, options);
  }
}

TEST_CASE("a new model trains: loss falls, runs repeat bit for bit for 1 and 2 threads", "[vit_train]") {
  const VitConfig c = tiny_config();
  // A task with an answer: class = which half of the image holds a bright blob.
  const int64_t B = 8;
  Tensor pixels({B, 3, 12, 12});
  std::vector<int64_t> labels(B);
  for (int64_t b = 0; b < B; ++b) {
    labels[b] = b % 2;
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t y = 0; y < 12; ++y)
        for (int64_t x = 0; x < 12; ++x) {
          const bool blob = (labels[b] ? x >= 6 : x < 6) && std::abs(y - 2 - b % 7) <= 1;
          pixels[((b * 3 + ch) * 12 + y) * 12 + x] = blob ? 1.0f : -1.0f;
        }
  }
  auto run = [&](int threads) {
    set_num_threads(threads);
    VitTrainModel model = make_vit_train_model(c, {"left", "right"}, 7);
    VitTrainState state;
    TrainStepOptions options;  // AdamW, decay on matrices, clipping, a warm-up + cosine schedule
    options.weight_decay = 0.05f;
    options.clip_grad = 1.0f;
    std::vector<double> losses;
    for (int64_t s = 0; s < 30; ++s) {
      options.lr = static_cast<float>(warmup_cosine_lr(s, 30, 3, 3e-3));
      losses.push_back(vit_train_step(model, state, pixels, labels, options).loss);
    }
    set_num_threads(0);
    return std::make_pair(losses, model.weights);
  };
  const auto [losses1, weights1] = run(1);
  const auto [losses2, weights2] = run(2);
  INFO("loss " << losses1.front() << " -> " << losses1.back());
  CHECK(losses1.front() == Approx(std::log(2.0)).epsilon(1e-6));  // zero classifier: uniform
  CHECK(losses1.back() < 0.1 * losses1.front());
  CHECK(losses1 == losses2);
  CHECK(weights1 == weights2);
}

TEST_CASE("a step in sub-batches is the whole batch's step, the same bits for 1 and 2 threads", "[vit_train][threads]") {
  const VitConfig c = tiny_config();
  const int64_t B = 8;
  Tensor pixels({B, 3, 12, 12});
  for (int64_t i = 0; i < pixels.numel(); ++i) pixels[i] = std::sin(0.37f * static_cast<float>(i));
  const std::vector<int64_t> labels = {0, 2, 1, 1, 0, 2, 2, 1};
  auto step = [&](int64_t sub, int threads) {
    set_num_threads(threads);
    VitTrainModel model = make_vit_train_model(c, {"a", "b", "c"}, 11);
    std::fill(model.view(std::span<float>(model.weights), "classifier.weight").begin(),
              model.view(std::span<float>(model.weights), "classifier.weight").end(), 0.01f);
    VitTrainState state;
    TrainStepOptions o;
    o.optimizer = Optimizer::Sgd;
    o.lr = 1.0f;
    o.sub_batches = sub;
    o.label_smoothing = 0.1f;
    const TrainStepResult r = vit_train_step(model, state, pixels, labels, o);
    set_num_threads(0);
    return std::make_tuple(r, state.grads, model.weights);
  };
  const auto [r1, g1, w1] = step(1, 2);
  for (const int64_t sub : {2, 4}) {
    INFO(sub << " sub-batches");
    const auto [r, g, w] = step(sub, 2);
    // The same mean loss and gradient, up to float summation order.
    CHECK(r.loss == Approx(r1.loss).epsilon(1e-6));
    CHECK(r.correct == r1.correct);
    CHECK(r.grad_norm == Approx(r1.grad_norm).epsilon(1e-5));
    CHECK(rel_err(g, std::vector<double>(g1.begin(), g1.end())) <= 1e-5);
    // Thread-count independent, bit for bit.
    const auto [ra, ga, wa] = step(sub, 1);
    CHECK(ra.loss == r.loss);
    CHECK(ga == g);
    CHECK(wa == w);
  }
  CHECK_THROWS_WITH(step(3, 1), Catch::Contains("does not split into 3 equal sub-batches"));
}

TEST_CASE("small classification steps split into two halves of at least 16 images", "[vit_train]") {
  VitConfig digits = vit_train_preset("vit-digits", 20);
  digits.hidden_size = 96;
  const VitTrainModel m = make_vit_train_model(digits, std::vector<std::string>(10, "x"), 1);
  CHECK(vit_train_sub_batches(m, 64, 20, 20) == 2);  // 64 x 26 tokens x 96 = 160k floats
  CHECK(vit_train_sub_batches(m, 32, 20, 20) == 2);
  CHECK(vit_train_sub_batches(m, 30, 20, 20) == 1);  // halves of 15
  CHECK(vit_train_sub_batches(m, 63, 20, 20) == 1);
  CHECK(vit_train_sub_batches(m, 256, 20, 20) == 1);  // 256 x 26 x 96 = 639k floats
  const VitTrainModel s = make_vit_train_model(vit_train_preset("vit-s16", 224), std::vector<std::string>(10, "x"), 1);
  CHECK(vit_train_sub_batches(s, 16, 224, 224) == 1);  // 16 x 197 x 384 = 1.2M floats: big GEMMs
  CHECK(vit_train_sub_batches(s, 64, 32, 32) == 2);    // 64 x 5 x 384 = 123k
}

TEST_CASE("vit_train_step: SGD at lr 1 without clipping leaves exactly w − g", "[vit_train]") {
  VitTrainModel model = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  const std::vector<float> before = model.weights;
  const SafeTensors st = SafeTensors::open(fixtures("train/vit-p4-h48-noqkvbias-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  std::vector<int64_t> labels;
  for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
  VitTrainState state;
  TrainStepOptions o;
  o.optimizer = Optimizer::Sgd;
  o.lr = 1.0f;
  const TrainStepResult r = vit_train_step(model, state, pixels, labels, o);
  CHECK(std::abs(r.loss - st.read("loss")[0]) <= kTol * r.loss);
  // Bit for bit the gradient the step saw, and (per tensor, 1e-4) PyTorch's.
  std::vector<float> exact(before.size());
  for (size_t i = 0; i < before.size(); ++i) exact[i] = before[i] - state.grads[i];
  CHECK(model.weights == exact);
  for (const TrainParam& p : model.params) {
    INFO(p.name);
    const auto w = model.view(std::span<const float>(before), p.name);
    const auto after = model.view(std::span<const float>(model.weights), p.name);
    const std::vector<float> g = values(st.read("grad." + p.name));
    std::vector<double> want(g.size());
    for (size_t i = 0; i < g.size(); ++i) want[i] = static_cast<double>(w[i]) - g[i];
    CHECK(rel_err(after, want) <= kTol);
  }
  CHECK(state.step == 1);
  CHECK(r.grad_norm > 0);
  // Clipping to half the norm halves the step.
  VitTrainModel again = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  VitTrainState state2;
  o.clip_grad = static_cast<float>(r.grad_norm / 2);
  vit_train_step(again, state2, pixels, labels, o);
  std::vector<double> got(before.size()), half(before.size());
  for (size_t i = 0; i < before.size(); ++i) {
    got[i] = static_cast<double>(before[i]) - again.weights[i];
    half[i] = (static_cast<double>(before[i]) - model.weights[i]) / 2;
  }
  CHECK(rel_err(got, half) <= kTol);
}

TEST_CASE("a run resumed from a training checkpoint ends bit-identical", "[vit_train]") {
  const SafeTensors st = SafeTensors::open(fixtures("train/vit-p4-h48-noqkvbias-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  const std::vector<int64_t> labels = {0, 1, 3};
  TrainStepOptions o;
  o.weight_decay = 0.05f;
  o.clip_grad = 0.5f;
  auto steps = [&](VitTrainModel& m, VitTrainState& s, int n) {
    for (int i = 0; i < n; ++i) {
      o.lr = static_cast<float>(warmup_cosine_lr(s.step, 6, 2, 1e-3));
      vit_train_step(m, s, pixels, labels, o);
    }
  };
  VitTrainModel straight = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  VitTrainState straight_state;
  steps(straight, straight_state, 6);

  VitTrainModel first = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  VitTrainState first_state;
  steps(first, first_state, 3);
  const std::string path = (std::filesystem::temp_directory_path() /
                             ("tessera-ckpt-" + std::to_string(::getpid()) + ".safetensors")).string();
  save_train_checkpoint(path, first, first_state, {{"data_position", "9"}});
  // A fresh process would start from the folder again, then restore.
  VitTrainModel resumed = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  VitTrainState resumed_state;
  const auto meta = load_train_checkpoint(path, resumed, resumed_state);
  CHECK(meta.at("data_position") == "9");
  CHECK(resumed_state.step == 3);
  steps(resumed, resumed_state, 3);
  CHECK(resumed.weights == straight.weights);
  CHECK(resumed_state.m == straight_state.m);
  CHECK(resumed_state.v == straight_state.v);
  CHECK(resumed.weights != first.weights);  // it did train on

  // Another model's checkpoint is refused, naming the tensor.
  VitTrainModel other = load_vit_train_model(fixtures("conformance/vit-tiny-rand"));
  VitTrainState other_state;
  CHECK_THROWS_WITH(load_train_checkpoint(path, other, other_state),
                    Catch::Contains("weight.vit.embeddings.cls_token"));
  std::filesystem::remove(path);
}

TEST_CASE("layer-wise lr decay scales each layer's step by decay^(L + 1 − layer)", "[vit_train]") {
  // SGD at lr 1, decay 0.5, two blocks: the embeddings move by g/8, block 0 by g/4, block 1 by
  // g/2, the final norm and classifier by g. Powers of two, so the steps are exact.
  VitTrainModel model = load_vit_train_model(fixtures("models/vit-p4-h48-noqkvbias-rand"));
  REQUIRE(model.config.num_hidden_layers == 2);
  const std::vector<float> before = model.weights;
  const SafeTensors st = SafeTensors::open(fixtures("train/vit-p4-h48-noqkvbias-step.safetensors"));
  VitTrainState state;
  TrainStepOptions o;
  o.optimizer = Optimizer::Sgd;
  o.lr = 1.0f;
  o.layer_decay = 0.5;
  vit_train_step(model, state, st.read("pixel_values"), {0, 1, 2}, o);
  for (const TrainParam& p : model.params) {
    INFO(p.name);
    const float scale = p.name.rfind("vit.embeddings.", 0) == 0          ? 0.125f
                        : p.name.rfind("vit.encoder.layer.0.", 0) == 0   ? 0.25f
                        : p.name.rfind("vit.encoder.layer.1.", 0) == 0   ? 0.5f
                                                                          : 1.0f;
    bool exact = true;
    for (int64_t i = p.offset; i < p.offset + p.numel(); ++i)
      exact = exact && model.weights[i] == before[i] - scale * state.grads[i];
    CHECK(exact);
  }
}

// The gradient buffer written as the model's own checkpoint (save_vit_train_model: timm's or
// torchvision's names for those layouts) against the fixture's "grad.NAME" tensors, each to kTol;
// returns how many tensors were compared (every one the export writes must be in the fixture).
// `check_names` may look at the written names before the folder goes.
int64_t check_exported_grads(const VitTrainModel& model, const std::vector<float>& grads, const SafeTensors& st,
                             const std::string& tag,
                             const std::function<void(const SafeTensors&)>& check_names = {}) {
  VitTrainModel as_grads = model;
  as_grads.weights = grads;
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("tessera-" + tag + "-grad-" + std::to_string(::getpid()));
  save_vit_train_model(as_grads, dir.string());
  const SafeTensors g = SafeTensors::open((dir / "model.safetensors").string());
  int64_t compared = 0;
  for (const std::string& name : g.names()) {
    INFO(name);
    REQUIRE(st.contains("grad." + name));
    CHECK(rel_err(values(g.read(name)), values(st.read("grad." + name))) <= kTol);
    ++compared;
  }
  if (check_names) check_names(g);
  std::filesystem::remove_all(dir);
  return compared;
}

TEST_CASE("DeiT with teacher: the hard-distillation loss's step matches PyTorch", "[vit_train]") {
  // ½·CE(cls head, labels, label smoothing 0.1) + ½·CE(distillation head, teacher labels), on
  // DeiTForImageClassificationWithTeacher; g from PyTorch autograd (make_train_fixtures.py).
  const VitTrainModel model = load_vit_train_model(fixtures("conformance/deit-tiny-distilled-rand"));
  const auto inference = load_model(fixtures("conformance/deit-tiny-distilled-rand"));
  const SafeTensors st = SafeTensors::open(fixtures("train/deit-distilled-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  std::vector<int64_t> labels, teacher;
  for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
  for (float l : values(st.read("teacher_labels"))) teacher.push_back(static_cast<int64_t>(l));
  std::vector<float> grads(model.weights.size(), 0.0f);
  VitTrainActivations acts;
  const double loss = vit_train_distillation_loss_and_grad(model, pixels, labels, teacher, 0.1f,
                                                           acts, grads);
  CHECK(std::abs(loss - st.read("loss")[0]) <= kTol * loss);
  // The forward's logits are the inference model's ((cls + distillation) / 2) and PyTorch's.
  const std::vector<float> logits = acts.logits;
  ModelWorkspace ws;
  CHECK(rel_err(logits, values(output(model_forward(*inference, pixels, ws), "logits"))) <= kTol);
  CHECK(rel_err(logits, values(st.read("logits"))) <= kTol);
  int64_t compared = 0;
  for (const TrainParam& p : model.params) {
    if (!st.contains("grad." + p.name)) continue;
    INFO(p.name);
    const auto got = model.view(std::span<const float>(grads), p.name);
    const std::vector<float> want = values(st.read("grad." + p.name));
    if (p.name.find("key.bias") != std::string::npos) continue;  // 0 in exact arithmetic (see above)
    CHECK(rel_err(got, want) <= kTol);
    ++compared;
  }
  CHECK(compared >= 4 + 6 * model.config.num_hidden_layers);  // heads, tokens, norms, biases

  // vit_train_step on the same loss: SGD at lr 1 leaves exactly w − g, g the loss's gradient.
  VitTrainModel stepped = load_vit_train_model(fixtures("conformance/deit-tiny-distilled-rand"));
  VitTrainState state;
  TrainStepOptions o;
  o.optimizer = Optimizer::Sgd, o.lr = 1.0f, o.label_smoothing = 0.1f;
  CHECK_THROWS_WITH(vit_train_step(stepped, state, pixels, labels, o), Catch::Contains("teacher's labels"));
  const TrainStepResult r = vit_train_step(stepped, state, pixels, labels, o, &teacher);
  CHECK(r.loss == loss);
  std::vector<float> want(model.weights.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = model.weights[i] - grads[i];
  CHECK(stepped.weights == want);
  // ... and in two sub-batches, each with its own slice of the teacher's labels: the same loss
  // and gradient up to float summation order.
  REQUIRE(pixels.shape()[0] % 2 == 0);
  VitTrainModel halves = load_vit_train_model(fixtures("conformance/deit-tiny-distilled-rand"));
  VitTrainState state2;
  o.sub_batches = 2;
  const TrainStepResult r2 = vit_train_step(halves, state2, pixels, labels, o, &teacher);
  CHECK(r2.loss == Approx(loss).epsilon(1e-6));
  CHECK(r2.correct == r.correct);
  CHECK(rel_err(state2.grads, std::vector<double>(grads.begin(), grads.end())) <= 1e-5);
  std::vector<int64_t> short_teacher(teacher.begin(), teacher.end() - 1);
  CHECK_THROWS_WITH(vit_train_step(halves, state2, pixels, labels, o, &short_teacher),
                    Catch::Contains("one per image"));
}

TEST_CASE("--arch presets have the published sizes", "[vit_train]") {
  std::vector<std::string> imagenet(1000, "x");
  // ViT-Ti/16 at 224 with a 1000-class head: 5,717,416 parameters (timm's vit_tiny_patch16_224).
  const VitTrainModel tiny = make_vit_train_model(vit_train_preset("vit-ti16", 224), imagenet, 1);
  CHECK(tiny.weights.size() == 5717416u);
  CHECK(vit_train_preset("vit-s16", 224).num_attention_heads == 6);
  CHECK(vit_train_preset("vit-b16", 384).intermediate_size == 3072);
  const VitConfig digits = vit_train_preset("vit-digits", 20);
  CHECK((digits.grid_height() == 5 && digits.hidden_size == 64 && digits.intermediate_size == 256));
  CHECK_THROWS_WITH(vit_train_preset("vit-h14", 224), Catch::Contains("known: vit-ti16"));
  CHECK_THROWS_WITH(vit_train_preset("vit-ti16", 100), Catch::Contains("not a positive multiple"));
}

TEST_CASE("--init on data of other classes: a new zero head, the rest of the model kept", "[vit_train]") {
  for (const char* from : {"conformance/vit-tiny-rand", "models/dinov2-cls-rand",
                           "conformance/deit-tiny-distilled-rand"}) {
    INFO(from);
    VitTrainModel model = load_vit_train_model(fixtures(from));
    const VitTrainModel before = model;
    replace_classifier(model, {"left", "right", "up"});
    CHECK(model.num_labels == 3);
    for (const TrainParam& p : model.params) {
      INFO(p.name);
      const auto w = model.view(std::span<const float>(model.weights), p.name);
      if (p.name.find("classifier.") != std::string::npos) {
        CHECK(p.shape[0] == 3);
        CHECK(std::all_of(w.begin(), w.end(), [](float x) { return x == 0.0f; }));
      } else {
        const auto old = before.view(std::span<const float>(before.weights), p.name);
        CHECK(std::equal(w.begin(), w.end(), old.begin(), old.end()));
      }
    }
    // The new folder loads with the new labels and gives the same logits (a zero head: its bias, 0).
    const SafeTensors st = SafeTensors::open(fixtures("train/vit-tiny-step.safetensors"));
    const Tensor pixels = st.read("pixel_values");  // 32x32, every model's size here
    VitTrainActivations acts;
    const auto logits = vit_train_forward(model, pixels, acts);
    CHECK(logits.size() == 2u * 3u);
    CHECK(std::all_of(logits.begin(), logits.end(), [](float x) { return x == 0.0f; }));
    const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                      ("tessera-new-head-" + std::to_string(::getpid()));
    save_vit_train_model(model, dir.string());
    const auto loaded = load_model(dir.string());
    CHECK(loaded->labels == std::vector<std::string>{"left", "right", "up"});
    ModelWorkspace ws;
    CHECK(output(model_forward(*loaded, pixels, ws), "logits").shape() == Shape{2, 3});
    std::filesystem::remove_all(dir);
  }
}

TEST_CASE("timm and torchvision ViTs train in their own layout and are written back in it", "[vit_train]") {
  struct Family {
    const char* dir;
    const char* layout;
    const char* qkv;  // the fused query/key/value weight of block 0, under the family's name
  };
  for (const Family& f : {Family{"models/timm/vit_tiny_patch16_224-token-dynamic", "timm", "blocks.0.attn.qkv.weight"},
                          Family{"models/tv-vit-rand", "torchvision",
                                 "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"}}) {
    INFO(f.dir);
    const std::string from = fixtures(f.dir);
    VitTrainModel model = load_vit_train_model(from);
    CHECK(model.layout == f.layout);
    // The training forward gives the inference model's logits (which reproduce the family's own).
    const auto inference = load_model(from);
    Tensor pixels({2, 3, 32, 32});
    for (int64_t i = 0; i < pixels.numel(); ++i) pixels[i] = std::sin(0.21f * static_cast<float>(i));
    VitTrainActivations acts;
    std::span<const float> logits = vit_train_forward(model, pixels, acts);
    ModelWorkspace ws;
    CHECK(rel_err(std::vector<float>(logits.begin(), logits.end()),
                  values(output(model_forward(*inference, pixels, ws), "logits"))) <= kTol);

    // Saved untrained: every tensor comes back under its own name, bit for bit; config.json as read.
    const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                      ("tessera-vit-train-" + std::string(f.layout) + "-" + std::to_string(::getpid()));
    save_vit_train_model(model, dir.string());
    const SafeTensors a = SafeTensors::open(from + "/model.safetensors");
    const SafeTensors b = SafeTensors::open((dir / "model.safetensors").string());
    CHECK(a.names() == b.names());
    CHECK(b.contains(f.qkv));
    for (const std::string& name : a.names()) {
      INFO(name);
      const Tensor x = a.read(name), y = b.read(name);
      REQUIRE(x.shape() == y.shape());
      CHECK(std::equal(x.data(), x.data() + x.numel(), y.data()));
    }
    CHECK(test::slurp(dir / "config.json") == test::slurp(std::filesystem::path(from) / "config.json"));

    // After a step and with new classes: still the family's folder, which load_model reads with
    // the new labels and the trained model's logits.
    std::vector<float> grads(model.weights.size(), 0.0f);
    vit_train_loss_and_grad(model, pixels, {1, 4}, 0.0f, acts, grads);
    sgd_step(model.weights, grads, {}, 0.5f);
    replace_classifier(model, {"cat", "dog", "fox"});
    std::span<float> head = model.view(std::span<float>(model.weights), "classifier.weight");
    for (size_t i = 0; i < head.size(); ++i) head[i] = 0.01f * static_cast<float>(i % 7) - 0.03f;
    logits = vit_train_forward(model, pixels, acts);
    const std::vector<float> want(logits.begin(), logits.end());
    save_vit_train_model(model, dir.string());
    const auto loaded = load_model(dir.string());
    CHECK(loaded->model_type == f.layout);
    CHECK(loaded->labels == std::vector<std::string>{"cat", "dog", "fox"});
    CHECK(rel_err(values(output(model_forward(*loaded, pixels, ws), "logits")), want) <= kTol);
    CHECK(load_vit_train_model(dir.string()).weights == model.weights);
    std::filesystem::remove_all(dir);
  }

  // Variants the training pass does not have are named.
  CHECK_THROWS_WITH(load_vit_train_model(fixtures("models/timm/vit_base_patch14_reg4_dinov2-reg4")),
                    Catch::Contains("no classification head"));
}

TEST_CASE("timm's distilled DeiT trains on the hard-distillation loss: gradients through the timm port", "[vit_train]") {
  // VisionTransformerDistilled: cls_token, dist_token, head on the class token, head_dist on the
  // distillation token, (head + head_dist) / 2 at inference. The loss: ½·CE(head, labels, label
  // smoothing 0.1) + ½·CE(head_dist, teacher labels), DeiT's DistillationLoss "hard"
  // (make_train_fixtures.py timm_distillation_step, float64 autograd through the timm port).
  const std::string from = fixtures("models/timm/deit_tiny_distilled_patch16_224-distilled");
  const VitTrainModel model = load_vit_train_model(from);
  CHECK(model.layout == "timm");
  CHECK(model.teacher);
  const SafeTensors st = SafeTensors::open(fixtures("train/timm-distilled-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  std::vector<int64_t> labels, teacher;
  for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
  for (float l : values(st.read("teacher_labels"))) teacher.push_back(static_cast<int64_t>(l));
  VitTrainActivations acts;
  std::vector<float> grads(model.weights.size(), 0.0f);
  const double loss = vit_train_distillation_loss_and_grad(model, pixels, labels, teacher, 0.1f, acts, grads);
  CHECK(std::abs(loss - st.read("loss")[0]) <= kTol * std::abs(st.read("loss")[0]));
  CHECK(rel_err(acts.logits, values(st.read("logits"))) <= kTol);
  const auto inference = load_model(from);
  ModelWorkspace ws;
  CHECK(rel_err(acts.logits, values(output(model_forward(*inference, pixels, ws), "logits"))) <= kTol);
  // Every gradient, written under timm's names by the same export that writes the model.
  const int64_t compared = check_exported_grads(model, grads, st, "timm-distilled", [](const SafeTensors& g) {
    CHECK(g.contains("dist_token"));
    CHECK(g.contains("head_dist.weight"));
  });
  CHECK(compared == static_cast<int64_t>(st.names().size()) - 5);  // every tensor of the checkpoint
}

TEST_CASE("timm heads and tokens train: gradients through the timm port", "[vit_train]") {
  // make_train_fixtures.py timm_steps: float64 autograd through the port of timm's VisionTransformer.
  struct Case {
    const char* model;
    const char* step;
    int64_t compared;  // tensors under timm's names
  };
  for (const Case& k : {Case{"models/timm/vit_small_patch16_224-noclass-avg", "timm-noclass-avg-step", 2 + 1 + 2 * 11 + 4},
                        Case{"models/timm/vit_small_patch14_reg4_dinov2-cls", "timm-reg4-step", 2 + 3 + 2 * 14 + 4},
                        Case{"models/timm/vit_tiny_patch16_224-avg-nofcnorm", "timm-avg-nofcnorm-step",
                             2 + 2 + 2 * 12 + 4},
                        // CLIP: no patch bias, norm_pre, QuickGELU
                        Case{"models/timm/vit_base_patch16_clip_quickgelu_224-quickgelu", "timm-clip-quickgelu-step",
                             1 + 2 + 2 + 2 * 12 + 4}}) {
    INFO(k.model);
    const std::string from = fixtures(k.model);
    const VitTrainModel model = load_vit_train_model(from);
    CHECK(model.layout == "timm");
    const SafeTensors st = SafeTensors::open(fixtures(std::string("train/") + k.step + ".safetensors"));
    const Tensor pixels = st.read("pixel_values");
    std::vector<int64_t> labels;
    for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
    VitTrainActivations acts;
    std::vector<float> grads(model.weights.size(), 0.0f);
    const double loss = vit_train_loss_and_grad(model, pixels, labels, 0.0f, acts, grads);
    CHECK(std::abs(loss - st.read("loss")[0]) <= kTol * std::abs(st.read("loss")[0]));
    CHECK(rel_err(acts.logits, values(st.read("logits"))) <= kTol);
    // And the inference pass agrees with the training forward at this size.
    const auto inference = load_model(from);
    ModelWorkspace ws;
    CHECK(rel_err(acts.logits, values(output(model_forward(*inference, pixels, ws), "logits"))) <= kTol);
    CHECK(check_exported_grads(model, grads, st, "timm") == k.compared);
  }
}

TEST_CASE("torchvision's representation layer trains: gradients of torchvision's own model", "[vit_train]") {
  // tv-vit-repr-rand: heads.pre_logits [40, 48], tanh, heads.head [5, 40]. The reference is
  // torchvision.models.VisionTransformer itself, float64 autograd (make_train_fixtures.py).
  const std::string from = fixtures("models/tv-vit-repr-rand");
  VitTrainModel model = load_vit_train_model(from);
  CHECK(model.representation_size == 40);
  const SafeTensors st = SafeTensors::open(fixtures("train/tv-vit-repr-step.safetensors"));
  const Tensor pixels = st.read("pixel_values");
  std::vector<int64_t> labels;
  for (float l : values(st.read("labels"))) labels.push_back(static_cast<int64_t>(l));
  VitTrainActivations acts;
  std::vector<float> grads(model.weights.size(), 0.0f);
  const double loss = vit_train_loss_and_grad(model, pixels, labels, 0.0f, acts, grads);
  CHECK(std::abs(loss - st.read("loss")[0]) <= kTol * std::abs(st.read("loss")[0]));
  CHECK(rel_err(acts.logits, values(st.read("logits"))) <= kTol);
  // The gradient buffer written in torchvision's layout names every tensor as torchvision does.
  // embeddings, 2 blocks, encoder.ln, pre_logits + head
  CHECK(check_exported_grads(model, grads, st, "tv-repr") == 4 + 12 * 2 + 2 + 4);
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("tessera-tv-repr-" + std::to_string(::getpid()));
  // New classes keep the representation layer's shape; the folder reloads with the new head.
  replace_classifier(model, {"a", "b"});
  CHECK(model.param("classifier.weight").shape == Shape{2, 40});
  save_vit_train_model(model, dir.string());
  CHECK(load_model(dir.string())->labels == std::vector<std::string>{"a", "b"});
  std::filesystem::remove_all(dir);
}

TEST_CASE("fine-tuning at another size resizes the position table once, bicubic by size", "[vit_train]") {
  // vit-tiny-rand: 32x32, patch 8, a 4x4 grid. Its grid rows set to a known function of the
  // patch position, then resized to 8x8 and compared with bicubic worked out here; the class row
  // is kept.
  VitTrainModel m = load_vit_train_model(fixtures("conformance/vit-tiny-rand"));
  const int64_t d = m.config.hidden_size, pre = m.config.num_prefix_tokens();
  REQUIRE(m.config.grid_height() == 4);
  const TrainParam& p = m.param("vit.embeddings.position_embeddings");
  float* t = m.weights.data() + p.offset;
  for (int64_t y = 0; y < 4; ++y)
    for (int64_t x = 0; x < 4; ++x)
      for (int64_t k = 0; k < d; ++k) t[(pre + y * 4 + x) * d + k] = static_cast<float>(0.5 * y - 0.25 * x + 0.01 * k);
  const std::vector<float> cls(t, t + pre * d);
  const auto patch_view = m.view(std::span<const float>(m.weights), "vit.embeddings.patch_embeddings.projection.weight");
  const std::vector<float> patch_weight(patch_view.begin(), patch_view.end());
  resize_position_table(m, 64, 64);
  CHECK(m.config.image_height == 64);
  const TrainParam& q = m.param("vit.embeddings.position_embeddings");
  CHECK(q.shape == Shape{1, pre + 64, d});
  const float* r = m.weights.data() + q.offset;
  CHECK(std::equal(cls.begin(), cls.end(), r));
  // The reference: PyTorch's upsample_bicubic2d (cubic convolution, A = −0.75, align_corners
  // False, source = (i + 0.5)·in/out − 0.5, taps clamped to the grid), in double here.
  auto cubic = [](double t, int tap) {
    const double A = -0.75, x = tap == 0 ? 1 + t : tap == 1 ? t : tap == 2 ? 1 - t : 2 - t;
    return x <= 1 ? ((A + 2) * x - (A + 3)) * x * x + 1 : ((A * x - 5 * A) * x + 8 * A) * x - 4 * A;
  };
  auto at = [&](int64_t yy, int64_t xx, int64_t k) {
    yy = std::clamp<int64_t>(yy, 0, 3), xx = std::clamp<int64_t>(xx, 0, 3);
    return 0.5 * yy - 0.25 * xx + 0.01 * k;
  };
  int checked = 0;
  for (int64_t y = 0; y < 8; ++y)
    for (int64_t x = 0; x < 8; ++x) {
      const double sy = (y + 0.5) * 0.5 - 0.5, sx = (x + 0.5) * 0.5 - 0.5;
      const int64_t y0 = static_cast<int64_t>(std::floor(sy)), x0 = static_cast<int64_t>(std::floor(sx));
      const double ty = sy - y0, tx = sx - x0;
      for (int64_t k = 0; k < d; ++k) {
        double want = 0;
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) want += cubic(ty, i) * cubic(tx, j) * at(y0 - 1 + i, x0 - 1 + j, k);
        REQUIRE(std::abs(r[(pre + y * 8 + x) * d + k] - want) <= 1e-5);
      }
      ++checked;
    }
  CHECK(checked == 64);
  // Every other tensor is where it was, and config.json says the new size.
  const auto pw = m.view(std::span<const float>(m.weights), "vit.embeddings.patch_embeddings.projection.weight");
  CHECK(std::equal(patch_weight.begin(), patch_weight.end(), pw.begin(), pw.end()));
  CHECK(m.config_json.find("\"image_size\": 64") != std::string::npos);
  CHECK_THROWS_WITH(resize_position_table(m, 60, 60), Catch::Contains("multiple of the patch size"));
  VitTrainModel timm = load_vit_train_model(fixtures("models/timm/vit_tiny_patch16_224-avg-nofcnorm"));
  CHECK_THROWS_WITH(resize_position_table(timm, 64, 64), Catch::Contains("trains at its own size"));
}
