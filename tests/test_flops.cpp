// FLOP counts (model_flops, detection_head_flops, segmentation_head_flops) against counts written
// out by hand here, matrix product by matrix product, from each model's config; and the random-weight
// benchmark models (yolos-ti, segmenter-s): their upstream shapes, parameter counts, per-layer dtypes
// and a forward pass at a small size.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>

#include "tessera/detection.hpp"
#include "tessera/model.hpp"
#include "tessera/segmentation.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

std::string fixture(const std::string& rel) { return (fs::path(TESSERA_FIXTURES) / rel).string(); }

// 2 FLOPs per multiply-add: [rows, in] x [in, out].
double mm(double rows, double in, double out) { return 2 * rows * in * out; }
// Attention of tq queries over tk keys, width d (all heads together): q·kᵀ, then probabilities·v.
double attn(double tq, double tk, double d) { return mm(tq, d, tk) + mm(tq, tk, d); }
// One pre-norm block over t tokens: qkv, attention, output projection, fc1, fc2.
double block(double t, double d, double f) {
  return mm(t, d, 3 * d) + attn(t, t, d) + mm(t, d, d) + mm(t, d, f) + mm(t, f, d);
}
// A ViT encoder: patch embedding of np patches (c channels, p x p), then L blocks over t tokens.
double encoder(double np, double t, double c, double p, double d, double f, double layers) {
  return mm(np, c * p * p, d) + layers * block(t, d, f);
}

// Exact up to double rounding of sums of integers (all counts here are far below 2^53).
void check_equal(double got, double want) {
  INFO("got " << got << ", want " << want);
  CHECK(got == Approx(want).epsilon(1e-12));
}

}  // namespace

TEST_CASE("model_flops: a ViT classifier is the encoder plus its classifier") {
  // vit-tiny-rand: patch 8, hidden 64, 3 layers, MLP 128; its label count from the checkpoint.
  auto m = load_model(fixture("conformance/vit-tiny-rand"));
  const double labels = static_cast<double>(m->classifier.num_labels);
  REQUIRE(labels > 0);
  // 48x40 input: 6x5 = 30 patches + class token.
  check_equal(model_flops(*m, 48, 40), encoder(30, 31, 3, 8, 64, 128, 3) + mm(1, 64, labels));
  // random vit-ti16 at 224: 196 patches, ImageNet-1k head.
  auto r = random_model("vit-ti16", 224);
  check_equal(model_flops(*r, 224, 224), encoder(196, 197, 3, 16, 192, 768, 12) + mm(1, 192, 1000));
}

TEST_CASE("detection_head_flops: YOLOS class and box MLPs, DETR decoder, by hand") {
  SECTION("YOLOS (yolos-tiny-rand: hidden 64, 3 layers, MLP 128, 10 detection tokens, 5 labels)") {
    auto m = load_model(fixture("conformance/yolos-tiny-rand"));
    // 70x100: 4x6 = 24 patches (the remainder rows/columns are dropped), + class + 10 detection.
    const double heads = 2 * mm(10, 64, 64) + mm(10, 64, 5 + 1)  // class MLP: 64 → 64 → 64 → 6
                         + 2 * mm(10, 64, 64) + mm(10, 64, 4);    // box MLP:   64 → 64 → 64 → 4
    check_equal(detection_head_flops(*m->detection, m->encoder.config, 70, 100), heads);
    check_equal(model_flops(*m, 70, 100), encoder(24, 35, 3, 16, 64, 128, 3) + heads);
  }
  SECTION("DETR head (detr-vit-conv-rand: backbone 48 wide, d_model 32, 6 queries, 3 layers, FFN 80)") {
    auto m = load_model(fixture("models/detr-vit-conv-rand"));
    // 64x80: 4x5 = 20 patches → 20 memory rows.
    const double Q = 6, D = 32, np = 20, F = 80;
    const double layer = mm(Q, D, 2 * D) + mm(Q, D, D) + attn(Q, Q, D) + mm(Q, D, D)  // self: qk, v, out
                         + mm(Q, D, D) + 2 * mm(np, D, D) + attn(Q, np, D) + mm(Q, D, D)  // cross: q, k, v, out
                         + mm(Q, D, F) + mm(Q, F, D);                                   // FFN
    const double heads = mm(Q, D, 3 + 1)                                             // class linear
                         + 2 * mm(Q, D, D) + mm(Q, D, 4);                             // box MLP
    const double head = mm(np, 48, D) + 3 * layer + heads;  // input projection, 3 layers, heads
    check_equal(detection_head_flops(*m->detection, m->encoder.config, 64, 80), head);
    check_equal(model_flops(*m, 64, 80), encoder(20, 21, 3, 16, 48, 96, 2) + head);
  }
}

TEST_CASE("segmentation_head_flops: linear and mask-transformer decoders, by hand") {
  // Both fixtures: patch 8, encoder 64 wide, 2 layers, d_ff 256, 5 classes. 60x70 is zero-padded
  // to 64x72: an 8x9 grid of 72 patches (+ class token).
  const double N = 72, n = 5, enc = encoder(N, N + 1, 3, 8, 64, 256, 2);
  SECTION("linear") {
    auto m = load_model(fixture("conformance/segmenter-linear-rand"));
    check_equal(segmentation_head_flops(*m->segmentation, m->encoder.config, 60, 70), mm(N, 64, n));
    check_equal(model_flops(*m, 60, 70), enc + mm(N, 64, n));
  }
  SECTION("mask transformer (2 layers, d_model 64, d_ff 256)") {
    auto m = load_model(fixture("conformance/segmenter-mask-rand"));
    const double decoder = mm(N, 64, 64)             // proj_dec
                           + 2 * block(N + n, 64, 256)  // blocks over patches + class embeddings
                           + mm(N, 64, 64) + mm(n, 64, 64)  // proj_patch, proj_classes
                           + mm(N, 64, n);             // masks = patches · classesᵀ
    check_equal(segmentation_head_flops(*m->segmentation, m->encoder.config, 60, 70), decoder);
    check_equal(model_flops(*m, 60, 70), enc + decoder);
  }
}

TEST_CASE("random yolos-ti is hustvl/yolos-tiny's shape; its FLOPs by hand; it runs in every dtype") {
  auto m = random_model("yolos-ti", 0, WeightType::INT8);
  // Sum of the numels of YolosForObjectDetection's state dict for yolos-tiny's config (91 labels),
  // as tests/reference/make_detection_fixtures.py's yolos_shapes lists it.
  CHECK(m->parameter_count == 6488736);
  const VitConfig& c = m->encoder.config;
  CHECK(c.image_height == 800);
  CHECK(c.image_width == 1333);
  CHECK(c.num_detection_tokens == 100);
  CHECK(m->encoder.pos_embed.dim(0) == 1 + 50 * 83 + 100);
  REQUIRE(m->detection);
  CHECK(m->detection->num_labels == 91);
  CHECK(m->labels.size() == 91);
  // The blocks take the dtype; the patch embedding and the heads are edge layers (fp32 under int8).
  CHECK(m->encoder.layers[0].qkv.type == WeightType::INT8);
  CHECK(m->encoder.patch_embed.type == WeightType::F32);
  CHECK(m->detection->class_head.layers[0].type == WeightType::F32);
  // 512x688 (the bench default): 32x43 = 1376 patches, 1477 tokens.
  const double heads = 4 * mm(100, 192, 192) + mm(100, 192, 92) + mm(100, 192, 4);
  check_equal(model_flops(*m, 512, 688), encoder(1376, 1477, 3, 16, 192, 768, 12) + heads);

  for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
    auto model = type == WeightType::INT8 ? m : random_model("yolos-ti", 0, type);
    Tensor x({2, 3, 64, 96});
    for (int64_t i = 0; i < x.numel(); ++i) x[i] = std::sin(0.01f * static_cast<float>(i));
    ModelWorkspace ws;
    NamedTensors out = model_forward(*model, x, ws);
    const Tensor& logits = output(out, "logits");
    const Tensor& boxes = output(out, "pred_boxes");
    CHECK(logits.shape() == Shape{2, 100, 92});
    CHECK(boxes.shape() == Shape{2, 100, 4});
    bool finite = true;
    for (int64_t i = 0; i < logits.numel(); ++i) finite &= std::isfinite(logits[i]);
    for (int64_t i = 0; i < boxes.numel(); ++i) finite &= boxes[i] >= 0 && boxes[i] <= 1;
    CHECK(finite);
  }
}

TEST_CASE("random segmenter-s is Segmenter ViT-S/16 mask; its FLOPs by hand; it runs") {
  auto m = random_model("segmenter-s", 0, WeightType::BF16);
  // Sum of the numels of seg_small_mask's state dict (tests/reference/make_segmenter_fixtures.py's
  // random_sd for that config) less the pre-trained ViT's unused ImageNet head (385,000).
  CHECK(m->parameter_count == 26033964);
  REQUIRE(m->segmentation);
  const SegmentationHead& h = *m->segmentation;
  CHECK(h.decoder == SegmenterDecoder::MaskTransformer);
  CHECK(h.num_classes == 150);
  CHECK(h.blocks.size() == 2);
  CHECK(m->encoder.config.hidden_size == 384);
  CHECK(m->encoder.config.num_attention_heads == 6);
  CHECK(h.blocks[0].qkv.type == WeightType::BF16);
  // 512x512: 1024 patches; the decoder runs over 1024 + 150 tokens.
  const double decoder = mm(1024, 384, 384) + 2 * block(1174, 384, 1536) + mm(1024, 384, 384) +
                         mm(150, 384, 384) + mm(1024, 384, 150);
  check_equal(model_flops(*m, 512, 512), encoder(1024, 1025, 3, 16, 384, 1536, 12) + decoder);

  Tensor x({1, 3, 40, 64});  // padded to 48x64: a 3x4 grid
  for (int64_t i = 0; i < x.numel(); ++i) x[i] = std::cos(0.01f * static_cast<float>(i));
  ModelWorkspace ws;
  SegmentationMasks s = segmentation_masks(*m, x, ws);
  CHECK(s.masks.shape() == Shape{1, 150, 3, 4});
  bool finite = true;
  for (int64_t i = 0; i < s.masks.numel(); ++i) finite &= std::isfinite(s.masks[i]);
  CHECK(finite);
}
