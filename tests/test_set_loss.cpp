// The DETR / YOLOS set loss against transformers 4.40's, ported line by line in
// tests/reference/make_set_loss_fixtures.py (PyTorch autograd, scipy's linear_sum_assignment):
// loss and terms to 1e-5 relative, matches exactly, gradients to 1e-5 of the largest entry;
// plus the assignment against brute force and GIoU's gradient against finite differences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>

#include "tessera/safetensors.hpp"
#include "tessera/segmentation_loss.hpp"
#include "tessera/set_loss.hpp"

namespace fs = std::filesystem;
using namespace tessera;

TEST_CASE("set loss: linear_sum_assignment is optimal (brute force) and scipy-shaped", "[set_loss]") {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(-1, 1);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{4, 4}, {6, 3}, {3, 6}, {1, 5}, {5, 1}, {7, 7}}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<double> cost(static_cast<size_t>(rows * cols));
      for (double& c : cost) c = u(rng);
      const auto got = linear_sum_assignment(cost, rows, cols);
      REQUIRE(static_cast<int64_t>(got.size()) == std::min(rows, cols));
      double got_cost = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        got_cost += cost[got[i].first * cols + got[i].second];
        if (i) CHECK(got[i].first > got[i - 1].first);  // sorted by row, distinct
      }
      // Brute force over every injection of the smaller side into the larger.
      const int64_t n = std::min(rows, cols), m = std::max(rows, cols);
      std::vector<int64_t> perm(static_cast<size_t>(m));
      std::iota(perm.begin(), perm.end(), 0);
      double best = INFINITY;
      do {
        double s = 0;
        for (int64_t i = 0; i < n; ++i) s += rows <= cols ? cost[i * cols + perm[i]] : cost[perm[i] * cols + i];
        best = std::min(best, s);
      } while (std::next_permutation(perm.begin(), perm.end()));
      CHECK(got_cost == Approx(best).margin(1e-12));
    }
  }
  CHECK(linear_sum_assignment({}, 0, 3).empty());
}

TEST_CASE("set loss: GIoU's gradient matches central differences", "[set_loss]") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> c(0.2, 0.8), s(0.05, 0.4);
  for (int trial = 0; trial < 50; ++trial) {
    const std::array<double, 4> a{c(rng), c(rng), s(rng), s(rng)}, b{c(rng), c(rng), s(rng), s(rng)};
    std::array<double, 4> g{};
    generalized_box_iou(a, b, &g);
    for (int k = 0; k < 4; ++k) {
      auto ap = a, am = a;
      const double h = 1e-6;
      ap[k] += h, am[k] -= h;
      const double fd = (generalized_box_iou(ap, b) - generalized_box_iou(am, b)) / (2 * h);
      CHECK(g[k] == Approx(fd).margin(1e-6));
    }
  }
  // Identical boxes: GIoU 1; disjoint ones: negative.
  CHECK(generalized_box_iou({0.5, 0.5, 0.2, 0.2}, {0.5, 0.5, 0.2, 0.2}) == Approx(1));
  CHECK(generalized_box_iou({0.2, 0.2, 0.1, 0.1}, {0.8, 0.8, 0.1, 0.1}) < 0);
}

TEST_CASE("set loss: loss, matches and gradients equal transformers' (PyTorch fixtures)", "[set_loss]") {
  for (const char* name : {"yolos-like", "detr-aux", "more-targets"}) {
    INFO(name);
    const SafeTensors st = SafeTensors::open((fs::path(TESSERA_FIXTURES) / "set_loss" / (std::string(name) + ".safetensors")).string());
    const Tensor counts = st.get("counts"), terms = st.get("terms");
    const int64_t layers = terms.dim(0), B = counts.dim(0);
    std::vector<Tensor> z, bx;
    for (int64_t l = 0; l < layers; ++l) {
      z.push_back(st.get("logits." + std::to_string(l)).clone());
      bx.push_back(st.get("boxes." + std::to_string(l)).clone());
    }
    std::vector<DetectionTarget> targets(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      if (counts[b] == 0) continue;
      const Tensor labels = st.get("target_labels." + std::to_string(b)), boxes = st.get("target_boxes." + std::to_string(b));
      for (int64_t j = 0; j < labels.dim(0); ++j) {
        targets[b].labels.push_back(static_cast<int64_t>(labels[j]));
        targets[b].boxes.push_back({boxes[j * 4], boxes[j * 4 + 1], boxes[j * 4 + 2], boxes[j * 4 + 3]});
      }
    }
    std::vector<const Tensor*> zp, bp;
    std::vector<Tensor> dz(static_cast<size_t>(layers)), db(static_cast<size_t>(layers));
    std::vector<Tensor*> dzp, dbp;
    for (int64_t l = 0; l < layers; ++l) zp.push_back(&z[l]), bp.push_back(&bx[l]), dzp.push_back(&dz[l]), dbp.push_back(&db[l]);
    const SetLossResult r = set_loss(zp, bp, targets, SetLossConfig{}, dzp, dbp);
    CHECK(r.loss == Approx(st.get("loss")[0]).epsilon(1e-5));
    for (int64_t l = 0; l < layers; ++l) {
      CHECK(r.layers[l].class_loss == Approx(terms[l * 3]).epsilon(1e-5));
      CHECK(r.layers[l].l1_loss == Approx(terms[l * 3 + 1]).epsilon(1e-5));
      CHECK(r.layers[l].giou_loss == Approx(terms[l * 3 + 2]).epsilon(1e-5));
      for (const char* which : {"dlogits.", "dboxes."}) {
        INFO(which << l);
        const Tensor want = st.get(which + std::to_string(l));
        const Tensor& got = which[1] == 'l' ? dz[l] : db[l];
        REQUIRE(got.shape() == want.shape());
        float scale = 0, worst = 0;
        for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(want[i]));
        for (int64_t i = 0; i < want.numel(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
        CHECK(worst <= 1e-5f * scale);
      }
    }
    // The model's output (last layer): the same query for each target as scipy chose.
    for (int64_t b = 0; b < B; ++b) {
      const auto& m = r.layers.back().matches[b];
      if (counts[b] == 0) {
        CHECK(m.empty());
        continue;
      }
      const Tensor want = st.get("match." + std::to_string(b));
      REQUIRE(static_cast<int64_t>(m.size()) == want.dim(0));
      for (size_t i = 0; i < m.size(); ++i) {
        CHECK(m[i].first == static_cast<int64_t>(want[i * 2]));
        CHECK(m[i].second == static_cast<int64_t>(want[i * 2 + 1]));
      }
    }
  }
}

TEST_CASE("set loss: bad targets are errors", "[set_loss]") {
  Tensor z({1, 3, 3}), b({1, 3, 4});
  std::fill(z.data(), z.data() + z.numel(), 0.0f);
  std::fill(b.data(), b.data() + b.numel(), 0.5f);
  DetectionTarget t;
  t.labels = {2};  // only classes 0 and 1 exist (the third logit is no-object)
  t.boxes = {{0.5f, 0.5f, 0.1f, 0.1f}};
  CHECK_THROWS_WITH(set_loss({&z}, {&b}, {t}), Catch::Contains("label 2"));
  CHECK_THROWS_WITH(set_loss({&z}, {&b}, {t, t}), Catch::Contains("2 targets for a batch of 1"));
  t.labels = {1};
  z[0] = NAN;
  CHECK_THROWS_WITH(set_loss({&z}, {&b}, {t}), Catch::Contains("non-finite"));
}

// ------------------------------------------------------------------- Segmenter's per-pixel loss

TEST_CASE("segmentation loss: PyTorch's cross_entropy(ignore_index=255) and its gradient", "[set_loss]") {
  const SafeTensors st = SafeTensors::open((fs::path(TESSERA_FIXTURES) / "segmentation_loss" / "ce.safetensors").string());
  const Tensor logits = st.get("logits"), labels_f = st.get("labels"), want = st.get("dlogits");
  std::vector<int32_t> labels;
  for (float v : labels_f.span()) labels.push_back(static_cast<int32_t>(v));
  Tensor grad;
  const double loss = segmentation_cross_entropy(logits, labels, &grad);
  CHECK(loss == Approx(st.get("loss")[0]).epsilon(1e-6));
  float scale = 0, worst = 0;
  for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(want[i]));
  for (int64_t i = 0; i < want.numel(); ++i) worst = std::max(worst, std::abs(grad[i] - want[i]));
  CHECK(worst <= 1e-5f * scale);
  // Every pixel ignored: no loss, no gradient. A label out of range: an error.
  std::vector<int32_t> ignored(labels.size(), 255);
  CHECK(segmentation_cross_entropy(logits, ignored, &grad) == 0.0);
  labels[3] = 9;
  CHECK_THROWS_WITH(segmentation_cross_entropy(logits, labels), Catch::Contains("label 9"));
}
