// Detection: YOLOS and the DETR decoder head against their upstream fixtures (1e-4), Hugging
// Face's post_process_object_detection against its recorded results, batch independence of
// run_detector, `tessera infer` on a padded batch of photos, and `tessera detect` end to end.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <set>
#include <sstream>

#include "tessera/detection.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;
using json = nlohmann::json;

namespace {

constexpr float kTolerance = 1e-4f;  // float32 port vs float32 upstream (conformance README)

fs::path fixture(const std::string& rel) { return fs::path(TESSERA_FIXTURES) / rel; }

float max_abs_diff(const Tensor& a, const Tensor& b) {
  float m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

fs::path scratch(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("tessera_det_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

struct Run {
  int code;
  std::string out, err;
};

Run run_cli(const std::string& args) {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  fs::path dir = scratch("run");
  std::string cmd = std::string(cli) + " " + args + " >" + (dir / "out").string() + " 2>" +
                    (dir / "err").string();
  int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir / "out"), slurp(dir / "err")};
}

const char* kDetectors[] = {"conformance/yolos-tiny-rand", "conformance/detr-vit-rand"};

}  // namespace

TEST_CASE("detectors reproduce logits, pred_boxes and last_hidden_state of every case to 1e-4") {
  std::vector<fs::path> dirs = {fixture(kDetectors[0]), fixture(kDetectors[1])};
  for (const auto& e : fs::directory_iterator(fixture("models")))
    if (fs::exists(e.path() / "config.json")) {
      const std::string type = json::parse(slurp(e.path() / "config.json")).value("model_type", "");
      if (type == "yolos" || type == "vit-detr") dirs.push_back(e.path());
    }
  int cases = 0;
  for (const fs::path& dir : dirs) {
    INFO("model " << dir.string());
    auto model = load_model(dir.string());
    REQUIRE(model->family == ModelFamily::Detector);
    REQUIRE(model->detection);
    ModelWorkspace ws;  // one workspace across cases of different sizes
    for (const auto& c : fs::directory_iterator(dir / "cases")) {
      INFO("case " << c.path().filename().string());
      Tensor x = SafeTensors::open((c.path() / "inputs.safetensors").string()).get("pixel_values");
      SafeTensors expected = SafeTensors::open((c.path() / "expected.safetensors").string());
      NamedTensors out = model_forward(*model, x, ws);
      REQUIRE(out.size() == 3);
      CHECK(out[0].first == "logits");
      CHECK(out[1].first == "pred_boxes");
      for (const char* name : {"logits", "pred_boxes", "last_hidden_state"}) {
        INFO("output " << name);
        Tensor want = expected.get(name);
        const Tensor& got = output(out, name);
        REQUIRE(got.shape() == want.shape());
        CHECK(max_abs_diff(got, want) <= kTolerance);
      }
      ++cases;
    }
  }
  CHECK(cases >= 9);  // 3 + 1 conformance cases, 3 + 2 generated (mid position embeddings, DETR sizes)
}

TEST_CASE("the DETR sine position embedding follows DetrSinePositionEmbedding") {
  // Spot values worked out by hand from the transformers formula (normalize=True, scale 2π):
  // y_embed = (y+1)/(h+1e-6)·2π; channel 2i = sin(y_embed / 10000^(2i/half)), 2i+1 = cos(same).
  Tensor pos = detr_sine_position_embedding(2, 3, 8);
  REQUIRE(pos.shape() == Shape({6, 8}));
  const double two_pi = 2 * M_PI;
  for (int64_t y = 0; y < 2; ++y)
    for (int64_t x = 0; x < 3; ++x) {
      const double ye = (y + 1) / (2 + 1e-6) * two_pi, xe = (x + 1) / (3 + 1e-6) * two_pi;
      const float* row = pos.data() + (y * 3 + x) * 8;
      CHECK(row[0] == Approx(std::sin(ye)).margin(1e-6));
      CHECK(row[1] == Approx(std::cos(ye)).margin(1e-6));
      CHECK(row[2] == Approx(std::sin(ye / 100.0)).margin(1e-6));
      CHECK(row[3] == Approx(std::cos(ye / 100.0)).margin(1e-6));
      CHECK(row[4] == Approx(std::sin(xe)).margin(1e-6));
      CHECK(row[7] == Approx(std::cos(xe / 100.0)).margin(1e-6));
    }
}

TEST_CASE("post-processing reproduces Hugging Face post_process_object_detection") {
  fs::path dir = fixture(kDetectors[0]);
  auto model = load_model(dir.string());
  int checked = 0;
  for (const char* case_name : {"native", "interp_80x112", "e2e"}) {
    fs::path c = dir / "cases" / case_name;
    INFO("case " << case_name);
    json pp = json::parse(slurp(c / "post_process.json"));
    SafeTensors expected = SafeTensors::open((c / "expected.safetensors").string());
    Tensor x = SafeTensors::open((c / "inputs.safetensors").string()).get("pixel_values");
    ModelWorkspace ws;
    NamedTensors ours = model_forward(*model, x, ws);
    PostProcessOptions o;
    o.threshold = pp["threshold"].get<float>();
    // The rule on upstream's own outputs (tight), and on Tessera's (its 1e-4 carried through; in
    // pixels the box tolerance scales with the image size).
    for (bool from_upstream : {true, false}) {
      const Tensor logits = from_upstream ? expected.get("logits") : output(ours, "logits");
      const Tensor boxes = from_upstream ? expected.get("pred_boxes") : output(ours, "pred_boxes");
      const int64_t B = logits.dim(0), S = logits.dim(1), C = logits.dim(2);
      for (bool sized : {true, false}) {
        const json& want = pp[sized ? "with_target_sizes_f32" : "no_target_sizes_f32"];
        for (int64_t b = 0; b < B; ++b) {
          INFO("image " << b << (sized ? " with" : " without") << " target size"
                        << (from_upstream ? " (upstream outputs)" : " (Tessera outputs)"));
          const int64_t h = sized ? pp["target_sizes"][b][0].get<int64_t>() : 1;
          const int64_t w = sized ? pp["target_sizes"][b][1].get<int64_t>() : 1;
          auto dets = post_process_detections(logits.data() + b * S * C, boxes.data() + b * S * 4, S,
                                              C, w, h, model->labels, o);
          REQUIRE(dets.size() == want[b]["scores"].size());
          const float box_tol = (from_upstream ? 1e-5f : kTolerance) * static_cast<float>(std::max(w, h));
          for (size_t i = 0; i < dets.size(); ++i) {
            CHECK(dets[i].score == Approx(want[b]["scores"][i].get<float>()).margin(from_upstream ? 1e-6 : kTolerance));
            CHECK(dets[i].label == want[b]["labels"][i].get<int64_t>());
            CHECK(dets[i].slot == pp["kept_token_indices_f32"][b][i].get<int64_t>());
            const auto& bx = want[b]["boxes"][i];
            CHECK(std::abs(dets[i].x0 - bx[0].get<float>()) <= box_tol);
            CHECK(std::abs(dets[i].y0 - bx[1].get<float>()) <= box_tol);
            CHECK(std::abs(dets[i].x1 - bx[2].get<float>()) <= box_tol);
            CHECK(std::abs(dets[i].y1 - bx[3].get<float>()) <= box_tol);
            ++checked;
          }
        }
      }
    }
  }
  CHECK(checked >= 20);
}

TEST_CASE("post-processing options: top-k, class filter, class-wise NMS") {
  // Three slots, two classes + no-object. Slot 0 and 1 overlap (same class), slot 2 elsewhere.
  const float logits[] = {5, 0, 0,  4, 0, 0,  0, 3, 0};
  const float boxes[] = {0.5f, 0.5f, 0.2f, 0.2f,  0.51f, 0.5f, 0.2f, 0.2f,  0.1f, 0.1f, 0.1f, 0.1f};
  std::vector<std::string> labels = {"a", "b"};
  PostProcessOptions o;
  o.threshold = 0.5f;
  auto all = post_process_detections(logits, boxes, 3, 3, 100, 200, labels, o);
  REQUIRE(all.size() == 3);
  CHECK(all[0].slot == 0);  // slot order by default
  CHECK(all[0].x0 == Approx(40.0f));
  CHECK(all[0].y1 == Approx(120.0f));
  o.nms = true;
  auto nms = post_process_detections(logits, boxes, 3, 3, 100, 200, labels, o);
  REQUIRE(nms.size() == 2);
  CHECK(nms[0].slot == 0);
  CHECK(nms[1].slot == 2);
  o.nms = false;
  o.top_k = 1;
  auto top = post_process_detections(logits, boxes, 3, 3, 100, 200, labels, o);
  REQUIRE(top.size() == 1);
  CHECK(top[0].slot == 0);
  o.top_k = 0;
  o.classes = {1};
  auto only_b = post_process_detections(logits, boxes, 3, 3, 100, 200, labels, o);
  REQUIRE(only_b.size() == 1);
  CHECK(only_b[0].name == "b");
}

TEST_CASE("post-processing: several labels per query, each at its probability, then class-wise NMS") {
  // Two slots over three classes + no-object. Slot 0 is torn between classes 0 and 2; slot 1 sits
  // on the same place, sure of class 2.
  const float logits[] = {2, 0, 1.5f, 0,  0, 0, 4, 0};
  const float boxes[] = {0.5f, 0.5f, 0.2f, 0.2f,  0.5f, 0.5f, 0.2f, 0.2f};
  const std::vector<std::string> labels = {"a", "b", "c"};
  auto prob = [&](int slot, int cls) {
    double sum = 0;
    for (int i = 0; i < 4; ++i) sum += std::exp(static_cast<double>(logits[slot * 4 + i]));
    return static_cast<float>(std::exp(static_cast<double>(logits[slot * 4 + cls])) / sum);
  };
  PostProcessOptions o;
  o.threshold = 0.0f;
  o.labels_per_slot = 2;
  auto two = post_process_detections(logits, boxes, 2, 4, 100, 100, labels, o);
  // slot order, each slot's labels by probability: (0, a), (0, c), (1, c), (1, a or b: a tie, the lower id)
  REQUIRE(two.size() == 4);
  CHECK((two[0].slot == 0 && two[0].name == "a" && two[0].score == Approx(prob(0, 0))));
  CHECK((two[1].slot == 0 && two[1].name == "c" && two[1].score == Approx(prob(0, 2))));
  CHECK((two[2].slot == 1 && two[2].name == "c" && two[2].score == Approx(prob(1, 2))));
  CHECK((two[3].slot == 1 && two[3].name == "a" && two[3].score == Approx(prob(1, 0))));
  CHECK(two[1].x0 == two[0].x0);  // one box per slot
  // The threshold applies to each label: slot 0's second guess (p = 0.30) goes at 0.35.
  o.threshold = 0.35f;
  auto sure = post_process_detections(logits, boxes, 2, 4, 100, 100, labels, o);
  REQUIRE(sure.size() == 2);
  CHECK((sure[0].name == "a" && sure[1].name == "c" && sure[1].slot == 1));
  // Class-wise NMS: slot 0's "c" lies under slot 1's surer "c"; the two "a"s, one under the other.
  o.threshold = 0.0f;
  o.nms = true;
  auto kept = post_process_detections(logits, boxes, 2, 4, 100, 100, labels, o);
  REQUIRE(kept.size() == 2);
  CHECK((kept[0].slot == 1 && kept[0].name == "c"));
  CHECK((kept[1].slot == 0 && kept[1].name == "a"));
  // k beyond the classes is every class; k = 1 is Hugging Face's post-processing.
  o.nms = false;
  o.labels_per_slot = 10;
  CHECK(post_process_detections(logits, boxes, 2, 4, 100, 100, labels, o).size() == 6);
  o.labels_per_slot = 1;
  auto one = post_process_detections(logits, boxes, 2, 4, 100, 100, labels, o);
  REQUIRE(one.size() == 2);
  CHECK((one[0].name == "a" && one[1].name == "c"));
  // A label map's "N/A" gaps (COCO's) are no one's second guess; with one label per slot,
  // Hugging Face's argmax over every class stands.
  const std::vector<std::string> gaps = {"a", "N/A", "c"};
  o.labels_per_slot = 3;
  auto without = post_process_detections(logits, boxes, 2, 4, 100, 100, gaps, o);
  REQUIRE(without.size() == 4);
  for (const Detection& d : without) CHECK(d.name != "N/A");
}

TEST_CASE("post-processing: Gaussian soft-NMS lowers the scores of a class's overlapping boxes", "[detection]") {
  // Slots 0 and 1 say "a" on boxes of IoU 0.6 (100x100 image: [40,60]x[40,60] and [45,65]x[40,60],
  // 300 px² shared of 500); slot 2 says "b" on slot 0's box, another class, so left alone.
  const float logits[] = {3, 0, 0,  2, 0, 0,  0, 2.5f, 0};
  const float boxes[] = {0.5f, 0.5f, 0.2f, 0.2f,  0.55f, 0.5f, 0.2f, 0.2f,  0.5f, 0.5f, 0.2f, 0.2f};
  const std::vector<std::string> labels = {"a", "b"};
  auto prob = [](float top) { return std::exp(static_cast<double>(top)) / (std::exp(static_cast<double>(top)) + 2.0); };
  PostProcessOptions o;
  o.threshold = 0.0f;
  o.nms = true;
  o.soft_nms_sigma = 0.5f;
  auto soft = post_process_detections(logits, boxes, 3, 3, 100, 100, labels, o);
  REQUIRE(soft.size() == 3);
  CHECK((soft[0].slot == 0 && soft[0].score == Approx(prob(3)).epsilon(1e-5)));
  CHECK((soft[1].slot == 2 && soft[1].score == Approx(prob(2.5f)).epsilon(1e-5)));
  CHECK((soft[2].slot == 1 && soft[2].score == Approx(prob(2) * std::exp(-0.36 / 0.5)).epsilon(1e-4)));
  // What falls to the threshold goes (0.787 * 0.487 = 0.383 < 0.4); hard NMS at 0.5 drops it outright.
  o.threshold = 0.4f;
  CHECK(post_process_detections(logits, boxes, 3, 3, 100, 100, labels, o).size() == 2);
  o.threshold = 0.0f;
  o.soft_nms_sigma = 0.0f;
  o.nms_iou = 0.5f;
  auto hard = post_process_detections(logits, boxes, 3, 3, 100, 100, labels, o);
  REQUIRE(hard.size() == 2);
  CHECK((hard[0].slot == 0 && hard[1].slot == 2));
  // Without nms the sigma does nothing.
  o.nms = false;
  o.soft_nms_sigma = 0.5f;
  CHECK(post_process_detections(logits, boxes, 3, 3, 100, 100, labels, o).size() == 3);
}

TEST_CASE("a detector folder's post_process: read, used by default, errors name the file") {
  for (const char* dir : kDetectors) {
    INFO(dir);
    const fs::path copy = scratch("post") / "model";
    fs::copy(fixture(dir), copy, fs::copy_options::recursive);
    json cfg = json::parse(slurp(copy / "config.json"));
    {
      auto plain = load_model(copy.string());
      const PostProcessOptions o = model_post_process(*plain);
      CHECK(o.labels_per_slot == 1);
      CHECK(!o.nms);
    }
    cfg["post_process"] = {{"labels_per_query", 2}, {"nms_iou", 0.6}};
    std::ofstream(copy / "config.json") << cfg.dump(2);
    {
      auto m = load_model(copy.string());
      const PostProcessOptions o = model_post_process(*m);
      CHECK(o.labels_per_slot == 2);
      CHECK(o.nms);
      CHECK(o.nms_iou == Approx(0.6f));
      CHECK(o.soft_nms_sigma == 0.0f);
    }
    cfg["post_process"] = {{"labels_per_query", 3}, {"soft_nms_sigma", 0.3}};
    std::ofstream(copy / "config.json") << cfg.dump(2);
    {
      const PostProcessOptions o = model_post_process(*load_model(copy.string()));
      CHECK(o.labels_per_slot == 3);
      CHECK(o.nms);
      CHECK(o.soft_nms_sigma == Approx(0.3f));
    }
    const std::pair<json, const char*> bad[] = {
        {{{"labels_per_query", 0}}, "\"labels_per_query\" must be 1 to"},
        {{{"labels_per_query", 1000}}, "\"labels_per_query\" must be 1 to"},
        {{{"nms_iou", 1.5}}, "\"nms_iou\" must be in [0, 1]"},
        {{{"nms_iou", "high"}}, "\"nms_iou\" must be a number"},
        {{{"nms", true}}, "unknown field \"nms\""},
        {{{"soft_nms_sigma", -1}}, "\"soft_nms_sigma\" must be in [0, 100]"},
        {{{"soft_nms_sigma", 0.5}, {"nms_iou", 0.5}}, "not both"},
        {json(3), "\"post_process\" must be an object"}};
    for (const auto& [value, message] : bad) {
      INFO(value.dump());
      cfg["post_process"] = value;
      std::ofstream(copy / "config.json") << cfg.dump(2);
      try {
        load_model(copy.string());
        FAIL("loaded");
      } catch (const Error& e) {
        const std::string what = e.what();
        CHECK(what.find(message) != std::string::npos);
        CHECK(what.find("config.json") != std::string::npos);
      }
    }
  }
}

TEST_CASE("tessera detect follows the folder's post_process unless told otherwise") {
  // The DETR fixture with post_process asking 3 labels per query and NMS: detect's JSON holds
  // exactly what post_process gives with those options; --labels-per-query and --no-nms override.
  const fs::path copy = scratch("post_cli") / "model";
  fs::copy(fixture(kDetectors[1]), copy, fs::copy_options::recursive);
  json cfg = json::parse(slurp(copy / "config.json"));
  cfg["post_process"] = {{"labels_per_query", 3}, {"nms_iou", 0.3}};
  std::ofstream(copy / "config.json") << cfg.dump(2);
  const fs::path image = fixture(std::string(kDetectors[0]) + "/cases/e2e/images/0_chelsea.png");
  auto model = load_model(copy.string());
  ModelWorkspace ws;
  auto raw = run_detector(*model, model_preprocessor(*model), {load_image_rgb(image.string())}, ws);
  auto count = [&](const std::string& flags, PostProcessOptions o) {
    const fs::path js = scratch("post_cli_out") / "r.json";
    Run r = run_cli("detect --model " + copy.string() + " --threshold 0 " + flags + " --json " + js.string() + " " +
                    image.string());
    INFO(r.err);
    REQUIRE(r.code == 0);
    o.threshold = 0.0f;
    // the same detections as the library's, in its order: labels, scores (soft-NMS lowers them) and boxes
    const json got = json::parse(slurp(js));
    const std::vector<Detection> want = post_process(raw[0], model->labels, o);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      CHECK(got[i]["category_id"].get<int64_t>() == want[i].label);
      CHECK(got[i]["score"].get<double>() == Approx(want[i].score).epsilon(1e-5));
      CHECK(got[i]["bbox"][0].get<double>() == Approx(want[i].x0).margin(1e-3));
    }
    return got.size();
  };
  PostProcessOptions o = model_post_process(*model);
  const size_t folder = count("", o);
  PostProcessOptions plain;
  const size_t hf = count("--labels-per-query 1 --no-nms", plain);
  PostProcessOptions three = o;
  three.nms = false;
  const size_t no_nms = count("--no-nms", three);
  CHECK(no_nms == 3 * hf);  // threshold 0: every label of every slot
  CHECK(folder < no_nms);   // NMS at 0.3 drops some of the random model's overlapping boxes
  PostProcessOptions soft = o;
  soft.soft_nms_sigma = 0.5f;
  CHECK(count("--soft-nms 0.5", soft) == no_nms);  // soft-NMS lowers scores; at threshold 0 none go
  CHECK(count("--nms-iou 0", three) == no_nms);     // 0: no NMS, as "nms_iou": 0 in config.json
  PostProcessOptions wider = o;
  wider.nms_iou = 0.8f;
  count("--nms-iou 0.8", wider);
  // One suppression at a time.
  for (const char* both : {"--soft-nms 0.5 --nms-iou 0.5", "--soft-nms 0.5 --nms", "--no-nms --nms-iou 0.5",
                           "--no-nms --soft-nms 0.5"}) {
    INFO(both);
    const Run r = run_cli("detect --model " + copy.string() + " " + both + " " + image.string());
    CHECK(r.code != 0);
    CHECK(r.err.find("excludes") != std::string::npos);
  }
}

TEST_CASE("run_detector: an image's result does not depend on the other images in the batch") {
  auto model = load_model(fixture(kDetectors[0]).string());
  Preprocessor pre = Preprocessor::from_file(
      fixture(std::string(kDetectors[0]) + "/cases/e2e/preprocessor_config.json").string());
  std::vector<cv::Mat> photos;
  for (const auto& e : fs::directory_iterator(fixture(std::string(kDetectors[0]) + "/cases/e2e/images")))
    photos.push_back(load_image_rgb(e.path().string()));
  REQUIRE(photos.size() == 2);
  REQUIRE(photos[0].size() != photos[1].size());
  cv::Mat flipped;
  cv::flip(photos[0], flipped, 1);  // same size as photos[0]: shares its forward pass
  ModelWorkspace ws;
  auto alone0 = run_detector(*model, pre, {photos[0]}, ws);
  auto alone1 = run_detector(*model, pre, {photos[1]}, ws);
  auto mixed = run_detector(*model, pre, {photos[1], photos[0], flipped}, ws);
  REQUIRE(mixed.size() == 3);
  CHECK(max_abs_diff(mixed[1].logits, alone0[0].logits) == 0.0f);
  CHECK(max_abs_diff(mixed[1].boxes, alone0[0].boxes) == 0.0f);
  CHECK(max_abs_diff(mixed[0].logits, alone1[0].logits) == 0.0f);
  CHECK(max_abs_diff(mixed[0].boxes, alone1[0].boxes) == 0.0f);
  CHECK(mixed[1].width == photos[0].cols);
  CHECK(mixed[1].height == photos[0].rows);
  // Unpadded, the image's detections differ from the padded batch's (why infer pads and detect doesn't).
  SafeTensors padded = SafeTensors::open(
      fixture(std::string(kDetectors[0]) + "/cases/e2e/expected.safetensors").string());
  CHECK(max_abs_diff(alone1[0].logits, padded.get("logits").slice0(1, 2).reshape({10, 6})) > 1e-3f);
}

TEST_CASE("run_detector with the DETR head: same-size images share a pass, results unchanged") {
  auto model = load_model(fixture(kDetectors[1]).string());
  Preprocessor pre;  // keep the aspect ratio, so the two photos come out 64x96 and 85x64
  pre.config.resize_rule = ResizeRule::shortest_edge;
  pre.config.shortest_edge = 64;
  pre.config.image_mean = {0.485f, 0.456f, 0.406f};
  pre.config.image_std = {0.229f, 0.224f, 0.225f};
  std::vector<cv::Mat> photos;
  for (const char* name : {"0_chelsea.png", "1_coffee_portrait.png"})
    photos.push_back(load_image_rgb(
        fixture(std::string(kDetectors[0]) + "/cases/e2e/images/" + name).string()));
  ModelWorkspace ws;
  auto alone0 = run_detector(*model, pre, {photos[0]}, ws);
  auto alone1 = run_detector(*model, pre, {photos[1]}, ws);
  auto mixed = run_detector(*model, pre, {photos[0], photos[1], photos[0]}, ws);
  REQUIRE(mixed.size() == 3);
  REQUIRE(mixed[0].logits.shape() == Shape({10, 8}));
  for (int i : {0, 2}) {
    CHECK(max_abs_diff(mixed[i].logits, alone0[0].logits) == 0.0f);
    CHECK(max_abs_diff(mixed[i].boxes, alone0[0].boxes) == 0.0f);
  }
  CHECK(max_abs_diff(mixed[1].logits, alone1[0].logits) == 0.0f);
  CHECK(max_abs_diff(mixed[1].boxes, alone1[0].boxes) == 0.0f);
}

TEST_CASE("a model that is not a detector is refused with a clear message") {
  auto vit = load_model(fixture("conformance/vit-tiny-rand").string());
  REQUIRE_THROWS_WITH(require_detector(*vit), Catch::Contains("is not a detector"));
  Preprocessor pre = model_preprocessor(*vit);
  ModelWorkspace ws;
  cv::Mat img(32, 32, CV_8UC3, cv::Scalar(1, 2, 3));
  REQUIRE_THROWS_WITH(run_detector(*vit, pre, {img}, ws), Catch::Contains("not a detector"));
}

TEST_CASE("tessera infer on photos pads the batch as the YOLOS processor does") {
  fs::path c = fixture(std::string(kDetectors[0]) + "/cases/e2e");
  fs::path out = scratch("infer") / "out.safetensors";
  Run r = run_cli("infer --model " + fixture(kDetectors[0]).string() + " --processor " +
                  (c / "preprocessor_config.json").string() + " " + (c / "images/0_chelsea.png").string() +
                  " " + (c / "images/1_coffee_portrait.png").string() + " --outputs " + out.string());
  INFO(r.err);
  REQUIRE(r.code == 0);
  SafeTensors got = SafeTensors::open(out.string());
  SafeTensors expected = SafeTensors::open((c / "expected.safetensors").string());
  Tensor px = SafeTensors::open((c / "inputs.safetensors").string()).get("pixel_values");
  REQUIRE(got.get("pixel_values").shape() == px.shape());
  CHECK(max_abs_diff(got.get("pixel_values"), px) <= 1e-5f);
  for (const char* name : {"logits", "pred_boxes", "last_hidden_state"}) {
    INFO(name);
    REQUIRE(got.get(name).shape() == expected.get(name).shape());
    CHECK(max_abs_diff(got.get(name), expected.get(name)) <= kTolerance);
  }
}

TEST_CASE("tessera detect: annotated images, COCO JSON, a bad image mid-folder") {
  fs::path in = scratch("detect_in");
  fs::path photos = fixture(std::string(kDetectors[0]) + "/cases/e2e/images");
  fs::copy_file(photos / "0_chelsea.png", in / "a.png");
  { std::ofstream(in / "b.png") << "not a png"; }  // decodes badly, mid-folder
  fs::create_directories(in / "sub");
  fs::copy_file(photos / "1_coffee_portrait.png", in / "sub" / "c.png");
  fs::path out = scratch("detect_out"), js = out / "results.json";
  const fs::path proc = fixture(std::string(kDetectors[0]) + "/cases/e2e/preprocessor_config.json");
  Run r = run_cli("detect --model " + fixture(kDetectors[0]).string() + " --processor " + proc.string() +
                  " --threshold 0.2 --out " +
                  (out / "img").string() + " --json " + js.string() + " " + in.string());
  INFO(r.out << r.err);
  CHECK(r.code == 1);  // one image failed
  CHECK(r.err.find("b.png") != std::string::npos);
  CHECK(r.out.find("a.png") != std::string::npos);
  CHECK(r.out.find("c.png") != std::string::npos);
  cv::Mat a = cv::imread((out / "img" / "a.png").string());
  cv::Mat c = cv::imread((out / "img" / "sub" / "c.png").string());
  REQUIRE(!a.empty());
  REQUIRE(!c.empty());
  CHECK(a.size() == cv::imread((photos / "0_chelsea.png").string()).size());
  CHECK(c.size() == cv::imread((photos / "1_coffee_portrait.png").string()).size());
  CHECK(!fs::exists(out / "img" / "b.png"));
  json results = json::parse(slurp(js));
  REQUIRE(results.is_array());
  REQUIRE(!results.empty());  // threshold 0.2 keeps some of the random model's slots
  std::set<int64_t> ids;
  for (const auto& d : results) {
    ids.insert(d.at("image_id").get<int64_t>());
    CHECK(d.at("category_id").get<int64_t>() >= 0);
    CHECK(d.at("category_id").get<int64_t>() < 5);
    REQUIRE(d.at("bbox").size() == 4);
    CHECK(d.at("score").get<double>() > 0.2);
  }
  CHECK(ids.count(1) == 0);  // image 1 (b.png) failed
  // The same detections as the library's run_detector + post_process for a.png.
  auto model = load_model(fixture(kDetectors[0]).string());
  ModelWorkspace ws;
  auto raw = run_detector(*model, Preprocessor::from_file(proc.string()),
                          {load_image_rgb((in / "a.png").string())}, ws);
  PostProcessOptions o;
  o.threshold = 0.2f;
  auto dets = post_process(raw[0], model->labels, o);
  size_t n0 = 0;
  for (const auto& d : results) n0 += d["image_id"] == 0;
  CHECK(n0 == dets.size());
}

TEST_CASE("tessera detect refuses a model that is not a detector") {
  Run r = run_cli("detect --model " + fixture("conformance/vit-tiny-rand").string() + " " +
                  (fixture(std::string(kDetectors[0]) + "/cases/e2e/images/0_chelsea.png")).string());
  CHECK(r.code == 1);
  CHECK(r.err.find("is not a detector") != std::string::npos);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}
