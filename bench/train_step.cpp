// One training step of the new engine (vision/include/tessera/vit_train.hpp): forward, mean
// cross-entropy + backward, AdamW, on random pixels through a new model of an --arch preset, timed
// per phase (median of `steps` after one warm-up step).
// Build (after cmake --build build):
//   g++ -O2 -std=c++20 -march=native -Icore/include -Ivision/include $(pkg-config --cflags opencv4) \
//     bench/train_step.cpp build/vision/libtessera_vision.a build/core/libtessera_core.a \
//     $(pkg-config --libs opencv4) -ltbb -lpthread -ldl -o build/train_step
// Usage: build/train_step [arch=vit-ti16] [image=224] [batch=8] [threads=all] [steps=3] [labels=1000]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "tessera/backward.hpp"
#include "tessera/parallel.hpp"
#include "tessera/vit_train.hpp"

using namespace tessera;
using clk = std::chrono::steady_clock;

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  const std::string arch = argc > 1 ? argv[1] : "vit-ti16";
  const int64_t image = argc > 2 ? std::atoll(argv[2]) : 224, batch = argc > 3 ? std::atoll(argv[3]) : 8;
  if (argc > 4) set_num_threads(std::atoi(argv[4]));
  const int steps = argc > 5 ? std::atoi(argv[5]) : 3;
  const int64_t classes = argc > 6 ? std::atoll(argv[6]) : 1000;
  const VitConfig c = vit_train_preset(arch, image);
  VitTrainModel model = make_vit_train_model(c, std::vector<std::string>(classes, "x"), 1);
  Tensor pixels({batch, 3, image, image});
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < pixels.numel(); ++i) pixels[i] = normal(rng);
  std::vector<int64_t> labels(batch);
  for (int64_t i = 0; i < batch; ++i) labels[i] = i % classes;
  std::vector<float> grads(model.weights.size()), m(grads.size()), v(grads.size()), dlogits;
  VitTrainActivations acts;
  AdamWOptions adamw;
  std::vector<double> tf, tb, to;
  for (int s = 0; s <= steps; ++s) {
    std::fill(grads.begin(), grads.end(), 0.0f);
    const auto t0 = clk::now();
    const auto logits = vit_train_forward(model, pixels, acts);
    const auto t1 = clk::now();
    dlogits.assign(static_cast<size_t>(batch * classes), 0.0f);
    cross_entropy_forward_backward(logits.data(), labels.data(), batch, classes, 0.0f, dlogits.data());
    vit_train_backward(model, acts, dlogits.data(), grads);
    const auto t2 = clk::now();
    vit_train_adamw_step(model, grads, m, v, s + 1, adamw);
    const auto t3 = clk::now();
    if (s == 0) continue;  // warm-up
    tf.push_back(std::chrono::duration<double>(t1 - t0).count());
    tb.push_back(std::chrono::duration<double>(t2 - t1).count());
    to.push_back(std::chrono::duration<double>(t3 - t2).count());
  }
  const double f = median(tf), b = median(tb), o = median(to);
  std::printf("%s %lldx%lld, batch %lld, %d threads, %zu parameters: forward %.0f ms, backward %.0f ms, "
              "AdamW %.1f ms; %.2f images/s, %.1f GFLOP/s (3x the forward's FLOPs)\n",
              arch.c_str(), (long long)image, (long long)image, (long long)batch, num_threads(),
              model.weights.size(), 1e3 * f, 1e3 * b, 1e3 * o, batch / (f + b + o),
              3 * batch * vit_flops(c, image, image) / (f + b + o) / 1e9);
}
