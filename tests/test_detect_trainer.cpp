// The detection training loop (vision/include/tessera/detect_trainer.hpp) on a small COCO set
// drawn here: seeded batches, boxes that follow the augmentation, one SGD step equal to the
// training pass's w − g, and a resumed run bit-identical to an uninterrupted one.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <sys/wait.h>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "cli_util.hpp"
#include "tessera/detect_trainer.hpp"
#include "tessera/detection.hpp"
#include "tessera/detr_train.hpp"
#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/yolos_train.hpp"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("tessera-detect-trainer-" + std::to_string(::getpid()));
  TempDir() { fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

// n images of width x height (dark grey), each with one or two light rectangles of category 1 or 2.
std::string write_coco(const fs::path& dir, int n, int width, int height) {
  nlohmann::json j = {{"images", nlohmann::json::array()}, {"annotations", nlohmann::json::array()},
                      {"categories", {{{"id", 1}, {"name", "a"}}, {{"id", 2}, {"name", "b"}}}}};
  int ann = 1;
  for (int i = 0; i < n; ++i) {
    cv::Mat img(height, width, CV_8UC3, cv::Scalar(30, 30, 30));
    const std::string name = "im" + std::to_string(i) + ".png";
    j["images"].push_back({{"id", i + 1}, {"file_name", name}, {"width", width}, {"height", height}});
    for (int k = 0; k < 1 + i % 2; ++k) {
      const int w = 6 + (i * 3 + k * 5) % 9, h = 7 + (i * 5 + k * 3) % 8;
      const int x = 3 + (i * 7 + k * 19) % (width / 2 - w - 3) + k * width / 2, y = 4 + (i * 11 + k * 13) % (height - h - 8);
      cv::rectangle(img, cv::Rect(x, y, w, h), cv::Scalar(230, 230, 230), cv::FILLED);
      j["annotations"].push_back({{"id", ann++}, {"image_id", i + 1}, {"category_id", 1 + (i + k) % 2},
                                  {"bbox", {x, y, w, h}}, {"area", w * h}, {"iscrowd", 0}});
    }
    cv::imwrite((dir / name).string(), img);
  }
  const fs::path json = dir / "annotations.json";
  std::ofstream(json) << j.dump();
  return json.string();
}

VitTrainModel tiny_model(const DetectionData& data, int64_t size) {
  VitConfig c = yolos_train_preset("yolos-digits", size, size);
  c.hidden_size = 32, c.num_attention_heads = 2, c.intermediate_size = 64, c.num_hidden_layers = 2;
  c.num_detection_tokens = 4;
  return make_yolos_train_model(c, data.labels, 3);
}

}  // namespace

TEST_CASE("detection data reads COCO as the processors prepare targets", "[detect_trainer]") {
  TempDir tmp;
  const DetectionData data = load_detection_data(write_coco(tmp.path, 4, 48, 40));
  REQUIRE(data.size() == 4);
  CHECK(data.labels == std::vector<std::string>{"N/A", "a", "b"});
  CHECK(data.targets[0].labels.size() == 1);
  CHECK(data.targets[1].labels.size() == 2);
  fs::remove(tmp.path / "im2.png");
  CHECK_THROWS_WITH(load_detection_data((tmp.path / "annotations.json").string()), Catch::Contains("im2.png"));
}

TEST_CASE("augmented boxes follow the augmented pixels", "[detect_trainer]") {
  TempDir tmp;
  const DetectionData data = load_detection_data(write_coco(tmp.path, 6, 48, 40));
  const PreprocessConfig processor = parse_preprocess_config(yolos_preprocessor_json(40, 48), "test");
  DetectorTrainOptions o;
  o.batch = 1, o.seed = 5;
  o.augment.scale = 0.3, o.augment.translate = 0.3;
  o.augment.hflip = GENERATE(false, true);  // the boxes are off-centre: a flip must move them
  INFO("hflip " << o.augment.hflip);
  int mirrored = 0;
  for (int64_t step = 0; step < 6; ++step) {
    std::vector<DetectionTarget> targets, unflipped;
    const Tensor x = detection_batch(data, {static_cast<size_t>(step)}, processor, o, step, &targets);
    REQUIRE(targets.size() == 1);
    // The geometry is drawn before the flip: the same seed without flips gives the same boxes or
    // their mirror images.
    DetectorTrainOptions no_flip = o;
    no_flip.augment.hflip = false;
    detection_batch(data, {static_cast<size_t>(step)}, processor, no_flip, step, &unflipped);
    REQUIRE(unflipped[0].boxes.size() == targets[0].boxes.size());
    bool mirror = false;
    for (size_t k = 0; k < targets[0].boxes.size(); ++k)
      mirror |= std::abs(targets[0].boxes[k][0] - (1.0f - unflipped[0].boxes[k][0])) < 1e-5f &&
                std::abs(targets[0].boxes[k][0] - unflipped[0].boxes[k][0]) > 1e-3f;
    mirrored += mirror;
    // Every box must cover light pixels (channel 0 normalised above 0) and its border ring none
    // beyond a pixel of interpolation.
    for (const auto& b : targets[0].boxes) {
      const double x0 = (b[0] - b[2] / 2) * 48, x1 = (b[0] + b[2] / 2) * 48;
      const double y0 = (b[1] - b[3] / 2) * 40, y1 = (b[1] + b[3] / 2) * 40;
      int inside = 0, total = 0;
      for (int yy = static_cast<int>(std::ceil(y0 + 1)); yy < y1 - 1; ++yy)
        for (int xx = static_cast<int>(std::ceil(x0 + 1)); xx < x1 - 1; ++xx, ++total) inside += x[yy * 48 + xx] > 0;
      INFO("step " << step);
      CHECK(total > 0);
      CHECK(inside == total);
    }
    // And the light pixels lie in some box (1.5 px of slack for bilinear edges).
    for (int yy = 0; yy < 40; ++yy)
      for (int xx = 0; xx < 48; ++xx) {
        if (!(x[yy * 48 + xx] > 0.5f)) continue;
        bool covered = false;
        for (const auto& b : targets[0].boxes)
          covered |= std::abs(xx + 0.5 - b[0] * 48) <= b[2] * 24 + 1.5 && std::abs(yy + 0.5 - b[1] * 40) <= b[3] * 20 + 1.5;
        CHECK(covered);
      }
  }
  // Half the images flip: with 6 of them, none flipping would be a 1-in-64 draw (this seed flips some).
  if (o.augment.hflip) CHECK(mirrored > 0);
  else CHECK(mirrored == 0);
}

TEST_CASE("one SGD step of lr 1 over the data leaves w - g", "[detect_trainer]") {
  TempDir tmp;
  const DetectionData data = load_detection_data(write_coco(tmp.path, 4, 32, 32));
  const PreprocessConfig processor = parse_preprocess_config(yolos_preprocessor_json(32, 32), "test");
  VitTrainModel model = tiny_model(data, 32);
  const VitTrainModel before = model;
  DetectorTrainOptions o;
  o.batch = 4, o.max_steps = 1, o.shuffle = false, o.augment.enabled = false;
  o.step.optimizer = Optimizer::Sgd, o.step.lr = 1.0f, o.step.weight_decay = 0, o.step.clip_grad = 0;
  VitTrainState state;
  train_detector(model, state, data, processor, o, {});
  CHECK(state.step == 1);
  std::vector<DetectionTarget> targets;
  const Tensor x = detection_batch(data, {0, 1, 2, 3}, processor, o, 0, &targets);
  std::vector<float> g(before.weights.size(), 0.0f);
  VitTrainActivations acts;
  yolos_train_loss_and_grad(before, x, targets, acts, g);
  for (size_t i = 0; i < g.size(); ++i) REQUIRE(model.weights[i] == before.weights[i] - g[i]);
}

TEST_CASE("a resumed detection run is bit-identical to an uninterrupted one", "[detect_trainer]") {
  TempDir tmp;
  const DetectionData data = load_detection_data(write_coco(tmp.path, 6, 32, 32));
  const PreprocessConfig processor = parse_preprocess_config(yolos_preprocessor_json(32, 32), "test");
  DetectorTrainOptions o;
  o.batch = 2, o.epochs = 2, o.seed = 9, o.warmup_steps = 2;
  o.step.lr = 1e-3f, o.step.weight_decay = 0.05f, o.step.clip_grad = 1.0f;
  VitTrainModel whole = tiny_model(data, 32);
  VitTrainState whole_state;
  std::vector<double> losses;
  train_detector(whole, whole_state, data, processor, o, [&](const DetectorProgress& p) { losses.push_back(p.loss); });
  CHECK(losses.size() == 6);

  VitTrainModel first = tiny_model(data, 32);
  VitTrainState first_state;
  train_detector(first, first_state, data, processor, o, {}, 4);  // killed after step 4
  const std::string ckpt = (tmp.path / "checkpoint.safetensors").string();
  save_train_checkpoint(ckpt, first, first_state);
  VitTrainModel resumed = tiny_model(data, 32);
  VitTrainState resumed_state;
  load_train_checkpoint(ckpt, resumed, resumed_state);
  CHECK(resumed_state.step == 4);
  train_detector(resumed, resumed_state, data, processor, o, {});
  CHECK(resumed.weights == whole.weights);
  CHECK(resumed_state.m == whole_state.m);
  CHECK(resumed_state.v == whole_state.v);
}

TEST_CASE("a DETR head on a frozen encoder trains alike from cached features", "[detect_trainer]") {
  // --freeze-encoder without augmentation encodes each image once; the run must be the one that
  // encodes every batch again: same losses, same weights, bit for bit (the encoder's rows do not
  // depend on which images share its batch).
  TempDir tmp;
  const DetectionData data = load_detection_data(write_coco(tmp.path, 6, 32, 32));
  const PreprocessConfig processor = parse_preprocess_config(detr_preprocessor_json(32, 32), "test");
  VitConfig c = detr_train_preset("detr-digits", 32, 32, nullptr);
  c.hidden_size = 32, c.num_attention_heads = 2, c.num_hidden_layers = 1, c.intermediate_size = 64;
  DetrHeadConfig head;
  head.d_model = 16, head.queries = 4, head.layers = 2, head.heads = 2, head.ffn = 32;
  VitTrainModel cached = make_detr_train_model(c, head, data.labels, 3);
  cached.frozen_encoder = true;
  VitTrainModel uncached = cached;
  const VitTrainModel before = cached;
  DetectorTrainOptions o;
  o.batch = 2, o.epochs = 2, o.seed = 5, o.warmup_steps = 1, o.augment.enabled = false;
  o.step.lr = 1e-2f, o.step.weight_decay = 0.05f, o.step.clip_grad = 1.0f;
  CHECK(detector_caches_features(cached, data, processor, o));
  std::vector<double> a, b;
  VitTrainState sa, sb;
  train_detector(cached, sa, data, processor, o, [&](const DetectorProgress& p) { a.push_back(p.loss); });
  o.cache_features = false;
  CHECK(!detector_caches_features(uncached, data, processor, o));
  train_detector(uncached, sb, data, processor, o, [&](const DetectorProgress& p) { b.push_back(p.loss); });
  CHECK(a.size() == 6);
  CHECK(a == b);
  CHECK(cached.weights == uncached.weights);
  CHECK(cached.weights != before.weights);
  // Only the head moved.
  for (const TrainParam& p : cached.params)
    if (cached.is_frozen(p))
      for (int64_t i = 0; i < p.numel(); ++i) REQUIRE(cached.weights[p.offset + i] == before.weights[p.offset + i]);
  {
    // --precision bf16 trains the head on the cache in bf16 (only the encoding stays fp32): its
    // weights leave fp32's.
    const TrainingGemmScope bf16(WeightType::BF16);
    o.cache_features = true;
    VitTrainModel half = before;
    VitTrainState sh;
    std::vector<double> h;
    train_detector(half, sh, data, processor, o, [&](const DetectorProgress& p) { h.push_back(p.loss); });
    REQUIRE(h.size() == a.size());
    // The first step's loss within 1% (bf16 moved it by 0.14% here); later steps drift apart at
    // this learning rate (the Hungarian matching amplifies small changes), so the check is
    // that the weights differ: before, a cached head ignored --precision and matched fp32 bit for bit.
    CHECK(std::abs(h[0] - a[0]) <= 0.01 * a[0]);
    CHECK(half.weights != cached.weights);

    // And the cache itself holds fp32 features: step 1's loss is the bf16 head's on the batch's
    // features encoded in fp32, bit for bit, and not its loss on features encoded in bf16 (which
    // differ, or this would prove nothing).
    const std::vector<size_t> idx = detector_batch_indices(data, o, 0);
    std::vector<DetectionTarget> targets;
    const Tensor x = detection_batch(data, idx, processor, o, 0, &targets);
    const int64_t gh = processor.height / before.config.patch_size, gw = processor.width / before.config.patch_size;
    const size_t per_batch = idx.size() * static_cast<size_t>(gh * gw * before.config.hidden_size);
    std::vector<float> f32(per_batch), f16(per_batch);
    DetrTrainActivations acts;
    {
      const TrainingGemmScope fp32(WeightType::F32);
      detr_encode_features(before, x, acts, f32.data());
    }
    detr_encode_features(before, x, acts, f16.data());
    REQUIRE(f32 != f16);
    auto first_loss = [&](const std::vector<float>& features) {
      VitTrainModel m = before;
      VitTrainState st;
      return detr_train_step_features(m, st, features.data(), static_cast<int64_t>(idx.size()), gh, gw, targets,
                                      o.step)
          .loss;
    };
    CHECK(first_loss(f32) == h[0]);
    CHECK(first_loss(f16) != h[0]);
  }
  // With augmentation, or a limit the cache does not fit, every batch is encoded again.
  o.cache_features = true, o.cache_limit_bytes = 10;
  CHECK(!detector_caches_features(cached, data, processor, o));
  o.cache_limit_bytes = 1e9, o.augment.enabled = true;
  CHECK(!detector_caches_features(cached, data, processor, o));
}

TEST_CASE("fine-tuning a detector on other classes gives it a new class head", "[detect_trainer]") {
  // YOLOS (transformers' own random folder: a 3-layer class MLP) and a vit-detr folder (a class
  // linear): the last class layer becomes [labels + 1, D], zero; everything else is kept.
  for (const char* dir : {"conformance/yolos-tiny-rand", "conformance/detr-vit-rand"}) {
    INFO(dir);
    const std::string path = std::string(TESSERA_FIXTURES) + "/" + dir;
    const VitTrainModel before = std::string(dir).find("yolos") != std::string::npos ? load_yolos_train_model(path)
                                                                                      : load_detr_train_model(path);
    VitTrainModel m = before;
    replace_detection_labels(m, {"N/A", "cat", "N/A", "dog"});
    CHECK(m.num_labels == 4);
    const std::string layer = m.is_detr() ? "class_labels_classifier." : "class_labels_classifier.layers.2.";
    const TrainParam& w = m.param(layer + "weight");
    CHECK(w.shape[0] == 5);
    for (int64_t i = 0; i < w.numel(); ++i) REQUIRE(m.weights[w.offset + i] == 0.0f);
    int kept = 0;
    for (const TrainParam& p : before.params) {
      if (p.name.starts_with(layer)) continue;
      const auto a = before.view(std::span<const float>(before.weights), p.name);
      const auto b = m.view(std::span<const float>(m.weights), p.name);
      REQUIRE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
      ++kept;
    }
    CHECK(kept > 20);
    // The folder it writes loads with the new labels and runs.
    const fs::path out = fs::temp_directory_path() / ("tessera-newhead-" + std::to_string(::getpid()));
    save_vit_train_model(m, out.string(), m.is_detr() ? detr_preprocessor_json(64, 64) : yolos_preprocessor_json(64, 64));
    const auto loaded = load_model(out.string());
    REQUIRE(loaded->detection);
    CHECK(loaded->labels == std::vector<std::string>{"N/A", "cat", "N/A", "dog"});
    fs::remove_all(out);
  }
}

TEST_CASE("tessera train --task detect publishes a folder that load_model and eval read", "[detect_trainer][cli]") {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  TempDir tmp;
  const std::string json = write_coco(tmp.path, 4, 32, 32);
  const fs::path out = tmp.path / "model";
  const std::string args = " train --task detect --data " + json + " --val " + json + " --out " + out.string() +
                           " --arch yolos-digits --image-size 32 --hidden-size 32 --heads 2 --layers 1 --batch 2"
                           " --epochs 2 --lr 1e-3 --seed 4 --threads 2";
  const int status = std::system((std::string(cli) + args + " >" + (tmp.path / "log").string() + " 2>&1").c_str());
  INFO(std::ifstream(tmp.path / "log").rdbuf());
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  for (const char* f : {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "log.csv", "val.csv"})
    CHECK(fs::exists(out / f));
  CHECK(!fs::exists(out / "checkpoint.safetensors"));
  const auto model = load_model(out.string());
  REQUIRE(model->detection);
  CHECK(model->labels == std::vector<std::string>{"N/A", "a", "b"});
  const CocoEvalResult r = evaluate_detector(*model, json);
  CHECK(r.ap() >= 0.0);
  // A bad data file is a one-line error before training.
  const int bad = std::system((std::string(cli) + " train --task detect --data " + (tmp.path / "missing.json").string() +
                               " --out " + (tmp.path / "bad").string() + " --arch yolos-digits >/dev/null 2>&1").c_str());
  CHECK(WIFEXITED(bad));
  CHECK(WEXITSTATUS(bad) != 0);
}

TEST_CASE("tessera train --task detect trains a DETR head, new or on a ViT classifier", "[detect_trainer][cli]") {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  TempDir tmp;
  const std::string json = write_coco(tmp.path, 4, 32, 32);
  auto run = [&](const std::string& args) {
    const int status = std::system((std::string(cli) + " train --task detect --data " + json + args + " >" +
                                    (tmp.path / "log").string() + " 2>&1").c_str());
    std::ifstream f(tmp.path / "log");
    const std::string log((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return std::make_pair(WIFEXITED(status) ? WEXITSTATUS(status) : -1, log);
  };
  // From scratch: the preset, shrunk, with the head's own options; the folder is a vit-detr one.
  const fs::path out = tmp.path / "detr";
  auto [code, log] = run(" --out " + out.string() + " --arch detr-digits --image-size 32 --hidden-size 32 --heads 2"
                         " --layers 1 --queries 4 --decoder-layers 2 --batch 2 --epochs 2 --lr 1e-3 --seed 4 --threads 2");
  INFO(log);
  REQUIRE(code == 0);
  CHECK(log.find("4 queries, 2 layers") != std::string::npos);
  CHECK(log.find("auxiliary loss") != std::string::npos);
  const auto model = load_model(out.string());
  REQUIRE(model->detection);
  CHECK(model->architecture == "VitDetrForObjectDetection");
  CHECK(model->labels == std::vector<std::string>{"N/A", "a", "b"});
  CHECK(evaluate_detector(*model, json).ap() >= 0.0);
  // The same with bf16 training GEMMs: it trains, and the published folder passes the export
  // check (the trainer's forward against load_model + model_forward, both fp32 there).
  const fs::path bf16 = tmp.path / "detr-bf16";
  std::tie(code, log) = run(" --out " + bf16.string() + " --arch detr-digits --image-size 32 --hidden-size 32 --heads 2"
                            " --layers 1 --queries 4 --decoder-layers 2 --batch 2 --epochs 2 --lr 1e-3 --seed 4 --threads 2"
                            " --precision bf16");
  CHECK(code == 0);
  CHECK(log.find("precision: bf16 GEMMs with fp32 sums") != std::string::npos);
  CHECK(log.find("export check") != std::string::npos);
  CHECK(load_model(bf16.string())->detection);
  // Fine-tuning that folder continues it (same head), and a ViT classifier gets a new head.
  const fs::path again = tmp.path / "again";
  std::tie(code, log) = run(" --out " + again.string() + " --init " + out.string() + " --batch 2 --max-steps 1 --threads 1");
  CHECK(code == 0);
  CHECK(load_model(again.string())->detection);
  const std::string vit = std::string(TESSERA_FIXTURES) + "/conformance/vit-tiny-rand";
  const fs::path on_vit = tmp.path / "on-vit";
  std::tie(code, log) = run(" --out " + on_vit.string() + " --init " + vit + " --image-size 32 --queries 3"
                            " --no-aux-loss --batch 2 --max-steps 2 --threads 1");
  CHECK(code == 0);
  const auto m2 = load_model(on_vit.string());
  REQUIRE(m2->detection);
  CHECK(m2->detection->num_slots == 3);
  CHECK(!m2->detection->norm_every_layer);
  // Other classes (the same images, categories renamed): a new class head, said on stderr.
  {
    nlohmann::json other = nlohmann::json::parse(std::ifstream(json));
    other["categories"] = {{{"id", 1}, {"name", "x"}}, {{"id", 2}, {"name", "y"}}, {{"id", 3}, {"name", "z"}}};
    const std::string other_json = (tmp.path / "other.json").string();
    std::ofstream(other_json) << other.dump();
    const fs::path renamed = tmp.path / "renamed";
    const int status = std::system((std::string(cli) + " train --task detect --data " + other_json + " --out " +
                                    renamed.string() + " --init " + out.string() + " --batch 2 --max-steps 1 --threads 1 >" +
                                    (tmp.path / "log2").string() + " 2>&1").c_str());
    std::ifstream f(tmp.path / "log2");
    const std::string log2((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    INFO(log2);
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK(log2.find("a new class head") != std::string::npos);
    CHECK(load_model(renamed.string())->labels == std::vector<std::string>{"N/A", "x", "y", "z"});
  }
  // A DINOv2 classifier's encoder under a new head: a vit-detr folder with a DINOv2 backbone.
  const fs::path on_dino = tmp.path / "on-dino";
  std::tie(code, log) = run(" --out " + on_dino.string() + " --init " + std::string(TESSERA_FIXTURES) +
                            "/models/dinov2-cls-rand --image-size 32 --queries 3 --batch 2 --max-steps 2 --threads 1");
  CHECK(code == 0);
  const auto m3 = load_model(on_dino.string());
  REQUIRE(m3->detection);
  CHECK(m3->detection->num_slots == 3);
  std::ifstream dino_config(on_dino / "config.json");
  const std::string dino_json((std::istreambuf_iterator<char>(dino_config)), std::istreambuf_iterator<char>());
  CHECK(dino_json.find("\"model_type\": \"dinov2\"") != std::string::npos);
  // A Segmenter's own (timm-layout) encoder under a new DETR head, frozen: its tensors reappear
  // under the Hugging Face ViT names of the vit-detr folder, value for value.
  const fs::path on_seg = tmp.path / "on-segmenter";
  const fs::path seg_dir = fs::path(TESSERA_FIXTURES) / "models" / "segmenter-linear-sizes-rand";
  std::tie(code, log) = run(" --out " + on_seg.string() + " --init " + seg_dir.string() +
                            " --image-size 64 --queries 3 --freeze-encoder --no-augment --batch 2 --max-steps 2 "
                            "--lr 1e-2 --threads 1");
  INFO(log);
  REQUIRE(code == 0);
  REQUIRE(load_model(on_seg.string())->detection);
  {
    const SafeTensors seg = SafeTensors::open((seg_dir / "model.safetensors").string());
    const SafeTensors det = SafeTensors::open((on_seg / "model.safetensors").string());
    auto same = [&](const std::string& a, const std::string& b, int64_t first_rows = -1) {
      INFO(a << " <-> " << b);
      const Tensor x = seg.read(a), y = det.read(b);
      const int64_t n = first_rows < 0 ? x.numel() : first_rows * x.dim(1);
      REQUIRE(y.numel() == n);
      CHECK(std::equal(y.data(), y.data() + n, x.data()));
    };
    same("encoder.patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight");
    same("encoder.cls_token", "vit.embeddings.cls_token");
    same("encoder.pos_embed", "vit.embeddings.position_embeddings");
    same("encoder.blocks.0.attn.qkv.weight", "vit.encoder.layer.0.attention.attention.query.weight", 64);
    same("encoder.blocks.1.mlp.fc2.weight", "vit.encoder.layer.1.output.dense.weight");
    same("encoder.norm.weight", "vit.layernorm.weight");
  }
  // The encoder keeps the pixel values it learned on: a folder with a processor of its own passes
  // its normalisation to the detector's processor (size and resampling the detector's); one
  // without (this fixture) gets DETR's ImageNet statistics.
  CHECK(nlohmann::json::parse(std::ifstream(on_seg / "preprocessor_config.json"))["image_mean"][0] == 0.485);
  {
    const fs::path seg_own = tmp.path / "segmenter-own-processor";
    fs::copy(seg_dir, seg_own, fs::copy_options::recursive);
    std::ofstream(seg_own / "preprocessor_config.json")
        << R"({"do_resize": false, "size": {"height": 64, "width": 64}, "do_rescale": true, "rescale_factor": 0.00392156862745098,
              "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})";
    const fs::path on_seg2 = tmp.path / "on-segmenter-own-processor";
    std::tie(code, log) = run(" --out " + on_seg2.string() + " --init " + seg_own.string() +
                              " --image-size 64 --queries 3 --freeze-encoder --no-augment --batch 2 --max-steps 1 --threads 1");
    INFO(log);
    REQUIRE(code == 0);
    const nlohmann::json pre = nlohmann::json::parse(std::ifstream(on_seg2 / "preprocessor_config.json"));
    CHECK(pre["image_mean"] == nlohmann::json({0.5, 0.5, 0.5}));
    CHECK(pre["image_std"] == nlohmann::json({0.5, 0.5, 0.5}));
    CHECK(pre["do_resize"] == true);
    CHECK(pre["size"]["height"] == 64);
    CHECK(log.find("normalize mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]") != std::string::npos);
  }
  // --freeze-encoder: the DETR head trains, every encoder tensor keeps its value.
  const fs::path frozen = tmp.path / "frozen";
  std::tie(code, log) = run(" --out " + frozen.string() + " --init " + out.string() +
                            " --freeze-encoder --batch 2 --max-steps 2 --lr 1e-2 --threads 1");
  REQUIRE(code == 0);
  const test::FrozenCount frozen_count = test::check_frozen(out, frozen, "vit.");
  CHECK(frozen_count.same > 10);
  CHECK(frozen_count.changed > 10);
  CHECK(run(" --out " + (tmp.path / "bad").string() + " --arch yolos-digits --image-size 32 --freeze-encoder").first != 0);
  // The head's options belong to a new DETR head only.
  std::tie(code, log) = run(" --out " + (tmp.path / "bad").string() + " --arch yolos-digits --queries 5");
  CHECK(code != 0);
  CHECK(log.find("new DETR head") != std::string::npos);

  // A windowed encoder: the Segmenter's 64x64 encoder on windows of the 96x96 input, frozen. The
  // folder says so (encoder_window; the backbone at the window's size, the processor at the
  // input's), the export check holds, and it fine-tunes at its processor's size.
  const fs::path windowed = tmp.path / "windowed";
  std::tie(code, log) = run(" --out " + windowed.string() + " --init " + seg_dir.string() +
                            " --image-size 96 --encoder-window 64 --encoder-window-stride 32 --queries 3 --freeze-encoder"
                            " --no-augment --batch 2 --max-steps 2 --lr 1e-2 --threads 1");
  INFO(log);
  REQUIRE(code == 0);
  CHECK(log.find("encoder on 64x64 windows every 32 pixels") != std::string::npos);
  CHECK(log.find("export check") != std::string::npos);
  {
    const nlohmann::json cfg = nlohmann::json::parse(std::ifstream(windowed / "config.json"));
    CHECK(cfg["encoder_window"] == nlohmann::json({{"size", 64}, {"stride", 32}}));
    CHECK(cfg["backbone_config"]["image_size"] == 64);
    CHECK(nlohmann::json::parse(std::ifstream(windowed / "preprocessor_config.json"))["size"]["height"] == 96);
    const auto m4 = load_model(windowed.string());
    REQUIRE(m4->detection);
    CHECK(m4->detection->window == 64);
    CHECK(m4->detection->window_stride == 32);
  }
  // info names the windows and counts FLOPs at the processor's size; detect --attention refuses it.
  auto cli_run = [&](const std::string& args) {
    const int status = std::system((std::string(cli) + " " + args + " >" + (tmp.path / "log3").string() + " 2>&1").c_str());
    std::ifstream f(tmp.path / "log3");
    const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return std::make_pair(WIFEXITED(status) ? WEXITSTATUS(status) : -1, text);
  };
  {
    const auto [icode, info] = cli_run("info " + windowed.string());
    INFO(info);
    CHECK(icode == 0);
    CHECK(info.find("on 64x64 windows every 32 pixels of the 96x96 input") != std::string::npos);
    CHECK(info.find("at 96x96") != std::string::npos);
    const fs::path image = tmp.path / "scene.png";
    cv::imwrite(image.string(), cv::Mat(40, 50, CV_8UC3, cv::Scalar(90, 120, 200)));
    const auto [dcode, det] = cli_run("detect --model " + windowed.string() + " --attention " +
                                      (tmp.path / "att").string() + " " + image.string());
    CHECK(dcode != 0);
    CHECK(det.find("reads the image in windows") != std::string::npos);
    CHECK(cli_run("detect --model " + windowed.string() + " " + image.string()).first == 0);
  }
  std::tie(code, log) = run(" --out " + (tmp.path / "windowed2").string() + " --init " + windowed.string() +
                            " --freeze-encoder --no-augment --batch 2 --max-steps 1 --threads 1");
  CHECK(code == 0);
  CHECK(log.find("96x96 patch 8") != std::string::npos);
  {
    // Centre-weighted merging and the folder's post-processing: written to config.json, the
    // export check holds through the inference path, and a fine-tuning run keeps both.
    const fs::path centre = tmp.path / "centre", again = tmp.path / "centre2";
    std::tie(code, log) = run(" --out " + centre.string() + " --init " + seg_dir.string() +
                              " --image-size 96 --encoder-window 64 --encoder-window-stride 32 --encoder-window-merge centre"
                              " --labels-per-query 2 --nms-iou 0.4 --queries 3 --freeze-encoder --no-augment --batch 2"
                              " --max-steps 2 --lr 1e-2 --threads 1");
    INFO(log);
    REQUIRE(code == 0);
    CHECK(log.find("merged by a centre-weighted mean") != std::string::npos);
    CHECK(log.find("export check: max |difference| of logits and boxes through load_model + model_forward 0.00e+00") !=
          std::string::npos);
    const nlohmann::json cfg = nlohmann::json::parse(std::ifstream(centre / "config.json"));
    CHECK(cfg["encoder_window"] == nlohmann::json({{"size", 64}, {"stride", 32}, {"merge", "centre"}}));
    CHECK(cfg["post_process"] == nlohmann::json({{"labels_per_query", 2}, {"nms_iou", 0.4}}));
    const auto m5 = load_model(centre.string());
    CHECK(m5->detection->window_centre);
    CHECK(m5->detection->post.labels_per_query == 2);
    // The centre merge changes what the head reads: the same model read by plain means differs.
    {
      nlohmann::json plain_cfg = cfg;
      plain_cfg["encoder_window"].erase("merge");
      const fs::path plain = tmp.path / "centre-as-mean";
      fs::copy(centre, plain, fs::copy_options::recursive);
      std::ofstream(plain / "config.json") << plain_cfg.dump(2);
      const auto m6 = load_model(plain.string());
      CHECK(!m6->detection->window_centre);
      Tensor x({1, 3, 96, 96});
      for (int64_t i = 0; i < x.numel(); ++i) x[i] = static_cast<float>(std::sin(0.37 * i));
      ModelWorkspace w5, w6;
      const NamedTensors a = model_forward(*m5, x, w5), b = model_forward(*m6, x, w6);
      float diff = 0;
      const Tensor &la = output(a, "logits"), &lb = output(b, "logits");
      for (int64_t i = 0; i < la.numel(); ++i) diff = std::max(diff, std::abs(la[i] - lb[i]));
      CHECK(diff > 1e-4f);
    }
    std::tie(code, log) = run(" --out " + again.string() + " --init " + centre.string() +
                              " --freeze-encoder --no-augment --batch 2 --max-steps 1 --threads 1");
    CHECK(code == 0);
    const nlohmann::json cfg2 = nlohmann::json::parse(std::ifstream(again / "config.json"));
    CHECK(cfg2["encoder_window"] == cfg["encoder_window"]);
    CHECK(cfg2["post_process"] == cfg["post_process"]);
    // --soft-nms-sigma replaces the folder's NMS IoU (one or the other), keeping its labels per query.
    std::tie(code, log) = run(" --out " + (tmp.path / "soft").string() + " --init " + centre.string() +
                              " --soft-nms-sigma 0.3 --freeze-encoder --no-augment --batch 2 --max-steps 1 --threads 1");
    CHECK(code == 0);
    CHECK(nlohmann::json::parse(std::ifstream(tmp.path / "soft" / "config.json"))["post_process"] ==
          nlohmann::json({{"labels_per_query", 2}, {"soft_nms_sigma", 0.3}}));
    CHECK(load_model((tmp.path / "soft").string())->detection->post.soft_nms_sigma == Approx(0.3f));
    // Post-processing flags belong to detection; the merge needs a window.
    std::tie(code, log) = run(" --out " + (tmp.path / "bad").string() + " --init " + seg_dir.string() +
                              " --image-size 96 --encoder-window-merge centre --freeze-encoder --batch 2 --max-steps 1");
    CHECK(code != 0);
    CHECK(log.find("--encoder-window-merge go with --encoder-window") != std::string::npos);
    std::tie(code, log) = run(" --out " + (tmp.path / "bad").string() + " --init " + seg_dir.string() +
                              " --image-size 96 --labels-per-query 20 --queries 3 --freeze-encoder --batch 2 --max-steps 1");
    CHECK(code != 0);
    CHECK(log.find("--labels-per-query 20 is more than the") != std::string::npos);
  }
  // It trains frozen only; the stride needs a window; the window fits the input.
  std::tie(code, log) = run(" --out " + (tmp.path / "bad").string() + " --init " + windowed.string() +
                            " --batch 2 --max-steps 1 --threads 1");
  CHECK(code != 0);
  CHECK(log.find("add --freeze-encoder") != std::string::npos);
  std::tie(code, log) = run(" --out " + (tmp.path / "bad").string() + " --init " + seg_dir.string() +
                            " --image-size 96 --encoder-window-stride 32 --freeze-encoder --batch 2 --max-steps 1");
  CHECK(code != 0);
  CHECK(log.find("--encoder-window-stride and --encoder-window-merge go with --encoder-window") != std::string::npos);
  std::tie(code, log) = run(" --out " + (tmp.path / "bad").string() + " --init " + seg_dir.string() +
                            " --image-size 48 --encoder-window 64 --freeze-encoder --batch 2 --max-steps 1");
  CHECK(code != 0);
  CHECK(log.find("at most the image size 48") != std::string::npos);
}
