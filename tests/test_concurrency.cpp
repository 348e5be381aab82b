// One loaded model, many callers: 8 threads of the C++ API share each Model (const after
// load_model) and each use their own ModelWorkspace, images and batch sizes; every result must be
// bit-identical to the same call made alone. (Run it under the tsan preset for data races.)
#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <random>
#include <thread>

#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

struct Call {
  const Model* model;
  Tensor pixels;
  NamedTensors alone;  // the answer computed single-threaded first
};

Tensor random_pixels(int64_t b, int64_t h, int64_t w, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0, 1);
  Tensor t({b, 3, h, w});
  for (float& v : t.span()) v = n(rng);
  return t;
}

bool identical(const NamedTensors& a, const NamedTensors& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first || a[i].second.shape() != b[i].second.shape()) return false;
    for (int64_t k = 0; k < a[i].second.numel(); ++k)
      if (a[i].second[k] != b[i].second[k]) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("8 threads share loaded models; every result equals the single-threaded one", "[concurrency]") {
  const fs::path fx(TESSERA_FIXTURES);
  std::vector<std::shared_ptr<const Model>> models = {
      load_model((fx / "conformance/vit-tiny-rand").string()), load_model((fx / "conformance/dinov2-small-rand").string()),
      load_model((fx / "conformance/detr-vit-rand").string()), load_model((fx / "conformance/segmenter-linear-rand").string()),
      load_model((fx / "conformance/vit-tiny-rand").string(), WeightType::BF16)};
  // Calls of several batch sizes and input sizes per model (sizes the models interpolate to).
  std::vector<Call> calls;
  uint32_t seed = 1;
  for (const auto& m : models)
    for (int64_t b : {1, 3})
      for (int64_t side : {32, 48}) calls.push_back({m.get(), random_pixels(b, side, side + 16, seed++), {}});
  for (Call& c : calls) {
    ModelWorkspace ws;
    c.alone = model_forward(*c.model, c.pixels, ws);
  }
  constexpr int kThreads = 8, kRounds = 6;
  std::atomic<int> mismatches{0}, errors{0}, done{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ModelWorkspace ws;  // per caller, reused across its calls of different shapes
      for (int r = 0; r < kRounds; ++r)
        for (size_t k = 0; k < calls.size(); ++k) {
          const Call& c = calls[(k * 7 + static_cast<size_t>(t) * 3 + static_cast<size_t>(r)) % calls.size()];
          try {
            if (!identical(model_forward(*c.model, c.pixels, ws), c.alone)) ++mismatches;
          } catch (...) {
            ++errors;
          }
          ++done;
        }
    });
  for (auto& th : threads) th.join();
  CHECK(done == kThreads * kRounds * static_cast<int>(calls.size()));
  CHECK(errors == 0);
  CHECK(mismatches == 0);
}

TEST_CASE("one workspace serves several models of the same input shape", "[concurrency]") {
  // A workspace used to be keyed on (batch, height, width) alone: a second model at the same
  // shape reused the first one's buffers and position table (wrong answers, or a heap overflow
  // when its widths were larger). It is keyed on the weights now.
  const fs::path fx(TESSERA_FIXTURES);
  const auto a = load_model((fx / "conformance/vit-tiny-rand").string());
  const auto b = load_model((fx / "conformance/dinov2-small-rand").string());
  const auto d = load_model((fx / "conformance/detr-vit-rand").string());
  const auto d2 = load_model((fx / "models/detr-vit-conv-rand").string());
  const Tensor x = random_pixels(2, 56, 56, 7);
  ModelWorkspace shared;
  for (const auto& m : {a, b, d, d2, a}) {
    ModelWorkspace fresh;
    CHECK(identical(model_forward(*m, x, shared), model_forward(*m, x, fresh)));
  }
}
