// Does Tessera's DETR head learn fast when its features are perfect? An experiment for issue 15:
// the head (detr_train.hpp, frozen encoder, cached features) trained on "oracle" features made from
// the scenes' ground-truth masks (each patch's row: the fraction of its pixels of each of the 11
// classes, the rest zero), then COCO-evaluated on other scenes after every epoch. If the head
// reaches a high AP50 quickly here, the features are what holds the real detector back; if not, the
// head's training is (a bug, or DETR's slow convergence). `--dump DIR` writes the features and
// targets for bench/detr_oracle.py, which trains the same head in PyTorch on the same data.
// Build (after cmake --build build):
//   g++ -O2 -std=c++20 -march=native -Icore/include -Ivision/include $(pkg-config --cflags opencv4) \
//     bench/detr_oracle.cpp build/vision/libtessera_vision.a build/core/libtessera_core.a \
//     $(pkg-config --libs opencv4) -ltbb -lpthread -ldl -o build/detr_oracle
// Usage: build/detr_oracle TRAIN_SCENES VAL_SCENES [key=value ...]
//   size=128 patch=4 epochs=12 batch=32 lr=2e-3 queries=20 layers=3 d=128 warmup=100 threads=all
//   noise=0 (Gaussian noise added to the features) scale=3 (the fractions' scale)
//   box=0 (1: a patch inside a digit's box also carries a flag and that box: what an encoder trained
//   with a dense box loss could say)
//   parts=0 (1: a patch inside a digit's box carries that digit (one-hot) and which ninth of the box
//   it is in (3x3, one-hot): what a segmenter of box parts could say)
//   dump=DIR (write the features, targets and initial model for bench/detr_oracle.py; no training)
//   pos=0 (1: each row also carries its patch's position: x, y and sin/cos of 2^k·2πx, 2^k·2πy, k < 4)
#include <opencv2/imgcodecs.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "tessera/detect_trainer.hpp"
#include "tessera/detr_train.hpp"
#include "tessera/metrics.hpp"
#include "tessera/optim.hpp"
#include "tessera/parallel.hpp"

using namespace tessera;
namespace fs = std::filesystem;

struct Split {
  DetectionData data;
  CocoDataset coco;
  std::vector<float> features;  // [n, gh*gw, denc]
};

static Split load_split(const std::string& dir, int64_t size, int64_t patch, int64_t denc, float scale, float noise,
                        bool with_pos, bool with_box, bool with_parts, uint64_t seed) {
  Split s;
  const std::string json = dir + "/annotations.json";
  s.data = load_detection_data(json);
  s.coco = load_coco_instances(json);
  const int64_t g = size / patch, n = static_cast<int64_t>(s.data.size());
  s.features.assign(static_cast<size_t>(n * g * g * denc), 0.0f);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> normal(0.0f, noise > 0 ? noise : 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    const fs::path img = s.data.paths[static_cast<size_t>(i)];
    const fs::path mask_path = img.parent_path().parent_path() / "masks" / img.filename();
    const cv::Mat mask = cv::imread(mask_path.string(), cv::IMREAD_UNCHANGED);
    if (mask.empty() || mask.type() != CV_8UC1) {
      std::fprintf(stderr, "%s: not an 8-bit single-channel mask\n", mask_path.c_str());
      std::exit(1);
    }
    const int H = mask.rows, W = mask.cols;
    float* f = s.features.data() + i * g * g * denc;
    for (int64_t gy = 0; gy < g; ++gy)
      for (int64_t gx = 0; gx < g; ++gx) {
        const int y0 = static_cast<int>(gy * H / g), y1 = std::max(y0 + 1, static_cast<int>((gy + 1) * H / g));
        const int x0 = static_cast<int>(gx * W / g), x1 = std::max(x0 + 1, static_cast<int>((gx + 1) * W / g));
        float hist[11] = {};
        for (int y = y0; y < std::min(y1, H); ++y)
          for (int x = x0; x < std::min(x1, W); ++x) hist[std::min<int>(mask.at<uint8_t>(y, x), 10)] += 1.0f;
        const float total = static_cast<float>((std::min(y1, H) - y0) * (std::min(x1, W) - x0));
        float* row = f + (gy * g + gx) * denc;
        for (int c = 0; c < 11; ++c) row[c] = scale * hist[c] / total;
        const float px = (static_cast<float>(gx) + 0.5f) / static_cast<float>(g);  // the patch's centre
        const float py = (static_cast<float>(gy) + 0.5f) / static_cast<float>(g);
        if (with_box) {  // the box (cx, cy, w, h) of the digit whose box holds this patch's centre
          for (const auto& b : s.data.targets[static_cast<size_t>(i)].boxes)
            if (std::fabs(px - b[0]) <= b[2] / 2 && std::fabs(py - b[1]) <= b[3] / 2) {
              row[29] = scale;
              for (int c = 0; c < 4; ++c) row[30 + c] = scale * b[c];
            }
        }
        if (with_parts) {  // a segmenter of box parts could say: the digit whose box holds the patch's
                           // centre (one-hot) and which ninth of that box (3x3, one-hot)
          const DetectionTarget& t = s.data.targets[static_cast<size_t>(i)];
          for (size_t j = 0; j < t.boxes.size(); ++j) {
            const auto& b = t.boxes[j];
            const float u = (px - (b[0] - b[2] / 2)) / b[2], v = (py - (b[1] - b[3] / 2)) / b[3];
            if (u < 0 || u > 1 || v < 0 || v > 1) continue;
            const int64_t digit = t.labels[j] - 1;  // category d + 1 is digit d
            if (digit >= 0 && digit < 10) row[34 + digit] = scale;
            const int pu = std::min(2, static_cast<int>(u * 3)), pv = std::min(2, static_cast<int>(v * 3));
            row[44 + pv * 3 + pu] = scale;
          }
        }
        if (with_pos) {  // what a ViT token keeps of its position embedding: the patch's own place
          row[11] = px, row[12] = py;
          for (int k = 0; k < 4; ++k) {
            const float w = 2.0f * static_cast<float>(M_PI) * static_cast<float>(1 << k);
            row[13 + 4 * k] = std::sin(w * px), row[14 + 4 * k] = std::cos(w * px);
            row[15 + 4 * k] = std::sin(w * py), row[16 + 4 * k] = std::cos(w * py);
          }
        }
        if (noise > 0)
          for (int64_t c = 0; c < denc; ++c) row[c] += normal(rng);
      }
  }
  return s;
}

static CocoEvalResult evaluate(const VitTrainModel& model, Split& s, int64_t g, int64_t denc, int64_t batch) {
  DetrTrainActivations acts;
  std::vector<CocoObject> dt;
  const int64_t n = static_cast<int64_t>(s.data.size()), K = model.num_labels;
  for (int64_t i0 = 0; i0 < n; i0 += batch) {
    const int64_t b = std::min(batch, n - i0);
    detr_train_forward_features(model, s.features.data() + i0 * g * g * denc, b, g, g, acts);
    const auto& head = acts.heads.back();
    const int64_t Q = static_cast<int64_t>(head.logits.size()) / (b * (K + 1));
    for (int64_t j = 0; j < b; ++j) {
      const CocoImage& im = s.coco.images[static_cast<size_t>(i0 + j)];
      for (int64_t q = 0; q < Q; ++q) {
        const float* lg = head.logits.data() + (j * Q + q) * (K + 1);
        const float mx = *std::max_element(lg, lg + K + 1);
        double sum = 0;
        for (int64_t c = 0; c <= K; ++c) sum += std::exp(lg[c] - mx);
        int64_t best = 0;
        for (int64_t c = 1; c < K; ++c)
          if (lg[c] > lg[best]) best = c;
        const float* bx = head.boxes.data() + (j * Q + q) * 4;
        CocoObject o;
        o.image_id = im.id, o.category_id = best;
        o.score = std::exp(lg[best] - mx) / sum;
        o.w = bx[2] * im.width, o.h = bx[3] * im.height;
        o.x = bx[0] * im.width - o.w / 2, o.y = bx[1] * im.height - o.h / 2;
        o.area = o.w * o.h;
        dt.push_back(o);
      }
    }
  }
  std::vector<int64_t> ids, cats;
  for (const auto& im : s.coco.images) ids.push_back(im.id);
  for (const auto& c : s.coco.categories) cats.push_back(c.id);
  return coco_evaluate(ids, cats, s.coco.annotations, dt);
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: detr_oracle TRAIN_SCENES VAL_SCENES [key=value ...]\n");
    return 2;
  }
  std::map<std::string, std::string> kv;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    const auto eq = a.find('=');
    kv[a.substr(0, eq)] = eq == std::string::npos ? "1" : a.substr(eq + 1);
  }
  auto num = [&](const char* k, double d) { return kv.count(k) ? std::stod(kv[k]) : d; };
  const int64_t size = static_cast<int64_t>(num("size", 128)), patch = static_cast<int64_t>(num("patch", 4));
  const int64_t epochs = static_cast<int64_t>(num("epochs", 12)), batch = static_cast<int64_t>(num("batch", 32));
  const int64_t warmup = static_cast<int64_t>(num("warmup", 100)), denc = 64, g = size / patch;
  if (kv.count("threads")) set_num_threads(std::stoi(kv["threads"]));
  DetrHeadConfig hc;
  hc.queries = static_cast<int64_t>(num("queries", 20));
  hc.layers = static_cast<int64_t>(num("layers", 3));
  hc.d_model = static_cast<int64_t>(num("d", 128));
  hc.ffn = 2 * hc.d_model;
  const float scale = static_cast<float>(num("scale", 3)), noise = static_cast<float>(num("noise", 0));
  const bool with_pos = num("pos", 0) != 0, with_box = num("box", 0) != 0, with_parts = num("parts", 0) != 0;
  const auto t0 = std::chrono::steady_clock::now();
  Split train = load_split(argv[1], size, patch, denc, scale, noise, with_pos, with_box, with_parts, 1);
  Split val = load_split(argv[2], size, patch, denc, scale, noise, with_pos, with_box, with_parts, 2);
  std::printf("features: %zu train, %zu val scenes, grid %lldx%lld (%.1f s)\n", train.data.size(), val.data.size(),
              static_cast<long long>(g), static_cast<long long>(g),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  VitConfig enc;
  enc.image_height = enc.image_width = size;
  enc.patch_size = patch, enc.hidden_size = denc, enc.num_hidden_layers = 1, enc.num_attention_heads = 1;
  enc.intermediate_size = denc;
  VitTrainModel model = make_detr_train_model(enc, hc, train.data.labels, 1);
  model.frozen_encoder = true;
  if (kv.count("dump")) {  // the data and the initial model for bench/detr_oracle.py, then stop
    const std::string dir = kv["dump"];
    fs::create_directories(dir);
    save_vit_train_model(model, dir + "/init", detr_preprocessor_json(size, size));
    for (const auto* sp : {&train, &val}) {
      const std::string name = sp == &train ? "train" : "val";
      std::ofstream f(dir + "/" + name + ".f32", std::ios::binary);
      f.write(reinterpret_cast<const char*>(sp->features.data()),
              static_cast<std::streamsize>(sp->features.size() * sizeof(float)));
      std::ofstream t(dir + "/" + name + "_targets.txt");  // per image: n, then n lines "label cx cy w h"
      t.precision(9);
      for (const DetectionTarget& tg : sp->data.targets) {
        t << tg.labels.size() << "\n";
        for (size_t j = 0; j < tg.labels.size(); ++j)
          t << tg.labels[j] << " " << tg.boxes[j][0] << " " << tg.boxes[j][1] << " " << tg.boxes[j][2] << " "
            << tg.boxes[j][3] << "\n";
      }
    }
    std::printf("dumped to %s (grid %lld, denc %lld, %lld labels)\n", dir.c_str(), static_cast<long long>(g),
                static_cast<long long>(denc), static_cast<long long>(model.num_labels));
    return 0;
  }
  VitTrainState state;
  TrainStepOptions opt;
  opt.optimizer = Optimizer::AdamW;
  opt.weight_decay = static_cast<float>(num("wd", 1e-4));
  opt.clip_grad = static_cast<float>(num("clip", 0.1));
  const double peak = num("lr", 2e-3);
  const int64_t n = static_cast<int64_t>(train.data.size()), per_epoch = n / batch, total = per_epoch * epochs;
  const int64_t per_image = g * g * denc;
  std::vector<float> feats(static_cast<size_t>(batch * per_image));
  std::vector<size_t> order(static_cast<size_t>(n));
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937 rng(7);
  for (int64_t e = 0; e < epochs; ++e) {
    std::shuffle(order.begin(), order.end(), rng);
    double cls = 0, l1 = 0, giou = 0;
    int64_t matched = 0, correct = 0;
    for (int64_t s = 0; s < per_epoch; ++s) {
      std::vector<DetectionTarget> targets;
      for (int64_t j = 0; j < batch; ++j) {
        const size_t idx = order[static_cast<size_t>(s * batch + j)];
        std::copy_n(train.features.data() + static_cast<int64_t>(idx) * per_image, per_image,
                    feats.data() + j * per_image);
        targets.push_back(train.data.targets[idx]);
      }
      opt.lr = static_cast<float>(warmup_cosine_lr(e * per_epoch + s, total, warmup, peak, 1e-5));
      SetLossResult detail;
      const TrainStepResult r = detr_train_step_features(model, state, feats.data(), batch, g, g, targets, opt, &detail);
      cls += detail.layers.back().class_loss, l1 += detail.layers.back().l1_loss, giou += detail.layers.back().giou_loss;
      for (const auto& m : detail.layers.back().matches) matched += static_cast<int64_t>(m.size());
      correct += r.correct;
    }
    const CocoEvalResult ev = evaluate(model, val, g, denc, batch);
    std::printf("epoch %2lld  class %.3f  l1 %.3f  giou %.3f  matched-correct %.1f%%  val mAP %.3f AP50 %.3f AP75 %.3f"
                "  (%.0f s)\n",
                static_cast<long long>(e + 1), cls / per_epoch, l1 / per_epoch, giou / per_epoch,
                100.0 * static_cast<double>(correct) / std::max<int64_t>(1, matched), ev.ap(), ev.ap50(), ev.ap75(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::fflush(stdout);
  }
  return 0;
}
