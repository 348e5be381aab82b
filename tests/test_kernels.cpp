// Kernels against independent references: PyTorch fixtures (tests/reference/make_kernel_fixtures.py)
// and naive double-precision loops written here. Each check states its tolerance.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tessera/kernels.hpp"
#include "tessera/parallel.hpp"

using namespace tessera;

namespace {

// Minimal safetensors reader for the fixtures (F32 only): u64 header length, JSON, raw data.
struct Fixture {
  std::map<std::string, std::vector<float>> tensors;
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, nlohmann::json> cases;  // __metadata__: case name -> parameters
  const std::vector<float>& at(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) FAIL("fixture has no tensor " << name);
    return it->second;
  }
};

Fixture load_fixture(const std::string& file) {
  const std::string path = std::string(TESSERA_FIXTURES) + "/kernels/" + file;
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, ' ');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Fixture f;
  const nlohmann::json parsed = nlohmann::json::parse(header);
  for (auto& [name, info] : parsed.items()) {
    if (name == "__metadata__") {
      for (auto& [c, params] : info.items()) f.cases[c] = nlohmann::json::parse(params.get<std::string>());
      continue;
    }
    REQUIRE(info["dtype"] == "F32");
    const uint64_t b = info["data_offsets"][0], e = info["data_offsets"][1];
    REQUIRE(e <= data.size());
    std::vector<float> values((e - b) / 4);
    std::memcpy(values.data(), data.data() + b, e - b);
    f.tensors[name] = std::move(values);
    f.shapes[name] = info["shape"].get<std::vector<int64_t>>();
  }
  REQUIRE(!f.cases.empty());
  return f;
}

double max_abs_diff(const float* a, const float* b, size_t n) {
  double worst = 0;
  for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst;
}

std::vector<float> random_vector(size_t n, uint32_t seed, float mean = 0, float stddev = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Restores the default thread count when a test that changes it ends.
struct ThreadCountGuard {
  ~ThreadCountGuard() { set_num_threads(0); }
};

// Naive double-precision references.
void layer_norm_ref(const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* g,
                    const float* b, double eps, std::vector<double>& y) {
  y.assign(rows * dim, 0);
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < dim; ++i) mean += x[r * ldx + i];
    mean /= dim;
    for (int64_t i = 0; i < dim; ++i) var += (x[r * ldx + i] - mean) * (x[r * ldx + i] - mean);
    var /= dim;
    for (int64_t i = 0; i < dim; ++i)
      y[r * dim + i] = (x[r * ldx + i] - mean) / std::sqrt(var + eps) * g[i] + b[i];
  }
}

// 1 + erf(z) = erfc(-z): no cancellation in the negative tail.
double gelu_ref(double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }

// out[b, i, h*hd + d] for row layout [batch, q_len, heads*hd], computed in double.
// x rounded to the nearest bf16 (ties to even), as a float.
float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

// With bf16_inputs, q, k and v are rounded to bf16 first; `weighted_abs`, if given, receives
// sum_j p_j |v_j| per output (the scale of the error that rounding the weights p_j can cause).
std::vector<double> attention_ref(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                  int64_t hd, StridedRows q, StridedRows k, StridedRows v,
                                  double scale, bool bf16_inputs = false,
                                  std::vector<double>* weighted_abs = nullptr) {
  auto in = [&](float x) { return double(bf16_inputs ? round_bf16(x) : x); };
  std::vector<double> out(batch * q_len * heads * hd, 0.0), s(kv_len);
  if (weighted_abs) weighted_abs->assign(out.size(), 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < q_len; ++i) {
        const float* qi = q.ptr + b * q.batch_stride + i * q.row_stride + h * hd;
        double mx = -INFINITY;
        for (int64_t j = 0; j < kv_len; ++j) {
          const float* kj = k.ptr + b * k.batch_stride + j * k.row_stride + h * hd;
          double dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += in(qi[d]) * in(kj[d]);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < kv_len; ++j) sum += (s[j] = std::exp(s[j] - mx));
        const int64_t at = ((b * q_len + i) * heads + h) * hd;
        for (int64_t j = 0; j < kv_len; ++j) {
          const float* vj = v.ptr + b * v.batch_stride + j * v.row_stride + h * hd;
          for (int64_t d = 0; d < hd; ++d) {
            out[at + d] += s[j] / sum * in(vj[d]);
            if (weighted_abs) (*weighted_abs)[at + d] += s[j] / sum * std::fabs(in(vj[d]));
          }
        }
      }
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// PyTorch fixtures
// ------------------------------------------------------------------------------------------

TEST_CASE("interpolate matches PyTorch F.interpolate (bicubic, bilinear, antialias)") {
  const Fixture f = load_fixture("interpolate.safetensors");
  int checked = 0;
  for (const auto& [name, p] : f.cases) {
    INFO(name);
    const auto& shape_in = f.shapes.at(name + ".in");
    const auto& shape_out = f.shapes.at(name + ".out");
    const auto& in = f.at(name + ".in");
    const auto& ref = f.at(name + ".out");
    std::vector<float> out(ref.size(), NAN);
    const std::string mode = p["mode"];
    const bool ac = p["align_corners"];
    const double sh = p["scale_h"], sw = p["scale_w"];
    if (mode == "bicubic")
      interpolate_bicubic(in.data(), shape_in[0], shape_in[1], shape_in[2], out.data(),
                          shape_out[1], shape_out[2], ac, sh, sw);
    else if (mode == "bilinear")
      interpolate_bilinear(in.data(), shape_in[0], shape_in[1], shape_in[2], out.data(),
                           shape_out[1], shape_out[2], ac, sh, sw);
    else
      interpolate_bicubic_antialias(in.data(), shape_in[0], shape_in[1], shape_in[2], out.data(),
                                    shape_out[1], shape_out[2]);
    // Same algorithm in float as PyTorch, on N(0,1) data. The cubic coefficients cancel (terms
    // up to 6 for a weight near 0), and PyTorch's build rounds them differently (FMA contraction,
    // operation order), so outputs differ by up to ~3e-6; a wrong source coordinate costs ~1e-1.
    CHECK(max_abs_diff(out.data(), ref.data(), ref.size()) <= 5e-6);
    ++checked;
  }
  CHECK(checked == 33);
}

TEST_CASE("scale-factor interpolation differs from size-based where PyTorch's does") {
  // 14 -> 20 with scale 20.1/14 maps through 14/20.1, not 14/20: a kernel that ignored the
  // scale would fail the fixture above; make the distinction itself visible here.
  const auto in = random_vector(14 * 14, 7);
  std::vector<float> a(20 * 15), b(20 * 15);
  interpolate_bicubic(in.data(), 1, 14, 14, a.data(), 20, 15, false, 20.1 / 14, 15.1 / 14);
  interpolate_bicubic(in.data(), 1, 14, 14, b.data(), 20, 15, false);
  CHECK(max_abs_diff(a.data(), b.data(), a.size()) > 1e-3);
}

TEST_CASE("layer_norm, gelu and softmax match PyTorch float64") {
  const Fixture f = load_fixture("elementwise.safetensors");
  for (const auto& [name, p] : f.cases) {
    INFO(name);
    const std::string kind = p["kind"];
    const auto& in = f.at(name + ".in");
    const auto& ref = f.at(name + ".out");
    std::vector<float> out = in;
    if (kind == "layer_norm") {
      const auto& shape = f.shapes.at(name + ".in");
      layer_norm(in.data(), shape[0], shape[1], shape[1], f.at(name + ".gamma").data(),
                 f.at(name + ".beta").data(), p["eps"].get<float>(), out.data(), shape[1]);
      CHECK(max_abs_diff(out.data(), ref.data(), ref.size()) <= 1e-5);
    } else if (kind == "gelu") {
      gelu_erf(out.data(), static_cast<int64_t>(out.size()));
      for (size_t i = 0; i < out.size(); ++i) {
        INFO("x = " << in[i]);
        REQUIRE(std::fabs(double(out[i]) - ref[i]) <= 2e-7 * std::fabs(ref[i]) + 1e-7);
      }
    } else {
      const auto& shape = f.shapes.at(name + ".in");
      softmax_rows(out.data(), shape[0], shape[1], shape[1]);
      CHECK(max_abs_diff(out.data(), ref.data(), ref.size()) <= 1e-7);
    }
  }
}

TEST_CASE("attention matches PyTorch float64") {
  const Fixture f = load_fixture("attention.safetensors");
  for (const auto& [name, p] : f.cases) {
    INFO(name);
    const int64_t b = p["batch"], h = p["heads"], tq = p["q_len"], tk = p["kv_len"],
                  hd = p["head_dim"];
    const float scale = p["scale"];
    const auto& ref = f.at(name + ".out");
    std::vector<float> out(ref.size(), NAN);
    const int64_t D = h * hd;
    attention(b, h, tq, tk, hd, {f.at(name + ".q").data(), tq * D, D},
              {f.at(name + ".k").data(), tk * D, D}, {f.at(name + ".v").data(), tk * D, D},
              out.data(), tq * D, D, scale);
    CHECK(max_abs_diff(out.data(), ref.data(), ref.size()) <= 1e-5);
  }
}

// ------------------------------------------------------------------------------------------
// Naive double-precision references over awkward sizes
// ------------------------------------------------------------------------------------------

TEST_CASE("layer_norm matches a double loop, strided and in place") {
  for (int64_t rows : {1, 5, 197, 300}) {
    for (int64_t dim : {1, 37, 768}) {
      for (float eps : {1e-12f, 1e-6f}) {
        INFO("rows " << rows << " dim " << dim << " eps " << eps);
        const int64_t ld = dim + 3;
        auto x = random_vector(rows * ld, uint32_t(rows * 1000 + dim), 2.0f, 3.0f);
        auto g = random_vector(dim, 11, 1.0f, 0.5f), bta = random_vector(dim, 12, 0.0f, 0.5f);
        std::vector<double> ref;
        layer_norm_ref(x.data(), rows, dim, ld, g.data(), bta.data(), eps, ref);
        std::vector<float> y(rows * dim);
        layer_norm(x.data(), rows, dim, ld, g.data(), bta.data(), eps, y.data(), dim);
        double worst = 0;
        for (int64_t i = 0; i < rows * dim; ++i) worst = std::max(worst, std::fabs(y[i] - ref[i]));
        // dim 1: x - mean is 0 exactly, y = beta; otherwise O(1) outputs, float rounding only.
        CHECK(worst <= 2e-6);
        layer_norm(x.data(), rows, dim, ld, g.data(), bta.data(), eps, x.data(), ld);  // in place
        for (int64_t r = 0; r < rows; ++r)
          REQUIRE(std::memcmp(&x[r * ld], &y[r * dim], dim * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("gelu_erf matches the double-precision formula with std::erfc") {
  std::vector<float> x;
  for (int i = -200000; i <= 200000; ++i) x.push_back(i * 6e-5f);  // dense over [-12, 12]
  for (float v : {0.0f, -0.0f, 1e-38f, -1e-38f, 50.0f, -50.0f, 1e4f, -1e4f}) x.push_back(v);
  std::vector<float> y = x;
  gelu_erf(y.data(), static_cast<int64_t>(y.size()));
  // 2e-7 relative plus 1e-7 absolute: float rounding of x / sqrt 2 and of 1 + erf(z) near
  // z = -1 (where erf(z) ~ -0.84 cancels) limit what a float GELU can do; PyTorch's own float
  // GELU is accurate to ~1e-7 absolute. A wrong erf (e.g. tanh approximation) is off by ~1e-3.
  double worst_rel = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = gelu_ref(x[i]);
    const double err = std::fabs(y[i] - ref);
    if (std::fabs(x[i]) <= 8) worst_rel = std::max(worst_rel, err / std::fabs(ref));
    INFO("x = " << x[i] << " gelu " << y[i] << " ref " << ref);
    REQUIRE(err <= 2e-7 * std::fabs(ref) + 1e-7);
  }
  CHECK(worst_rel < 1e-5);  // relative error stays small in the tails too (|x| <= 8)
}

TEST_CASE("softmax_rows matches a double loop") {
  for (int64_t cols : {1, 5, 197, 300, 4001}) {
    const int64_t rows = 7, ld = cols + 5;
    auto x = random_vector(rows * ld, uint32_t(cols), 0.0f, 6.0f);
    auto y = x;
    softmax_rows(y.data(), rows, cols, ld);
    for (int64_t r = 0; r < rows; ++r) {
      double mx = -INFINITY, sum = 0;
      for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, double(x[r * ld + c]));
      for (int64_t c = 0; c < cols; ++c) sum += std::exp(x[r * ld + c] - mx);
      for (int64_t c = 0; c < cols; ++c) {
        const double ref = std::exp(x[r * ld + c] - mx) / sum;
        REQUIRE(std::fabs(y[r * ld + c] - ref) <= 1e-7 + 2e-6 * ref);
      }
      for (int64_t c = cols; c < ld; ++c) REQUIRE(y[r * ld + c] == x[r * ld + c]);  // padding kept
    }
  }
}

// Restores the default attention path when a test that forces the portable one ends.
struct PortableAttentionGuard {
  ~PortableAttentionGuard() { force_portable_attention(false); }
};

// One attention problem laid out as the model lays it out: queries from a fused QKV buffer
// [B, T, 3D] with padding between batches; keys and values from a separate cross-attention
// memory [B, Tk, 2D]; output rows padded to D + 8 (pre-filled with -7, which must stay).
struct AttentionCase {
  int64_t batch, heads, q_len, kv_len, hd;
  int64_t D = heads * hd;
  int64_t q_rs = 3 * D, q_bs = q_len * q_rs + 13;
  int64_t kv_rs = 2 * D, kv_bs = kv_len * kv_rs + 7;
  int64_t o_rs = D + 8, o_bs = q_len * o_rs + 5;
  std::vector<float> qbuf, kvbuf, out;
  StridedRows q{}, k{}, v{};
  float scale = 1.0f / std::sqrt(float(hd));
  AttentionCase(int64_t b, int64_t h, int64_t tq, int64_t tk, int64_t d, uint32_t seed, float q_std)
      : batch(b), heads(h), q_len(tq), kv_len(tk), hd(d) {
    qbuf = random_vector(batch * q_bs, seed, 0.0f, q_std);
    kvbuf = random_vector(batch * kv_bs, seed + 1);
    out.assign(batch * o_bs, -7.0f);
    q = {qbuf.data(), q_bs, q_rs};
    k = {kvbuf.data(), kv_bs, kv_rs};
    v = {kvbuf.data() + D, kv_bs, kv_rs};
  }
  void run(AttentionPrecision precision) {
    attention(batch, heads, q_len, kv_len, hd, q, k, v, out.data(), o_bs, o_rs, scale, precision);
  }
  std::vector<double> reference(bool bf16_inputs = false, std::vector<double>* weighted_abs = nullptr) const {
    return attention_ref(batch, heads, q_len, kv_len, hd, q, k, v, scale, bf16_inputs, weighted_abs);
  }
  // Calls check(output, index into the reference) for every output, and requires the padding.
  template <class Check>
  void each_output(const Check& check) const {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t c = 0; c < D; ++c) check(double(out[b * o_bs + i * o_rs + c]), (b * q_len + i) * D + c);
        for (int64_t c = D; c < o_rs; ++c) REQUIRE(out[b * o_bs + i * o_rs + c] == -7.0f);
      }
  }
};

struct Shape {
  int64_t batch, heads, q_len, kv_len, hd;
};

TEST_CASE("attention matches a double loop: self and cross, batch strides, odd head_dim") {
  PortableAttentionGuard path_guard;
  const bool portable = GENERATE(false, true);  // the AVX-512 path (where available) and portable C++
  force_portable_attention(portable);
  INFO("portable path " << portable);
  for (Shape s : {Shape{1, 1, 1, 1, 16}, Shape{2, 3, 5, 5, 16}, Shape{1, 2, 197, 197, 64},
                  Shape{2, 2, 300, 77, 80}, Shape{2, 1, 33, 300, 12}, Shape{1, 3, 129, 257, 48},
                  Shape{1, 2, 64, 1, 32}}) {
    INFO("b " << s.batch << " h " << s.heads << " q " << s.q_len << " kv " << s.kv_len
              << " hd " << s.hd);
    AttentionCase c(s.batch, s.heads, s.q_len, s.kv_len, s.hd, 1, 1.0f);
    c.run(AttentionPrecision::F32);
    const auto ref = c.reference();
    double worst = 0;
    c.each_output([&](double y, int64_t at) { worst = std::max(worst, std::fabs(y - ref[at])); });
    // N(0,1) inputs, scale 1/sqrt(hd): O(1) outputs; float accumulation over <= 300 keys.
    CHECK(worst <= 1e-5);
  }
}

TEST_CASE("bf16 attention: bf16-rounded q, k, v and weights, fp32 sums") {
  PortableAttentionGuard path_guard;
  const bool portable = GENERATE(false, true);  // vdpbf16ps (where available) and portable C++
  force_portable_attention(portable);
  INFO("portable path " << portable);
  for (Shape s : {Shape{1, 1, 1, 1, 16}, Shape{2, 3, 5, 5, 16}, Shape{1, 2, 197, 197, 64},
                  Shape{2, 2, 300, 77, 80}, Shape{1, 2, 70, 45, 13}, Shape{1, 1, 40, 1201, 64},
                  Shape{1, 3, 129, 257, 48}, Shape{1, 2, 64, 1, 32}}) {
    INFO("b " << s.batch << " h " << s.heads << " q " << s.q_len << " kv " << s.kv_len
              << " hd " << s.hd);
    AttentionCase c(s.batch, s.heads, s.q_len, s.kv_len, s.hd, 41, 2.0f);
    c.run(AttentionPrecision::BF16);
    std::vector<double> bound;
    const auto ref = c.reference(true, &bound);
    const auto exact = c.reference();
    double worst_ratio = 0, worst_exact = 0;
    c.each_output([&](double y, int64_t at) {
      // Each weight is rounded to bf16 (8 significant bits: relative error <= 2^-8) after an
      // exp good to 1e-5, so |error| <= (2^-8 + 1e-5) sum_j p_j |v_j|, plus fp32 rounding of
      // scores and sums (1e-5).
      const double err = std::fabs(y - ref[at]), allowed = (0x1p-8 + 1e-5) * bound[at] + 1e-5;
      REQUIRE(err <= allowed);
      worst_ratio = std::max(worst_ratio, err / allowed);
      worst_exact = std::max(worst_exact, std::fabs(y - exact[at]));
    });
    // Against unrounded inputs: bf16 keeps ~3 significant digits of O(1) outputs.
    CHECK(worst_exact <= 0.05);
    CHECK(worst_exact > 0);  // it really is computed at lower precision
    UNSCOPED_INFO("worst error / bound " << worst_ratio << ", vs fp32 inputs " << worst_exact);
  }
}

TEST_CASE("attention stays exact for large score ranges (online softmax rescaling)") {
  PortableAttentionGuard path_guard;
  force_portable_attention(GENERATE(false, true));
  // Scores of order +-100 spread over several key blocks: the running max changes between blocks.
  const int64_t T = 600, hd = 16;
  auto q = random_vector(T * hd, 3, 0.0f, 3.0f), k = random_vector(T * hd, 4, 0.0f, 3.0f);
  auto v = random_vector(T * hd, 5);
  std::vector<float> out(T * hd);
  attention(1, 1, T, T, hd, {q.data(), 0, hd}, {k.data(), 0, hd}, {v.data(), 0, hd}, out.data(), 0,
            hd, 1.0f);
  const auto ref = attention_ref(1, 1, T, T, hd, {q.data(), 0, hd}, {k.data(), 0, hd},
                                 {v.data(), 0, hd}, 1.0);
  double worst = 0;
  for (int64_t i = 0; i < T * hd; ++i) worst = std::max(worst, std::fabs(out[i] - ref[i]));
  // Scores up to ~150: float rounding of a score is ~1e-5 absolute, so weights carry ~1e-5
  // relative error.
  CHECK(worst <= 1e-4);
}

TEST_CASE("results do not depend on the thread count") {
  ThreadCountGuard guard;
  const int64_t B = 2, H = 3, T = 197, Tk = 260, hd = 64, D = H * hd;
  auto q = random_vector(B * T * D, 21), k = random_vector(B * Tk * D, 22),
       v = random_vector(B * Tk * D, 23);
  auto x = random_vector(300 * 768, 24, 1.0f, 2.0f), g = random_vector(768, 25),
       bt = random_vector(768, 26);
  auto grid = random_vector(768 * 14 * 14, 27);
  struct Outputs {
    std::vector<float> attn, ln, sm, gelu, bicubic, bilinear, aa;
  };
  auto run = [&](int threads) {
    set_num_threads(threads);
    REQUIRE(num_threads() == threads);
    Outputs o;
    o.attn.resize(B * T * D);
    attention(B, H, T, Tk, hd, {q.data(), T * D, D}, {k.data(), Tk * D, D}, {v.data(), Tk * D, D},
              o.attn.data(), T * D, D, 0.125f);
    o.ln.resize(x.size());
    layer_norm(x.data(), 300, 768, 768, g.data(), bt.data(), 1e-6f, o.ln.data(), 768);
    o.sm = x;
    softmax_rows(o.sm.data(), 300, 768, 768);
    o.gelu = x;
    gelu_erf(o.gelu.data(), static_cast<int64_t>(x.size()));
    o.bicubic.resize(768 * 20 * 15);
    interpolate_bicubic(grid.data(), 768, 14, 14, o.bicubic.data(), 20, 15, false, 20.1 / 14, 15.1 / 14);
    o.bilinear.resize(768 * 30 * 40);
    interpolate_bilinear(grid.data(), 768, 14, 14, o.bilinear.data(), 30, 40, false);
    o.aa.resize(768 * 9 * 7);
    interpolate_bicubic_antialias(grid.data(), 768, 14, 14, o.aa.data(), 9, 7);
    return o;
  };
  const Outputs one = run(1), two = run(2);
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  CHECK(same(one.attn, two.attn));
  for (bool portable : {false, true}) {  // bf16 attention, both paths
    PortableAttentionGuard path_guard;
    force_portable_attention(portable);
    std::vector<float> b1(B * T * D), b2(B * T * D);
    for (auto [threads, dst] : {std::pair{1, &b1}, std::pair{2, &b2}}) {
      set_num_threads(threads);
      attention(B, H, T, Tk, hd, {q.data(), T * D, D}, {k.data(), Tk * D, D},
                {v.data(), Tk * D, D}, dst->data(), T * D, D, 0.125f, AttentionPrecision::BF16);
    }
    CHECK(same(b1, b2));
  }
  {
    PortableAttentionGuard path_guard;
    force_portable_attention(true);
    set_num_threads(1);
    std::vector<float> p1(B * T * D), p2(B * T * D);
    attention(B, H, T, Tk, hd, {q.data(), T * D, D}, {k.data(), Tk * D, D}, {v.data(), Tk * D, D},
              p1.data(), T * D, D, 0.125f);
    set_num_threads(2);
    attention(B, H, T, Tk, hd, {q.data(), T * D, D}, {k.data(), Tk * D, D}, {v.data(), Tk * D, D},
              p2.data(), T * D, D, 0.125f);
    CHECK(same(p1, p2));
  }
  CHECK(same(one.ln, two.ln));
  CHECK(same(one.sm, two.sm));
  CHECK(same(one.gelu, two.gelu));
  CHECK(same(one.bicubic, two.bicubic));
  CHECK(same(one.bilinear, two.bilinear));
  CHECK(same(one.aa, two.aa));
}

// Timing, not run by default: ./test_kernels "[.perf]"
TEST_CASE("attention timing", "[.perf]") {
  ThreadCountGuard guard;
  struct Shape {
    int64_t heads, tokens;
  };
  PortableAttentionGuard path_guard;
  const bool portable = GENERATE(false, true);
  const bool bf16 = GENERATE(false, true);
  force_portable_attention(portable);
  for (Shape s : {Shape{12, 197}, Shape{3, 4000}}) {
    const int64_t hd = 64, D = s.heads * hd, T = s.tokens;
    auto qkv = random_vector(T * 3 * D, 31);
    std::vector<float> out(T * D);
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      std::vector<double> ms;
      const int reps = T > 1000 ? 5 : 30;
      for (int r = 0; r < reps + 1; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        attention(1, s.heads, T, T, hd, {qkv.data(), 0, 3 * D}, {qkv.data() + D, 0, 3 * D},
                  {qkv.data() + 2 * D, 0, 3 * D}, out.data(), 0, D, 0.125f,
                  bf16 ? AttentionPrecision::BF16 : AttentionPrecision::F32);
        const auto t1 = std::chrono::steady_clock::now();
        if (r > 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::printf("attention %s %s B=1 H=%ld T=%ld hd=64 threads=%d: median %.3f ms\n",
                  portable ? "portable" : "default ", bf16 ? "bf16" : "fp32", long(s.heads),
                  long(T), threads,
                  ms[ms.size() / 2]);
    }
  }
}
