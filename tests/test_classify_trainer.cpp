// The classification training loop (vision/include/tessera/classify_trainer.hpp) on a small
// generated ImageFolder and the conformance ViT.
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <unistd.h>

#include "tessera/classify_trainer.hpp"
#include "tessera/gemm.hpp"
#include "tessera/pipeline.hpp"
#include <cmath>
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

TEST_CASE("trainer: a DeiT with teacher steps on the hard-distillation loss with a teacher's labels", "[trainer]") {
  // DeiT's ½·CE(class head, y) + ½·CE(distillation head, teacher's argmax): the teacher, another
  // classifier folder, runs on the same images through its own processor. One SGD step of lr 1
  // over the folder must leave w − g, g from the distillation loss with the teacher's labels
  // worked out here on the image files through the inference pipeline.
  Folder f;
  const ClassificationData data = image_folder(f.path.string());
  const std::string processor_json =
      R"({"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}})";
  // The teacher: the conformance ViT with a new head of random weights for the folder's classes.
  VitTrainModel teacher_train = load_vit_train_model(model_dir());
  replace_classifier(teacher_train, data.classes);
  for (const TrainParam& p : teacher_train.params)
    if (p.name.starts_with("classifier."))
      for (int64_t i = 0; i < p.numel(); ++i)
        teacher_train.weights[static_cast<size_t>(p.offset + i)] = static_cast<float>(std::sin(1.7 * i + 0.3));
  const fs::path teacher_dir = f.path.parent_path() / ("tessera-teacher-" + std::to_string(::getpid()));
  save_vit_train_model(teacher_train, teacher_dir.string(), processor_json);
  const auto teacher = load_model(teacher_dir.string());
  std::vector<std::string> paths;
  for (size_t i = 0; i < data.size(); ++i) paths.push_back(data.paths[i]);
  ModelWorkspace ws;
  const NamedTensors out = model_forward(*teacher, model_preprocessor(*teacher).batch(paths), ws);
  std::vector<int64_t> teacher_labels;
  for (const auto& row : top_k(output(out, "logits"), teacher->labels, 1)) teacher_labels.push_back(row[0].label);
  CHECK(teacher_labels != data.labels);  // the teacher disagrees somewhere, so the test can tell

  const std::string student_dir = std::string(TESSERA_FIXTURES) + "/conformance/deit-tiny-distilled-rand";
  VitTrainModel student = load_vit_train_model(student_dir);
  REQUIRE(student.teacher);
  replace_classifier(student, data.classes);
  const VitTrainModel fresh = student;
  ClassifierTrainOptions o;
  o.max_steps = 1, o.batch = static_cast<int64_t>(data.size()), o.shuffle = false;
  o.step.optimizer = Optimizer::Sgd, o.step.lr = 1.0f, o.step.weight_decay = 0, o.step.clip_grad = 0;
  o.teacher = teacher.get();
  CHECK(teacher_batch_labels(data, o, 0, *teacher) == teacher_labels);
  VitTrainState state;
  double seen_loss = 0;
  train_classifier(student, state, data, processor(), o, [&](const TrainProgress& p) { seen_loss = p.loss; });
  std::vector<size_t> all(data.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  std::vector<int64_t> labels;
  const Tensor pixels = classification_batch(data, all, processor(), &labels);
  std::vector<float> g(fresh.weights.size(), 0.0f);
  VitTrainActivations acts;
  const double loss = vit_train_distillation_loss_and_grad(fresh, pixels, labels, teacher_labels, 0.0f, acts, g);
  CHECK(seen_loss == loss);
  for (size_t i = 0; i < g.size(); ++i) REQUIRE(student.weights[i] == fresh.weights[i] - g[i]);

  // Without a teacher the distillation head learns the true labels.
  VitTrainModel plain = fresh;
  VitTrainState plain_state;
  o.teacher = nullptr;
  train_classifier(plain, plain_state, data, processor(), o, {});
  std::fill(g.begin(), g.end(), 0.0f);
  vit_train_distillation_loss_and_grad(fresh, pixels, labels, labels, 0.0f, acts, g);
  for (size_t i = 0; i < g.size(); ++i) REQUIRE(plain.weights[i] == fresh.weights[i] - g[i]);
  // A teacher is for a model with a distillation head, of the student's classes.
  VitTrainModel vit = load_vit_train_model(model_dir());
  replace_classifier(vit, data.classes);
  o.teacher = teacher.get();
  VitTrainState vit_state;
  CHECK_THROWS_WITH(train_classifier(vit, vit_state, data, processor(), o, {}), Catch::Contains("distillation head"));
  fs::remove_all(teacher_dir);
}

TEST_CASE("augmentation: a random resized crop stretches a crop of the image over it, flips with it", "[trainer]") {
  // Pixel (x, y) holds x·4 in red and y·4 in green: a crop stretched over the image keeps red
  // non-decreasing along rows (non-increasing when flipped) and green down columns, and spans
  // less than the whole range when the crop is smaller than the image.
  cv::Mat img(64, 64, CV_8UC3);
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) img.at<cv::Vec3b>(y, x) = cv::Vec3b(static_cast<uchar>(x * 4), static_cast<uchar>(y * 4), 0);
  AugmentOptions o;
  o.enabled = true, o.brightness = o.contrast = 0, o.blur_probability = 0, o.rrc_min_scale = 0.08;
  int cropped = 0;
  for (const bool hflip : {false, true}) {
    o.hflip = hflip;
    int flipped = 0;
    for (uint64_t seed = 1; seed <= 20; ++seed) {
      INFO("seed " << seed << ", hflip " << hflip);
      const cv::Mat out = augment_image(img, o, seed);
      REQUIRE(out.size() == img.size());
      const int left = out.at<cv::Vec3b>(32, 0)[0], right = out.at<cv::Vec3b>(32, 63)[0];
      const bool mirror = left > right;
      flipped += mirror;
      CHECK((hflip || !mirror));
      bool monotone = true;
      for (int y = 0; y < 64; ++y)
        for (int x = 1; x < 64; ++x) {
          const int a = out.at<cv::Vec3b>(y, x - 1)[0], b = out.at<cv::Vec3b>(y, x)[0];
          monotone = monotone && (mirror ? b <= a : b >= a);
        }
      for (int x = 0; x < 64; ++x)
        for (int y = 1; y < 64; ++y) monotone = monotone && out.at<cv::Vec3b>(y, x)[1] >= out.at<cv::Vec3b>(y - 1, x)[1];
      CHECK(monotone);
      const int span = std::abs(left - right), vspan = out.at<cv::Vec3b>(63, 32)[1] - out.at<cv::Vec3b>(0, 32)[1];
      cropped += span < 200 || vspan < 200;
      CHECK(span > 0);
    }
    if (hflip) CHECK(flipped > 0);
  }
  CHECK(cropped >= 15);  // area fraction in [0.08, 1]: most crops span well under the whole (28 of 40 here)
}

TEST_CASE("trainer: bf16 training GEMMs follow fp32's loss curve, the same for 1 and 2 threads", "[trainer][bf16]") {
  // --precision bf16: the linear layers' operands rounded to bf16, fp32 sums and fp32 weights. The
  // loss curve must stay on fp32's (within 0.005 + 1% at every step, while the loss falls from 3.2
  // to 0.03 and a step moves it by more; bf16 differs by 0.0002-0.006 here), the weights must
  // differ from fp32's (the setting is in use), and the run must still not depend on the thread
  // count.
  Folder f;
  const ClassificationData data = image_folder(f.path.string());
  ClassifierTrainOptions o;
  o.epochs = 4, o.batch = 4, o.seed = 3, o.warmup_steps = 2;
  o.step.lr = 2e-3f, o.step.weight_decay = 0.05f, o.step.clip_grad = 1.0f;
  auto run = [&](WeightType type, int threads) {
    const TrainingGemmScope precision(type);
    set_num_threads(threads);
    VitTrainModel model = load_vit_train_model(model_dir());
    VitTrainState state;
    std::vector<double> losses;
    train_classifier(model, state, data, processor(), o, [&](const TrainProgress& p) { losses.push_back(p.loss); });
    set_num_threads(0);
    return std::make_pair(losses, model.weights);
  };
  const auto [l32, w32] = run(WeightType::F32, 2);
  const auto [l16, w16] = run(WeightType::BF16, 2);
  const auto [l16_1, w16_1] = run(WeightType::BF16, 1);
  REQUIRE(l32.size() == 12);
  REQUIRE(l16.size() == 12);
  for (size_t i = 0; i < l32.size(); ++i) {
    INFO("step " << i + 1 << ": fp32 loss " << l32[i] << ", bf16 loss " << l16[i]);
    CHECK(std::abs(l16[i] - l32[i]) <= 0.005 + 0.01 * l32[i]);
  }
  CHECK(l32.back() < l32.front());
  CHECK(l16.back() < l16.front());
  CHECK(w16 != w32);
  CHECK(w16 == w16_1);
  CHECK(l16 == l16_1);
}
