// The classification training loop (vision/include/tessera/classify_trainer.hpp) on a small
// generated ImageFolder and the conformance ViT.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <unistd.h>

#include "tessera/classify_trainer.hpp"
#include "tessera/parallel.hpp"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

struct Folder {
  fs::path path = fs::temp_directory_path() / ("tessera-trainer-" + std::to_string(::getpid()));
  // Two classes of 6 noisy images each (a bright left or right half), 40x40 PNGs.
  Folder() {
    fs::remove_all(path);
    cv::RNG rng(5);
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 6; ++i) {
        cv::Mat m(40, 40, CV_8UC3);
        rng.fill(m, cv::RNG::UNIFORM, 0, 80);
        m(cv::Rect(c * 20, 0, 20, 40)) += cv::Scalar(150, 150, 150);
        fs::create_directories(path / (c ? "right" : "left"));
        REQUIRE(cv::imwrite((path / (c ? "right" : "left") / (std::to_string(i) + ".png")).string(), m));
      }
  }
  ~Folder() { fs::remove_all(path); }
};

std::string model_dir() { return std::string(TESSERA_FIXTURES) + "/conformance/vit-tiny-rand"; }

PreprocessConfig processor() {  // the conformance ViT takes 32x32
  return parse_preprocess_config(
      R"({"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}})", "test");
}

}  // namespace

TEST_CASE("trainer: SGD, lr 1, no warm-up, no clipping, one step, no shuffle: exactly w − g", "[trainer]") {
  // Issue 13's gradient check through the loop: one batch of all N images, g its gradient.
  Folder f;
  const ClassificationData data = image_folder(f.path.string());
  ClassifierTrainOptions o;
  o.max_steps = 1, o.batch = static_cast<int64_t>(data.size()), o.shuffle = false;
  o.step.optimizer = Optimizer::Sgd, o.step.lr = 1.0f;
  VitTrainModel model = load_vit_train_model(model_dir());
  const std::vector<float> before = model.weights;
  VitTrainState state;
  std::vector<TrainProgress> seen;
  train_classifier(model, state, data, processor(), o, [&](const TrainProgress& p) { seen.push_back(p); });
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].lr == 1.0);  // the first step of a run without warm-up takes the full rate

  // The gradient of mean cross-entropy over the whole folder, in its order.
  std::vector<size_t> all(data.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  std::vector<int64_t> labels;
  const Tensor pixels = classification_batch(data, all, processor(), &labels);
  CHECK(labels == data.labels);
  const VitTrainModel fresh = load_vit_train_model(model_dir());
  std::vector<float> g(fresh.weights.size(), 0.0f);
  VitTrainActivations acts;
  const double loss = vit_train_loss_and_grad(fresh, pixels, labels, 0.0f, acts, g);
  CHECK(seen[0].loss == loss);
  std::vector<float> want(before.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = before[i] - g[i];
  CHECK(model.weights == want);
}

TEST_CASE("trainer: a resumed run ends bit-identical; epochs reshuffle; 1 and 2 threads agree", "[trainer]") {
  Folder f;
  const ClassificationData data = image_folder(f.path.string());
  ClassifierTrainOptions o;
  o.epochs = 2, o.batch = 4, o.seed = 3, o.warmup_steps = 2;  // 3 steps an epoch, 6 in all
  o.step.lr = 2e-3f, o.step.weight_decay = 0.05f, o.step.clip_grad = 1.0f;
  REQUIRE(total_steps(data, o) == 6);
  // Each epoch is a permutation of the samples, and the two epochs differ.
  std::vector<size_t> e0, e1;
  for (int s = 0; s < 3; ++s) {
    const auto b0 = batch_indices(data, o, s), b1 = batch_indices(data, o, 3 + s);
    e0.insert(e0.end(), b0.begin(), b0.end());
    e1.insert(e1.end(), b1.begin(), b1.end());
  }
  CHECK(e0 != e1);
  std::sort(e0.begin(), e0.end());
  for (size_t i = 0; i < e0.size(); ++i) CHECK(e0[i] == i);

  auto straight = [&](int threads) {
    set_num_threads(threads);
    VitTrainModel model = load_vit_train_model(model_dir());
    VitTrainState state;
    std::vector<double> losses;
    train_classifier(model, state, data, processor(), o,
                     [&](const TrainProgress& p) { losses.push_back(p.loss); });
    set_num_threads(0);
    CHECK(losses.size() == 6);
    return model.weights;
  };
  const std::vector<float> one = straight(1), two = straight(2);
  CHECK(one == two);

  // Stopped after 4 of the 6 steps (as a killed run), checkpointed, restored into a fresh model,
  // finished: the schedule and the batches are the whole run's.
  VitTrainModel model = load_vit_train_model(model_dir());
  VitTrainState state;
  train_classifier(model, state, data, processor(), o, {}, 4);
  REQUIRE(state.step == 4);
  const std::string path = (f.path.parent_path() / ("tessera-trainer-ckpt-" + std::to_string(::getpid()))).string();
  save_train_checkpoint(path, model, state);
  VitTrainModel resumed = load_vit_train_model(model_dir());
  VitTrainState resumed_state;
  load_train_checkpoint(path, resumed, resumed_state);
  fs::remove(path);
  train_classifier(resumed, resumed_state, data, processor(), o);
  CHECK(resumed_state.step == 6);
  CHECK(resumed.weights == one);
}

TEST_CASE("trainer: labels beyond the model's head are an error naming the data", "[trainer]") {
  Folder f;
  ClassificationData data = image_folder(f.path.string());
  data.labels[0] = 10;  // the conformance ViT has 10 labels
  VitTrainModel model = load_vit_train_model(model_dir());
  VitTrainState state;
  CHECK_THROWS_WITH(train_classifier(model, state, data, processor(), ClassifierTrainOptions{}),
                    Catch::Contains("class 10 but the model has 10 labels"));
}
