// The trainer: analytic gradients against central differences (in double), its forward against
// Tessera's inference path on an exported folder, a small task it must learn (which a wrong
// backward would not), determinism across thread counts, and the bundled default model.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <regex>
#include <unistd.h>

#include <opencv2/imgproc.hpp>

#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/train.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

TrainVitConfig tiny_config() {
  TrainVitConfig c;
  c.image_size = 8;
  c.patch_size = 4;
  c.num_channels = 3;
  c.hidden_size = 8;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.intermediate_size = 16;
  c.num_labels = 3;
  return c;
}

// Hugging Face's init, then noise of std 0.3 on everything: logits that depend strongly on every
// parameter (at the 0.02 init most gradients are tiny and a wrong one could hide).
template <typename R>
std::vector<R> random_params(const TrainVitConfig& c, uint64_t seed) {
  std::vector<R> p(param_count(c));
  init_params(c, p.data(), seed);
  TrainRng rng(seed + 17);
  for (auto& x : p) x += static_cast<R>(0.3 * rng.normal());
  return p;
}

template <typename R>
std::vector<R> random_pixels(const TrainVitConfig& c, int64_t n, uint64_t seed) {
  std::vector<R> x(n * c.num_channels * c.image_size * c.image_size);
  TrainRng rng(seed);
  for (auto& v : x) v = static_cast<R>(rng.uniform(-1, 1));
  return x;
}

// Mean cross-entropy of the batch; with grads, also dLoss/dparams into grads (zeroed first).
double loss_and_grads(const TrainVitConfig& c, std::vector<double>& params, const std::vector<double>& pixels,
                      const std::vector<int64_t>& labels, std::vector<double>* grads) {
  const int64_t n = static_cast<int64_t>(labels.size());
  VitActivations<double> acts;
  const VitParams<double> p = bind_params(c, params.data());
  vit_train_forward(c, p, pixels.data(), n, acts);
  std::vector<double> dlogits(n * c.num_labels);
  const double loss = softmax_cross_entropy(acts.logits.data(), labels.data(), n, c.num_labels,
                                            1.0 / static_cast<double>(n), dlogits.data());
  if (grads) {
    grads->assign(params.size(), 0.0);
    vit_train_backward(c, p, bind_params(c, grads->data()), acts, dlogits.data());
  }
  return loss / static_cast<double>(n);
}

std::string temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("tessera-test-train-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

}  // namespace

TEST_CASE("train: analytic gradients of every parameter match central differences (double)", "[train]") {
  const TrainVitConfig c = tiny_config();
  std::vector<double> params = random_params<double>(c, 3);
  const std::vector<double> pixels = random_pixels<double>(c, 3, 5);
  const std::vector<int64_t> labels = {0, 2, 1};
  std::vector<double> grads;
  loss_and_grads(c, params, pixels, labels, &grads);

  // Every coordinate of every tensor. Central differences with h = 1e-5 in double are exact to
  // about h² · |f'''| + 1e-16 / h ≈ 1e-10; an error in any backward is many orders larger.
  const double h = 1e-5, abs_tol = 1e-7, rel_tol = 1e-5;
  for (const ParamTensor& t : param_layout(c)) {
    double max_err = 0, max_grad = 0;
    const int64_t n = shape_numel(t.shape);
    for (int64_t i = t.offset; i < t.offset + n; ++i) {
      const double saved = params[i];
      params[i] = saved + h;
      const double up = loss_and_grads(c, params, pixels, labels, nullptr);
      params[i] = saved - h;
      const double down = loss_and_grads(c, params, pixels, labels, nullptr);
      params[i] = saved;
      const double numeric = (up - down) / (2 * h);
      max_err = std::max(max_err, std::abs(numeric - grads[i]) / (abs_tol + rel_tol * std::abs(numeric)));
      max_grad = std::max(max_grad, std::abs(numeric));
    }
    INFO(t.name << ": max |grad| " << max_grad << ", worst error / tolerance " << max_err);
    CHECK(max_grad > 1e-4);  // the check is not vacuous: this tensor does move the loss
    CHECK(max_err <= 1.0);
  }
}

TEST_CASE("train: float and double forwards agree", "[train]") {
  const TrainVitConfig c = tiny_config();
  std::vector<double> pd = random_params<double>(c, 7);
  std::vector<float> pf(pd.begin(), pd.end());
  const std::vector<double> xd = random_pixels<double>(c, 2, 9);
  const std::vector<float> xf(xd.begin(), xd.end());
  VitActivations<double> ad;
  VitActivations<float> af;
  vit_train_forward(c, bind_params(c, pd.data()), xd.data(), 2, ad);
  vit_train_forward(c, bind_params(c, pf.data()), xf.data(), 2, af);
  for (size_t i = 0; i < ad.logits.size(); ++i) CHECK(std::abs(af.logits[i] - ad.logits[i]) < 1e-4);
}

TEST_CASE("train: the exported folder gives the trainer's logits through load_model", "[train]") {
  TrainVitConfig c = tiny_config();
  c.num_hidden_layers = 1;
  std::vector<float> params = random_params<float>(c, 11);
  const std::string dir = temp_dir("export");
  write_hf_vit(dir, c, params, {"a", "b", "c"});

  auto model = load_model(dir);
  REQUIRE(model->architecture == "ViTForImageClassification");
  REQUIRE(model->labels == std::vector<std::string>{"a", "b", "c"});
  REQUIRE(model->parameter_count == param_count(c));

  const int64_t n = 3;
  const std::vector<float> pixels = random_pixels<float>(c, n, 13);
  Tensor x({n, c.num_channels, c.image_size, c.image_size});
  std::copy(pixels.begin(), pixels.end(), x.data());
  ModelWorkspace ws;
  const Tensor logits = output(model_forward(*model, x, ws), "logits");
  REQUIRE(logits.shape() == Shape{n, c.num_labels});

  VitActivations<float> acts;
  vit_train_forward(c, bind_params(c, params.data()), pixels.data(), n, acts);
  // Same math, independent code (Tessera's packed GEMM, fused attention): float rounding only.
  double max_diff = 0, max_logit = 0;
  for (int64_t i = 0; i < n * c.num_labels; ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(logits[i] - acts.logits[i])));
    max_logit = std::max(max_logit, static_cast<double>(std::abs(acts.logits[i])));
  }
  INFO("max |logit| " << max_logit << ", max difference " << max_diff);
  CHECK(max_logit > 0.1);
  CHECK(max_diff < 1e-4);

  // The exported processor is the one the trainer uses: gray replicated to RGB, [-1, 1].
  const Preprocessor pre = model_preprocessor(*model);
  cv::Mat gray(c.image_size, c.image_size, CV_8UC1, cv::Scalar(255));
  std::vector<float> px(c.num_channels * c.image_size * c.image_size);
  image_to_pixels(gray, pre.config, px.data());
  for (float v : px) CHECK(v == 1.0f);
  fs::remove_all(dir);
}

namespace {

// Two classes of 8x8 gray images: a bright 3x3 blob somewhere in the left half (0) or the right
// half (1), on noise.
LabeledImages blobs(int64_t count, uint64_t seed) {
  LabeledImages out;
  TrainRng rng(seed);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t label = i % 2;
    cv::Mat img(8, 8, CV_8UC1);
    for (int y = 0; y < 8; ++y)
      for (int x = 0; x < 8; ++x) img.at<uint8_t>(y, x) = static_cast<uint8_t>(rng.uniform(0, 60));
    const int cx = static_cast<int>(label ? 5 + rng.below(2) : 1 + rng.below(2));
    const int cy = static_cast<int>(1 + rng.below(6));
    for (int y = cy - 1; y <= cy + 1; ++y)
      for (int x = cx - 1; x <= cx + 1; ++x)
        if (y >= 0 && y < 8) img.at<uint8_t>(y, x) = 230;
    out.images.push_back(img);
    out.labels.push_back(label);
  }
  return out;
}

TrainVitConfig blob_config() {
  TrainVitConfig c = tiny_config();
  c.hidden_size = 16;
  c.num_hidden_layers = 1;
  c.intermediate_size = 32;
  c.num_labels = 2;
  return c;
}

TrainOptions blob_options() {
  TrainOptions o;
  o.epochs = 6;
  o.batch_size = 16;
  o.learning_rate = 3e-3f;
  o.warmup_epochs = 1;
  o.augment = false;
  o.seed = 5;
  return o;
}

}  // namespace

TEST_CASE("train: learns a small task (left vs right blob)", "[train]") {
  const TrainVitConfig c = blob_config();
  const TrainOptions o = blob_options();
  const PreprocessConfig pre = parse_preprocess_config(hf_vit_preprocessor_json(c), "test");
  const LabeledImages train = blobs(480, 1), test = blobs(200, 2);
  VitTrainer trainer(c, o, pre);
  const double before = trainer.accuracy(test);
  std::vector<double> losses;
  for (int64_t e = 0; e < o.epochs; ++e) losses.push_back(trainer.train_epoch(train, e).loss);
  const double after = trainer.accuracy(test);
  INFO("hold-out accuracy " << before << " -> " << after << ", loss " << losses.front() << " -> " << losses.back());
  CHECK(losses.back() < 0.5 * losses.front());
  CHECK(after >= 0.95);
}

TEST_CASE("train: a run is bit-for-bit the same for 1 and 2 threads", "[train]") {
  const TrainVitConfig c = blob_config();
  TrainOptions o = blob_options();
  o.epochs = 1;
  o.augment = true;  // augmentation is seeded per sample, not per thread
  const PreprocessConfig pre = parse_preprocess_config(hf_vit_preprocessor_json(c), "test");
  const LabeledImages train = blobs(64, 3);
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    VitTrainer trainer(c, o, pre);
    trainer.train_epoch(train, 0);
    results.emplace_back(trainer.parameters().begin(), trainer.parameters().end());
  }
  set_num_threads(0);
  REQUIRE(results[0].size() == results[1].size());
  CHECK(std::memcmp(results[0].data(), results[1].data(), sizeof(float) * results[0].size()) == 0);
}

TEST_CASE("train: the bundled default model reads the bundled sample digits", "[train]") {
  const fs::path root(TESSERA_SOURCE_DIR);
  auto model = load_model((root / "assets/models/default").string());
  REQUIRE(model->classifier.num_labels == 10);
  const Preprocessor pre = model_preprocessor(*model);
  const std::regex name("digit_([0-9])\\.png");
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(root / "assets/images")) {
    std::smatch m;
    const std::string file = entry.path().filename().string();
    if (!std::regex_match(file, m, name)) continue;
    ModelWorkspace ws;
    const Tensor logits = output(model_forward(*model, pre.batch({entry.path().string()}), ws), "logits");
    const auto top = top_k(logits, model->labels, 1);
    INFO(file << " -> " << top[0][0].name << " (" << top[0][0].probability << ")");
    CHECK(top[0][0].name == m[1].str());
    ++checked;
  }
  CHECK(checked >= 5);
}
