// The training kernels (core/include/tessera/backward.hpp, optim.hpp) against two independent
// references: the naive double-precision loops of backward_reference.hpp, and PyTorch autograd /
// torch.optim fixtures (tests/reference/make_backward_fixtures.py).
//
// Tolerance, everywhere: relative error max|got − want| / max|want| ≤ 1e-4 (fp32 kernels against
// float64 references), unless a check says otherwise. Thread-count independence is checked bit for
// bit.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tessera/backward.hpp"
#include "tessera/backward_reference.hpp"
#include "tessera/gemm.hpp"
#include "tessera/optim.hpp"
#include "tessera/parallel.hpp"
#include "tessera/safetensors.hpp"

#include "rel_err.hpp"

using namespace tessera;

namespace {

using test::kTol;
using test::rel_err;

std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f, float shift = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = shift + scale * d(rng);
  return v;
}

struct Fixture {
  SafeTensors st = SafeTensors::open(std::string(TESSERA_FIXTURES) + "/backward/backward.safetensors");
  std::vector<float> get(const std::string& name) const {
    const Tensor t = st.read(name);
    return {t.data(), t.data() + t.numel()};
  }
  nlohmann::json params(const std::string& c) const {
    return nlohmann::json::parse(st.metadata().at(c));
  }
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

// Runs fn with 1 thread, then 2, and restores the default.
template <class F>
std::pair<std::vector<float>, std::vector<float>> one_and_two_threads(F fn) {
  set_num_threads(1);
  std::vector<float> a = fn();
  set_num_threads(2);
  std::vector<float> b = fn();
  set_num_threads(0);
  return {a, b};
}

// fn(family) under every kernel family this CPU has, widest first, dispatch capped at each; the
// cap is lifted afterwards.
template <class F>
void for_each_family(F fn) {
  for (IsaFamily family : {IsaFamily::Avx512, IsaFamily::Avx2, IsaFamily::Generic}) {
    if (family > cpu_isa_family()) continue;
    set_isa_cap(family);
    fn(family);
  }
  set_isa_cap(IsaFamily::Avx512);
}

}  // namespace

TEST_CASE("linear_backward matches the double reference and accumulates", "[backward][linear]") {
  for (bool generic : {false, true}) {
    force_generic_kernels(generic);
    // 1,300 rows: dW's sum over rows is taken in chunks (linear_backward), the last one partial.
    for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 5, 3}, {70, 45, 100},
                           {197, 64, 192}, {1300, 40, 72}}) {
      INFO("M " << M << " N " << N << " K " << K << " generic " << generic);
      const auto x = randn(M * K, 1), w = randn(N * K, 2, 0.1f), dy = randn(M * N, 3);
      // Start from non-zero gradients: the kernel adds to them.
      const auto dx0 = randn(M * K, 4), dw0 = randn(N * K, 5), db0 = randn(N, 6);
      std::vector<float> dx = dx0, dw = dw0, db = db0;
      linear_backward(x.data(), w.data(), dy.data(), M, N, K, dx.data(), dw.data(), db.data());
      std::vector<double> rdx(M * K), rdw(N * K), rdb(N);
      reference::linear_backward(x.data(), w.data(), dy.data(), M, N, K, rdx.data(), rdw.data(),
                                 rdb.data());
      for (size_t i = 0; i < rdx.size(); ++i) rdx[i] += dx0[i];
      for (size_t i = 0; i < rdw.size(); ++i) rdw[i] += dw0[i];
      for (size_t i = 0; i < rdb.size(); ++i) rdb[i] += db0[i];
      CHECK(rel_err(dx, rdx) <= kTol);
      CHECK(rel_err(dw, rdw) <= kTol);
      CHECK(rel_err(db, rdb) <= kTol);
    }
  }
  force_generic_kernels(false);
}

TEST_CASE("linear_backward with bf16 training GEMMs: bf16 operands, fp32 sums", "[backward][linear][bf16]") {
  // set_training_gemm_type(BF16) packs W, Wᵀ and Xᵀ as bf16 and rounds the other operand to bf16
  // too; the products of two bf16 numbers are exact in fp32, so against a double reference on the
  // rounded operands only fp32 summation error remains (1e-5 relative), while against the
  // unrounded operands the error is bf16's (~1e-3, and well above 1e-5: the setting is in use).
  auto round_bf16 = [](std::vector<float> v) {
    for (float& f : v) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
      std::memcpy(&f, &u, 4);
    }
    return v;
  };
  const TrainingGemmScope bf16(WeightType::BF16);
  for_each_family([&](IsaFamily family) {
    for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 5, 3}, {70, 45, 101}, {1300, 40, 72}}) {
      INFO("family " << isa_name(family) << " M " << M << " N " << N << " K " << K);
      const auto x = randn(M * K, 11), w = randn(N * K, 12, 0.1f), dy = randn(M * N, 13);
      std::vector<float> dx(M * K, 0.0f), dw(N * K, 0.0f), db(N, 0.0f);
      linear_backward(x.data(), w.data(), dy.data(), M, N, K, dx.data(), dw.data(), db.data());
      const auto xr = round_bf16(x), wr = round_bf16(w), dyr = round_bf16(dy);
      std::vector<double> rdx(M * K), rdw(N * K), rdb(N), edx(M * K), edw(N * K);
      reference::linear_backward(xr.data(), wr.data(), dyr.data(), M, N, K, rdx.data(), rdw.data(), nullptr);
      reference::linear_backward(x.data(), w.data(), dy.data(), M, N, K, edx.data(), edw.data(), rdb.data());
      CHECK(rel_err(dx, rdx) <= 1e-5);
      CHECK(rel_err(dw, rdw) <= 1e-5);
      CHECK(rel_err(db, rdb) <= kTol);  // the bias gradient is a plain fp32 sum
      if (M * N * K > 1) {
        CHECK(rel_err(dx, edx) > 1e-5);
        CHECK(rel_err(dx, edx) < 2e-2);
        CHECK(rel_err(dw, edw) < 2e-2);
      }
    }
  });
  CHECK_THROWS_WITH(set_training_gemm_type(WeightType::INT8), Catch::Contains("fp32 or bf16"));
  CHECK(training_gemm_type() == WeightType::BF16);  // the refused call changed nothing
}

TEST_CASE("linear_backward matches PyTorch autograd", "[backward][linear]") {
  const Fixture& f = fixture();
  const auto p = f.params("linear");
  const int64_t M = p["M"], N = p["N"], K = p["K"];
  const auto x = f.get("linear.x"), w = f.get("linear.w"), dy = f.get("linear.dy");
  std::vector<float> dx(M * K), dw(N * K), db(N);
  linear_backward(x.data(), w.data(), dy.data(), M, N, K, dx.data(), dw.data(), db.data());
  CHECK(rel_err(dx, f.get("linear.dx")) <= kTol);
  CHECK(rel_err(dw, f.get("linear.dw")) <= kTol);
  CHECK(rel_err(db, f.get("linear.db")) <= kTol);
}

TEST_CASE("layer norm forward and backward", "[backward][layer_norm]") {
  const Fixture& f = fixture();
  const auto p = f.params("layer_norm");
  const int64_t R = p["rows"], D = p["dim"];
  const float eps = p["eps"];
  const auto x = f.get("layer_norm.x"), gamma = f.get("layer_norm.gamma"),
             beta = f.get("layer_norm.beta"), dy = f.get("layer_norm.dy");
  std::vector<float> y(R * D), mean(R), rstd(R), dx(R * D), dg(D), dbeta(D);
  layer_norm_forward(x.data(), R, D, gamma.data(), beta.data(), eps, y.data(), mean.data(), rstd.data());
  layer_norm_backward(dy.data(), x.data(), mean.data(), rstd.data(), gamma.data(), R, D, dx.data(),
                      dg.data(), dbeta.data());
  SECTION("against PyTorch") {
    CHECK(rel_err(y, f.get("layer_norm.y")) <= kTol);
    CHECK(rel_err(dx, f.get("layer_norm.dx")) <= kTol);
    CHECK(rel_err(dg, f.get("layer_norm.dgamma")) <= kTol);
    CHECK(rel_err(dbeta, f.get("layer_norm.dbeta")) <= kTol);
  }
  SECTION("against the double reference") {
    std::vector<double> ry(R * D), rdx(R * D), rdg(D), rdb(D);
    reference::layer_norm_forward(x.data(), R, D, gamma.data(), beta.data(), eps, ry.data(),
                                  nullptr, nullptr);
    reference::layer_norm_backward(dy.data(), x.data(), gamma.data(), R, D, eps, rdx.data(),
                                   rdg.data(), rdb.data());
    CHECK(rel_err(y, ry) <= kTol);
    CHECK(rel_err(dx, rdx) <= kTol);
    CHECK(rel_err(dg, rdg) <= kTol);
    CHECK(rel_err(dbeta, rdb) <= kTol);
  }
}

TEST_CASE("GELU and QuickGELU backward", "[backward][gelu]") {
  const Fixture& f = fixture();
  // GELU's backward is a dispatched kernel: every family this CPU has, on the fixture and on
  // x over [-12, 12] (both tails, past the range where φ is cut to 0), lengths not a multiple of 16.
  for_each_family([&](IsaFamily family) {
    INFO("family " << isa_name(family));
    const int64_t n = 1001;
    std::vector<float> x(n), dy = randn(n, 21), dx0 = randn(n, 22);
    for (int64_t i = 0; i < n; ++i) x[i] = -12.0f + 24.0f * static_cast<float>(i) / (n - 1);
    std::vector<float> dx = dx0;
    gelu_backward(x.data(), dy.data(), dx.data(), n);
    std::vector<double> rdx(n);
    reference::gelu_backward(x.data(), dy.data(), rdx.data(), n);
    for (int64_t i = 0; i < n; ++i) rdx[i] += dx0[i];
    CHECK(rel_err(dx, rdx) <= kTol);
    std::vector<float> fx = f.get("gelu.x"), fdy = f.get("gelu.dy"), fdx(fx.size(), 0.0f);
    gelu_backward(fx.data(), fdy.data(), fdx.data(), static_cast<int64_t>(fx.size()));
    CHECK(rel_err(fdx, f.get("gelu.dx")) <= kTol);
  });
  for (const std::string c : {"gelu", "quick_gelu"}) {
    INFO(c);
    const auto x = f.get(c + ".x"), dy = f.get(c + ".dy");
    const int64_t n = static_cast<int64_t>(x.size());
    std::vector<float> dx(n, 0.0f);
    std::vector<double> rdx(n);
    if (c == "gelu") {
      gelu_backward(x.data(), dy.data(), dx.data(), n);
      reference::gelu_backward(x.data(), dy.data(), rdx.data(), n);
    } else {
      quick_gelu_backward(x.data(), dy.data(), dx.data(), n);
      reference::quick_gelu_backward(x.data(), dy.data(), rdx.data(), n);
    }
    CHECK(rel_err(dx, f.get(c + ".dx")) <= kTol);
    CHECK(rel_err(dx, rdx) <= kTol);
  }
  // The forward agrees with the inference kernel's exact-erf GELU (1e-6 relative: both fp32 erf).
  const auto x = randn(1000, 9, 3.0f);
  std::vector<float> a(1000), b(x);
  gelu_forward(x.data(), a.data(), 1000);
  gelu_erf(b.data(), 1000);
  CHECK(rel_err(a, b) <= 1e-6);
}

TEST_CASE("GradInto::Set writes what GradInto::Add adds to zeros, whatever dx held", "[backward]") {
  // The block backward writes its first gradient of each buffer with Set instead of zeroing it:
  // linear_backward's dx (a GEMM without a residual), GELU's dx (a product without the fma),
  // attention's dq, dk, dv (every row of every head). NaN-filled buffers: a value not written, or
  // read back, shows. Equal as floats (the sign of a zero may differ).
  auto same = [](const std::vector<float>& set, const std::vector<float>& add) {
    REQUIRE(set.size() == add.size());
    for (size_t i = 0; i < set.size(); ++i) {
      INFO("element " << i << ": Set " << set[i] << ", Add " << add[i]);
      REQUIRE(set[i] == add[i]);
    }
  };
  for_each_family([&](IsaFamily family) {
    INFO("family " << isa_name(family));
    for (WeightType type : {WeightType::F32, WeightType::BF16}) {
      const TrainingGemmScope scope(type);
      for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 5, 3}, {197, 64, 192}, {1300, 40, 72}}) {
        INFO("linear M " << M << " N " << N << " K " << K << (type == WeightType::BF16 ? " bf16" : " fp32"));
        const auto x = randn(M * K, 31), w = randn(N * K, 32, 0.1f), dy = randn(M * N, 33);
        std::vector<float> add(M * K, 0.0f), set(M * K, std::nanf(""));
        linear_backward(x.data(), w.data(), dy.data(), M, N, K, add.data(), nullptr, nullptr);
        linear_backward(x.data(), w.data(), dy.data(), M, N, K, set.data(), nullptr, nullptr, GradInto::Set);
        same(set, add);
      }
    }
    const int64_t n = 1001;
    const auto x = randn(n, 34, 3.0f), dy = randn(n, 35);
    std::vector<float> add(n, 0.0f), set(n, std::nanf(""));
    gelu_backward(x.data(), dy.data(), add.data(), n);
    gelu_backward(x.data(), dy.data(), set.data(), n, GradInto::Set);
    same(set, add);
    for (auto [B, H, T, hd] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{2, 2, 31, 16}, {3, 4, 26, 24}, {1, 1, 1, 4}}) {
      INFO("attention B " << B << " H " << H << " T " << T << " hd " << hd);
      const int64_t D = H * hd;
      const auto qkv = randn(B * T * 3 * D, 36, 1.5f), dout = randn(B * T * D, 37);
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      std::vector<float> out(B * T * D), lse(B * H * T);
      const StridedRows sq{qkv.data(), T * 3 * D, 3 * D}, sk{qkv.data() + D, T * 3 * D, 3 * D},
          sv{qkv.data() + 2 * D, T * 3 * D, 3 * D};
      attention_forward(B, H, T, T, hd, sq, sk, sv, {out.data(), T * D, D}, scale, lse.data());
      std::vector<float> dadd(B * T * 3 * D, 0.0f), dset(B * T * 3 * D, std::nanf(""));
      for (GradInto into : {GradInto::Add, GradInto::Set}) {
        float* d = into == GradInto::Add ? dadd.data() : dset.data();
        attention_backward(B, H, T, T, hd, sq, sk, sv, {out.data(), T * D, D}, {dout.data(), T * D, D}, lse.data(),
                           scale, {d, T * 3 * D, 3 * D}, {d + D, T * 3 * D, 3 * D}, {d + 2 * D, T * 3 * D, 3 * D}, into);
      }
      same(dset, dadd);
    }
  });
}

TEST_CASE("softmax rows backward", "[backward][softmax]") {
  const Fixture& f = fixture();
  const int64_t R = 7, C = 19;
  const auto x = f.get("softmax.x"), dy = f.get("softmax.dy");
  std::vector<float> y = x, dx(R * C, 0.0f);
  softmax_rows(y.data(), R, C, C);
  CHECK(rel_err(y, f.get("softmax.y")) <= kTol);
  softmax_rows_backward(y.data(), dy.data(), dx.data(), R, C);
  CHECK(rel_err(dx, f.get("softmax.dx")) <= kTol);
  std::vector<double> rdx(R * C);
  reference::softmax_rows_backward(x.data(), dy.data(), rdx.data(), R, C);
  CHECK(rel_err(dx, rdx) <= kTol);
}

TEST_CASE("attention training forward and backward", "[backward][attention]") {
  SECTION("against PyTorch (separate q, k, v)") {
    const Fixture& f = fixture();
    const auto p = f.params("attention");
    const int64_t B = p["batch"], H = p["heads"], T = p["tokens"], hd = p["head_dim"];
    const float scale = p["scale"];
    const int64_t D = H * hd;
    const auto q = f.get("attention.q"), k = f.get("attention.k"), v = f.get("attention.v"),
               dout = f.get("attention.dout");
    std::vector<float> out(B * T * D), lse(B * H * T), dq(B * T * D), dk(B * T * D), dv(B * T * D);
    auto rows = [&](const std::vector<float>& t) { return StridedRows{t.data(), T * D, D}; };
    auto mut = [&](std::vector<float>& t) { return MutableRows{t.data(), T * D, D}; };
    attention_forward(B, H, T, T, hd, rows(q), rows(k), rows(v), mut(out), scale, lse.data());
    CHECK(rel_err(out, f.get("attention.out")) <= kTol);
    attention_backward(B, H, T, T, hd, rows(q), rows(k), rows(v), rows(out), rows(dout), lse.data(),
                       scale, mut(dq), mut(dk), mut(dv));
    CHECK(rel_err(dq, f.get("attention.dq")) <= kTol);
    CHECK(rel_err(dk, f.get("attention.dk")) <= kTol);
    CHECK(rel_err(dv, f.get("attention.dv")) <= kTol);
  }
  SECTION("against the double reference, in the fused qkv layout, q_len != kv_len, every family") {
    // Every kernel family this CPU has (the forward is the inference kernel with its lse; the
    // backward's element-wise step is vectorised per family); 600 keys span two key blocks.
    for_each_family([&](IsaFamily family) {
    for (auto [B, H, Tq, Tk, hd] : {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>{2, 2, 31, 31, 16},
                                   {1, 3, 5, 12, 8}, {3, 1, 1, 1, 4}, {1, 2, 70, 600, 16}}) {
      INFO("B " << B << " H " << H << " Tq " << Tq << " Tk " << Tk << " hd " << hd << " family "
                << isa_name(family));
      const int64_t D = H * hd, T = std::max(Tq, Tk);
      // One [B*T, 3D] buffer as the encoder's qkv projection writes it.
      const auto qkv = randn(B * T * 3 * D, 11, 1.5f);
      std::vector<float> q(B * Tq * D), k(B * Tk * D), v(B * Tk * D);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t e = 0; e < D; ++e) {
            const float* row = qkv.data() + (b * T + t) * 3 * D;
            if (t < Tq) q[(b * Tq + t) * D + e] = row[e];
            if (t < Tk) k[(b * Tk + t) * D + e] = row[D + e], v[(b * Tk + t) * D + e] = row[2 * D + e];
          }
      const auto dout = randn(B * Tq * D, 12);
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      std::vector<float> out(B * Tq * D), lse(B * H * Tq), dqkv(B * T * 3 * D, 0.0f);
      const StridedRows sq{qkv.data(), T * 3 * D, 3 * D}, sk{qkv.data() + D, T * 3 * D, 3 * D},
          sv{qkv.data() + 2 * D, T * 3 * D, 3 * D};
      attention_forward(B, H, Tq, Tk, hd, sq, sk, sv, {out.data(), Tq * D, D}, scale, lse.data());
      attention_backward(B, H, Tq, Tk, hd, sq, sk, sv, {out.data(), Tq * D, D},
                         {dout.data(), Tq * D, D}, lse.data(), scale,
                         {dqkv.data(), T * 3 * D, 3 * D}, {dqkv.data() + D, T * 3 * D, 3 * D},
                         {dqkv.data() + 2 * D, T * 3 * D, 3 * D});
      std::vector<double> rout(B * Tq * D), rdq(B * Tq * D), rdk(B * Tk * D), rdv(B * Tk * D);
      reference::attention_forward(B, H, Tq, Tk, hd, q.data(), k.data(), v.data(), scale, rout.data());
      reference::attention_backward(B, H, Tq, Tk, hd, q.data(), k.data(), v.data(), dout.data(),
                                    scale, rdq.data(), rdk.data(), rdv.data());
      std::vector<float> dq(B * Tq * D), dk(B * Tk * D), dv(B * Tk * D);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t e = 0; e < D; ++e) {
            const float* row = dqkv.data() + (b * T + t) * 3 * D;
            if (t < Tq) dq[(b * Tq + t) * D + e] = row[e];
            else CHECK(row[e] == 0.0f);  // rows past q_len get no query gradient
            if (t < Tk) dk[(b * Tk + t) * D + e] = row[D + e], dv[(b * Tk + t) * D + e] = row[2 * D + e];
          }
      CHECK(rel_err(out, rout) <= kTol);
      CHECK(rel_err(dq, rdq) <= kTol);
      CHECK(rel_err(dk, rdk) <= kTol);
      CHECK(rel_err(dv, rdv) <= kTol);
      // lse[b, h, i] = log Σ_j exp(scale·q·k), in double.
      std::vector<double> rlse(B * H * Tq);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < Tq; ++i) {
            std::vector<double> z(Tk);
            for (int64_t j = 0; j < Tk; ++j) {
              double dotp = 0;
              for (int64_t e = 0; e < hd; ++e)
                dotp += double(q[(b * Tq + i) * D + h * hd + e]) * k[(b * Tk + j) * D + h * hd + e];
              z[j] = scale * dotp;
            }
            const double mx = *std::max_element(z.begin(), z.end());
            double sum = 0;
            for (double x : z) sum += std::exp(x - mx);
            rlse[(b * H + h) * Tq + i] = mx + std::log(sum);
          }
      CHECK(rel_err(lse, rlse) <= kTol);
    }
    });
  }
}

TEST_CASE("cross-entropy with label smoothing", "[backward][loss]") {
  const Fixture& f = fixture();
  const auto p = f.params("cross_entropy");
  const int64_t R = p["rows"], C = p["classes"];
  const float ls = p["label_smoothing"];
  const auto logits = f.get("cross_entropy.logits"), labels_f = f.get("cross_entropy.labels");
  std::vector<int64_t> labels(labels_f.begin(), labels_f.end());
  std::vector<float> dz(R * C, 0.0f);
  const double loss = cross_entropy_forward_backward(logits.data(), labels.data(), R, C, ls, dz.data());
  CHECK(std::abs(loss - f.get("cross_entropy.loss")[0]) <= kTol * std::abs(loss));
  CHECK(rel_err(dz, f.get("cross_entropy.dlogits")) <= kTol);
  std::vector<double> rdz(R * C);
  const double rloss = reference::cross_entropy(logits.data(), labels.data(), R, C, ls, rdz.data());
  CHECK(std::abs(loss - rloss) <= 1e-12 * std::abs(rloss) + 1e-12);  // both in double
  CHECK(rel_err(dz, rdz) <= kTol);
  // A label outside the classes is an error, not a read past the row.
  labels[0] = C;
  CHECK_THROWS(cross_entropy_forward_backward(logits.data(), labels.data(), R, C, ls, dz.data()));
}

TEST_CASE("AdamW follows torch.optim.AdamW for 20 steps", "[optim]") {
  const Fixture& f = fixture();
  const auto p = f.params("adamw");
  const int64_t n = p["n"], steps = p["steps"];
  AdamWOptions o;
  o.lr = p["lr"], o.beta1 = p["beta1"], o.beta2 = p["beta2"], o.eps = p["eps"];
  o.weight_decay = p["weight_decay"];
  std::vector<float> w = f.get("adamw.w0"), m(n, 0.0f), v(n, 0.0f);
  const auto grads = f.get("adamw.grads"), after = f.get("adamw.after");
  for (int64_t s = 0; s < steps; ++s) {
    adamw_step(w, std::span<const float>(grads.data() + s * n, n), m, v, s + 1, o);
    const std::vector<float> want(after.begin() + s * n, after.begin() + (s + 1) * n);
    INFO("step " << s + 1);
    CHECK(rel_err(w, want) <= kTol);
  }
}

TEST_CASE("AdamW over segments of one buffer gives adamw_step's bits per segment", "[optim]") {
  // A model's parameters as segments of one flat buffer, each with its own decay and rate, gaps
  // (frozen tensors) left alone, unsorted, tensors smaller and larger than one task's slice: one
  // parallel pass must leave exactly what a call per tensor leaves, for 1 and 2 threads.
  const int64_t n = 70000;
  const auto w0 = randn(n, 31), g = randn(n, 32, 0.1f), m0 = randn(n, 33, 0.01f);
  std::vector<float> v0 = randn(n, 34, 0.01f);
  for (float& x : v0) x = std::abs(x);
  std::vector<AdamWSegment> segments;
  const std::vector<std::pair<int64_t, int64_t>> ranges = {{40000, 20000}, {0, 96}, {96, 1}, {200, 9216}, {9416, 27648},
                                                           {37064, 2000}, {60000, 10000}};  // gaps: 97-199, 39064-39999
  for (size_t i = 0; i < ranges.size(); ++i) {
    AdamWOptions o;
    o.lr = 1e-3f * static_cast<float>(i + 1), o.weight_decay = i % 2 ? 0.0f : 0.05f;
    segments.push_back({ranges[i].first, ranges[i].second, o});
  }
  for (int64_t step : {1, 7}) {
    std::vector<float> w = w0, m = m0, v = v0;
    for (const AdamWSegment& sg : segments) {
      const size_t o = static_cast<size_t>(sg.offset), len = static_cast<size_t>(sg.length);
      adamw_step(std::span<float>(w).subspan(o, len), std::span<const float>(g).subspan(o, len),
                 std::span<float>(m).subspan(o, len), std::span<float>(v).subspan(o, len), step, sg.options);
    }
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      std::vector<float> w2 = w0, m2 = m0, v2 = v0;
      adamw_step(w2, g, m2, v2, step, segments);
      set_num_threads(0);
      INFO("step " << step << ", " << threads << " threads");
      CHECK(w2 == w);
      CHECK(m2 == m);
      CHECK(v2 == v);
      CHECK(w2[150] == w0[150]);  // in a gap
    }
  }
  std::vector<float> w = w0, m = m0, v = v0;
  CHECK_THROWS_WITH(adamw_step(w, g, m, v, 1, std::vector<AdamWSegment>{{0, 100, {}}, {50, 100, {}}}),
                    Catch::Contains("disjoint"));
  CHECK_THROWS_WITH(adamw_step(w, g, m, v, 1, std::vector<AdamWSegment>{{n - 10, 20, {}}}), Catch::Contains("disjoint"));
  // An empty tensor at the offset of the next one (a 1-layer model's empty mid-position table) is
  // nothing to update, not an overlap, in either order.
  CHECK_NOTHROW(adamw_step(w, g, m, v, 1, std::vector<AdamWSegment>{{100, 50, {}}, {100, 0, {}}}));
  CHECK_NOTHROW(adamw_step(w, g, m, v, 1, std::vector<AdamWSegment>{{100, 0, {}}, {100, 50, {}}}));
}

TEST_CASE("SGD: momentum 0 is exactly w -= lr·g; momentum follows torch.optim.SGD", "[optim]") {
  const auto w0 = randn(1000, 21), g = randn(1000, 22);
  std::vector<float> w = w0;
  // lr 1 (the gradient check's step) is exact bit for bit; another lr is w − lr·g up to fp32
  // rounding (one or two roundings, as the compiler contracts it into an FMA or not).
  sgd_step(w, g, {}, 1.0f);
  for (size_t i = 0; i < w.size(); ++i) REQUIRE(w[i] == w0[i] - g[i]);
  w = w0;
  sgd_step(w, g, {}, 0.37f);
  std::vector<double> want(w.size());
  for (size_t i = 0; i < w.size(); ++i) want[i] = static_cast<double>(w0[i]) - 0.37 * g[i];
  CHECK(rel_err(w, want) <= 1e-6);

  const Fixture& f = fixture();
  const auto p = f.params("sgd");
  const int64_t n = p["n"], steps = p["steps"];
  std::vector<float> ws = f.get("sgd.w0"), buf(n, 0.0f);
  const auto grads = f.get("sgd.grads"), after = f.get("sgd.after");
  for (int64_t s = 0; s < steps; ++s) {
    sgd_step(ws, std::span<const float>(grads.data() + s * n, n), buf, p["lr"].get<float>(),
             p["momentum"].get<float>(), p["weight_decay"].get<float>(), s == 0);
    INFO("step " << s + 1);
    CHECK(rel_err(ws, std::vector<float>(after.begin() + s * n, after.begin() + (s + 1) * n)) <= kTol);
  }
}

TEST_CASE("gradient clipping by global norm follows clip_grad_norm_", "[optim]") {
  const Fixture& f = fixture();
  std::vector<float> g = f.get("clip.g");
  const double total = clip_grad_norm(g, 1.0);
  CHECK(std::abs(total - f.get("clip.total")[0]) <= kTol * total);
  CHECK(rel_err(g, f.get("clip.clipped")) <= kTol);
  // Below the threshold, and with max_norm 0, nothing changes.
  std::vector<float> h = f.get("clip.g");
  const std::vector<float> h0 = h;
  clip_grad_norm(h, 1e6);
  CHECK(h == h0);
  clip_grad_norm(h, 0.0);
  CHECK(h == h0);
}

TEST_CASE("warm-up + cosine learning rate", "[optim]") {
  // Worked by hand: peak 1, 10 steps, 2 of warm-up, min 0.
  CHECK(warmup_cosine_lr(0, 10, 2, 1.0) == Approx(0.5).epsilon(1e-12));
  CHECK(warmup_cosine_lr(1, 10, 2, 1.0) == Approx(1.0).epsilon(1e-12));
  CHECK(warmup_cosine_lr(2, 10, 2, 1.0) == Approx(1.0).epsilon(1e-12));
  CHECK(warmup_cosine_lr(6, 10, 2, 1.0) == Approx(0.5).epsilon(1e-12));  // half way: cos(π/2) = 0
  CHECK(warmup_cosine_lr(10, 10, 2, 1.0, 0.1) == Approx(0.1).epsilon(1e-12));
  // No warm-up: the first step takes the full rate.
  CHECK(warmup_cosine_lr(0, 5, 0, 0.3) == 0.3);
}

TEST_CASE("training kernels are bit-identical for 1 and 2 threads", "[backward][threads]") {
  const int64_t M = 394, N = 192, K = 64;  // two 197-token images through a 64-wide layer
  const auto x = randn(M * K, 31), w = randn(N * K, 32, 0.1f), dy = randn(M * N, 33);
  {
    auto [a, b] = one_and_two_threads([&] {
      std::vector<float> out(M * K + N * K + N, 0.0f);
      linear_backward(x.data(), w.data(), dy.data(), M, N, K, out.data(), out.data() + M * K,
                      out.data() + M * K + N * K);
      return out;
    });
    CHECK(a == b);
  }
  {
    const auto gamma = randn(N, 34), beta = randn(N, 35);
    auto [a, b] = one_and_two_threads([&] {
      std::vector<float> y(M * N), mean(M), rstd(M), out(M * N + 2 * N, 0.0f);
      layer_norm_forward(dy.data(), M, N, gamma.data(), beta.data(), 1e-6f, y.data(), mean.data(),
                         rstd.data());
      layer_norm_backward(y.data(), dy.data(), mean.data(), rstd.data(), gamma.data(), M, N,
                          out.data(), out.data() + M * N, out.data() + M * N + N);
      out.insert(out.end(), y.begin(), y.end());
      return out;
    });
    CHECK(a == b);
  }
  {
    const int64_t B = 2, H = 3, T = 65, hd = 16, D = H * hd;
    const auto qkv = randn(B * T * 3 * D, 36), dout = randn(B * T * D, 37);
    auto [a, b] = one_and_two_threads([&] {
      std::vector<float> out(B * T * D), lse(B * H * T), dqkv(B * T * 3 * D, 0.0f);
      const StridedRows sq{qkv.data(), T * 3 * D, 3 * D}, sk{qkv.data() + D, T * 3 * D, 3 * D},
          sv{qkv.data() + 2 * D, T * 3 * D, 3 * D};
      attention_forward(B, H, T, T, hd, sq, sk, sv, {out.data(), T * D, D}, 0.25f, lse.data());
      attention_backward(B, H, T, T, hd, sq, sk, sv, {out.data(), T * D, D}, {dout.data(), T * D, D},
                         lse.data(), 0.25f, {dqkv.data(), T * 3 * D, 3 * D},
                         {dqkv.data() + D, T * 3 * D, 3 * D}, {dqkv.data() + 2 * D, T * 3 * D, 3 * D});
      dqkv.insert(dqkv.end(), out.begin(), out.end());
      return dqkv;
    });
    CHECK(a == b);
  }
  {
    const auto g = randn(300000, 38);
    auto [a, b] = one_and_two_threads([&] {
      std::vector<float> h = g;
      const double total = clip_grad_norm(h, 1.0);
      h.push_back(static_cast<float>(total));
      return h;
    });
    CHECK(a == b);
  }
}

TEST_CASE("SwiGLU backward", "[backward][swiglu]") {
  const Fixture& f = fixture();
  const auto p = f.params("swiglu");
  const int64_t R = p["rows"], F = p["f"];
  const auto x = f.get("swiglu.x"), dy = f.get("swiglu.dy");
  std::vector<float> dx(R * 2 * F, 0.0f);
  swiglu_backward(x.data(), dy.data(), dx.data(), R, F);
  CHECK(rel_err(dx, f.get("swiglu.dx")) <= kTol);
  std::vector<double> rdx(R * 2 * F);
  reference::swiglu_backward(x.data(), dy.data(), rdx.data(), R, F);
  CHECK(rel_err(dx, rdx) <= kTol);
}

TEST_CASE("interpolation backward is the forward's adjoint", "[backward][interpolate]") {
  const Fixture& f = fixture();
  for (const std::string c : {"interp_hf_bicubic", "interp_bicubic_size", "interp_bilinear_size",
                              "interp_bilinear_ac", "interp_bicubic_aa_down", "interp_bicubic_aa_up"}) {
    INFO(c);
    const auto p = f.params(c);
    const int64_t ih = p["in_h"], iw = p["in_w"], oh = p["out_h"], ow = p["out_w"];
    Interpolation how;
    how.mode = p["antialias"].get<bool>() ? InterpolationMode::BicubicAntialias
               : p["mode"] == "bilinear"  ? InterpolationMode::Bilinear
                                          : InterpolationMode::Bicubic;
    how.align_corners = p["align_corners"];
    how.scale_h = p["scale_h"], how.scale_w = p["scale_w"];
    const auto x = f.get(c + ".x"), dy = f.get(c + ".dy");
    const int64_t C = static_cast<int64_t>(x.size()) / (ih * iw);
    REQUIRE(static_cast<int64_t>(dy.size()) == C * oh * ow);
    std::vector<float> dx(C * ih * iw, 0.0f);
    interpolate_backward(how, dy.data(), C, ih, iw, oh, ow, dx.data());
    CHECK(rel_err(dx, f.get(c + ".dx")) <= kTol);
    std::vector<double> rdx(C * ih * iw);
    reference::interpolate_backward(
        [&](const float* in, float* out) { interpolate_forward(how, in, 1, ih, iw, out, oh, ow); },
        dy.data(), C, ih, iw, oh, ow, rdx.data());
    CHECK(rel_err(dx, rdx) <= kTol);
  }
}

TEST_CASE("resampling and SwiGLU backward are bit-identical for 1 and 2 threads", "[backward][threads]") {
  const auto dy = randn(192 * 37 * 37, 41), x = randn(300 * 128, 42), g = randn(300 * 64, 43);
  auto [a, b] = one_and_two_threads([&] {
    std::vector<float> din(192 * 14 * 14, 0.0f), dx(300 * 128, 0.0f);
    Interpolation how;  // HF ViT at 592x592: a 14x14 grid to 37x37
    how.scale_h = how.scale_w = 37.1 / 14;
    interpolate_backward(how, dy.data(), 192, 14, 14, 37, 37, din.data());
    swiglu_backward(x.data(), g.data(), dx.data(), 300, 64);
    din.insert(din.end(), dx.begin(), dx.end());
    return din;
  });
  CHECK(a == b);
}
