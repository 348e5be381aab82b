// linear(): every path against a naive double-precision loop. Tolerance, per output element:
//   |y - ref| <= 1e-6 (sqrt(K) + 2) (1 + S + |residual|),   S = sum_k |x w| + |b|,
// i.e. ~15x the typical fp32 rounding of a K-term sum (eps sqrt(K) S, eps = 6e-8) and below
// the smallest single-term mistake (one k dropped costs ~S / K). GELU's erf adds < 4e-7 |y|.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/kernels.hpp"
#include "tessera/parallel.hpp"

using namespace tessera;

namespace {

std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(rng);
  return v;
}

double gelu_ref(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

struct Problem {
  int64_t M, N, K, ldx, ldy;
  std::vector<float> x, w, b, r;
  std::vector<double> dot, mag;  // sum_k x w (+ b), and sum_k |x w| (+ |b|)
};

Problem make_problem(int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldy, uint32_t seed) {
  Problem p{M, N, K, ldx, ldy, random_floats(M * ldx, seed), random_floats(N * K, seed + 1),
            random_floats(N, seed + 2), random_floats(M * ldy, seed + 3), {}, {}};
  p.dot.resize(M * N);
  p.mag.resize(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < K; ++k) {
        double t = double(p.x[m * ldx + k]) * double(p.w[n * K + k]);
        s += t;
        a += std::fabs(t);
      }
      p.dot[m * N + n] = s;
      p.mag[m * N + n] = a;
    }
  return p;
}

enum class Case { Plain, BiasGelu, BiasReluResidual, BiasResidualAliasing, GeluResidual };

// Runs one case; returns the worst |err| / tolerance (<= 1 passes) and checks that the padding
// columns of y (n >= N) are untouched.
double run_case(const Problem& p, const PackedLinear& pw, Case c, bool* padding_ok) {
  const float kSentinel = 12345.0f;
  std::vector<float> y(p.M * p.ldy, kSentinel);
  Activation act = Activation::None;
  const float* residual = nullptr;
  bool bias = c != Case::Plain && c != Case::GeluResidual;
  if (c == Case::BiasGelu || c == Case::GeluResidual) act = Activation::Gelu;
  if (c == Case::BiasReluResidual) act = Activation::Relu;
  if (c == Case::BiasReluResidual || c == Case::GeluResidual) residual = p.r.data();
  if (c == Case::BiasResidualAliasing) {
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = 0; n < p.N; ++n) y[m * p.ldy + n] = p.r[m * p.ldy + n];
    residual = y.data();
  }
  linear(p.x.data(), p.M, p.ldx, pw, y.data(), p.ldy, act, residual);
  (void)bias;
  double worst = 0;
  *padding_ok = true;
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      double v = p.dot[m * p.N + n], mag = p.mag[m * p.N + n];
      if (bias) v += p.b[n], mag += std::fabs(p.b[n]);
      if (act == Activation::Gelu) v = gelu_ref(v);
      if (act == Activation::Relu) v = std::max(v, 0.0);
      double res = 0;
      if (residual) res = p.r[m * p.ldy + n], v += res;
      double tol = 1e-6 * (std::sqrt(double(p.K)) + 2) * (1 + mag + std::fabs(res));
      if (act == Activation::Gelu) tol += 4e-7 * std::fabs(v);
      worst = std::max(worst, std::fabs(y[m * p.ldy + n] - v) / tol);
    }
    for (int64_t n = p.N; n < p.ldy; ++n)
      if (y[m * p.ldy + n] != kSentinel) *padding_ok = false;
  }
  return worst;
}

std::vector<float> run_plain(const Problem& p, const PackedLinear& pw, Activation act) {
  std::vector<float> y(p.M * p.ldy, 0.0f);
  linear(p.x.data(), p.M, p.ldx, pw, y.data(), p.ldy, act, p.r.data());
  return y;
}

}  // namespace

TEST_CASE("linear matches a double-precision reference over awkward sizes, all epilogues") {
  uint32_t seed = 1;
  for (int64_t M : {1, 2, 13, 197, 400})
    for (int64_t N : {1, 10, 31, 32, 33, 100, 768})
      for (int64_t K : {1, 3, 17, 64, 773}) {
        // Strided rows (ldx > K, ldy > N) except every third size, which is packed tight.
        bool tight = (seed % 3) == 0;
        Problem p = make_problem(M, N, K, tight ? K : K + 3, tight ? N : N + 5, seed++);
        PackedLinear pw = pack_linear(p.w.data(), p.b.data(), N, K);
        PackedLinear pw_nobias = pack_linear(p.w.data(), nullptr, N, K);
        for (bool generic : {false, true}) {
          force_generic_kernels(generic);
          for (Case c : {Case::Plain, Case::BiasGelu, Case::BiasReluResidual,
                         Case::BiasResidualAliasing, Case::GeluResidual}) {
            bool padding_ok = false;
            const PackedLinear& w = (c == Case::Plain || c == Case::GeluResidual) ? pw_nobias : pw;
            double worst = run_case(p, w, c, &padding_ok);
            INFO("M=" << M << " N=" << N << " K=" << K << " ldx=" << p.ldx << " ldy=" << p.ldy
                      << " kernel=" << linear_kernel_name(WeightType::F32)
                      << " case=" << int(c) << " worst err/tol=" << worst);
            REQUIRE(worst <= 1.0);
            REQUIRE(padding_ok);
          }
        }
        force_generic_kernels(false);
      }
}

TEST_CASE("linear results are bit-identical for 1, 2 and 3 threads") {
  // The thread count changes where row blocks start (any row) and whether columns are split;
  // no output may depend on it, for any weight type.
  for (bool generic : {false, true}) {
    force_generic_kernels(generic);
    uint32_t seed = 100;
    for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{197, 768, 773},
                           {400, 100, 64},
                           {13, 33, 17},
                           {1576, 64, 96},
                           {29, 2304, 40}}) {
      Problem p = make_problem(M, N, K, K + 1, N + 2, seed++);
      for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
        PackedLinear pw = pack_linear(p.w.data(), p.b.data(), N, K, type);
        set_num_threads(1);
        std::vector<float> one = run_plain(p, pw, Activation::Gelu);
        for (int threads : {2, 3}) {
          set_num_threads(threads);
          std::vector<float> many = run_plain(p, pw, Activation::Gelu);
          INFO("M=" << M << " N=" << N << " K=" << K << " threads=" << threads
                    << " kernel=" << linear_kernel_name(type));
          REQUIRE(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)) == 0);
        }
      }
    }
  }
  force_generic_kernels(false);
  set_num_threads(0);
}

TEST_CASE("the epilogue's erf and GELU match std::erf") {
  // Dense grid over [-8, 8] plus the branch points. erf: within 3e-7 relative (about 2.5 ulp)
  // or 1e-30 absolute near 0. GELU: 4e-7 relative, plus 6e-8 absolute for the negative tail
  // (x < -4 sqrt 2, where |gelu| < 6e-8 and the kernel returns 0).
  std::vector<float> xs;
  for (int i = -800000; i <= 800000; ++i) xs.push_back(float(i) * 1e-5f);
  for (float v : {0.921875f, -0.921875f, 4.0f, -4.0f, 1e-30f, -1e-30f, 0.0f, 30.0f, -30.0f,
                  1e4f, -1e4f})
    xs.push_back(v);
  std::vector<float> out(xs.size());
  for (bool generic : {false, true}) {
    force_generic_kernels(generic);
    INFO("kernel=" << linear_kernel_name(WeightType::F32));
    linear_erf(xs.data(), out.data(), int64_t(xs.size()));
    double worst_erf = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      double ref = std::erf(double(xs[i]));
      worst_erf = std::max(worst_erf, std::fabs(out[i] - ref) / (3e-7 * std::fabs(ref) + 1e-30));
    }
    linear_gelu(xs.data(), out.data(), int64_t(xs.size()));
    double worst_gelu = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      double ref = gelu_ref(double(xs[i]));
      worst_gelu = std::max(worst_gelu, std::fabs(out[i] - ref) / (4e-7 * std::fabs(ref) + 6e-8));
    }
    CHECK(worst_erf <= 1.0);
    CHECK(worst_gelu <= 1.0);
  }
  force_generic_kernels(false);
}

TEST_CASE("linear reports its kernel and rejects what it cannot do") {
  force_generic_kernels(true);
  REQUIRE(linear_kernel_name(WeightType::F32) == "generic");
  force_generic_kernels(false);
  INFO("family " << isa_name(isa_family()) << ", CPU features " << cpu_features_seen());
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  REQUIRE(cpu_isa_family() == (avx512 ? IsaFamily::Avx512 : avx2 ? IsaFamily::Avx2 : IsaFamily::Generic));
  if (isa_family() == IsaFamily::Avx512) {  // not capped by TESSERA_ISA
    REQUIRE(linear_kernel_name(WeightType::F32) == "avx512f");
    if (__builtin_cpu_supports("avx512bf16"))
      REQUIRE(linear_kernel_name(WeightType::BF16) == "avx512bf16");
    if (__builtin_cpu_supports("avx512vnni"))
      REQUIRE(linear_kernel_name(WeightType::INT8) == "avx512vnni");
  }
  if (isa_family() == IsaFamily::Avx2) {
    REQUIRE(linear_kernel_name(WeightType::F32) == "avx2");
    REQUIRE(linear_kernel_name(WeightType::BF16) == "avx2-bf16");
    const bool vnni = cpu_features_seen().find("avxvnni") != std::string::npos && avxvnni_allowed();
    REQUIRE(linear_kernel_name(WeightType::INT8) == (vnni ? "avxvnni" : "avx2-int8"));
    REQUIRE(linear_int8_levels() == 254);
  }
  force_generic_kernels(true);
  REQUIRE(linear_kernel_name(WeightType::INT8) == "generic");  // int8 has a portable path too
  force_generic_kernels(false);
  std::vector<float> w(6, 1.0f), x(3, 1.0f), y(2, 0.0f);
  REQUIRE_THROWS_AS(pack_linear(w.data(), nullptr, 0, 3), Error);
  PackedLinear pw = pack_linear(w.data(), nullptr, 2, 3);
  REQUIRE_THROWS_AS(linear(x.data(), 1, 2, pw, y.data(), 2), Error);  // ldx < K
  REQUIRE_THROWS_AS(linear(x.data(), 1, 3, pw, y.data(), 1), Error);  // ldy < N
  linear(x.data(), 1, 3, pw, y.data(), 2);
  REQUIRE(y[0] == 3.0f);
  REQUIRE(y[1] == 3.0f);
}

namespace {
// bf16 rounding computed independently of the kernels: keep 8 significant bits, ties to even
// (nearbyint in the default rounding mode).
float round_bf16(float f) {
  int e = 0;
  double m = std::frexp(double(f), &e);  // f = m 2^e, 0.5 <= |m| < 1
  return float(std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8));
}
}  // namespace

TEST_CASE("bf16 linear matches a double reference on bf16-rounded x and W, any thread count") {
  // Same tolerance as fp32: rounding x and W is part of the definition, the sum is fp32.
  uint32_t seed = 500;
  for (int64_t M : {1, 13, 197})
    for (int64_t N : {10, 33, 768})
      for (int64_t K : {1, 3, 64, 773}) {
        Problem p = make_problem(M, N, K, K + 2, N + 1, seed++);
        PackedLinear pw = pack_linear(p.w.data(), p.b.data(), N, K, WeightType::BF16);
        REQUIRE(pw.type == WeightType::BF16);
        std::vector<float> y_dispatched;
        for (bool generic : {false, true}) {
          force_generic_kernels(generic);
          INFO("M=" << M << " N=" << N << " K=" << K
                    << " kernel=" << linear_kernel_name(WeightType::BF16));
          std::vector<float> y = run_plain(p, pw, Activation::Gelu);
          double worst = 0;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double v = p.b[n], mag = std::fabs(p.b[n]);
              for (int64_t k = 0; k < K; ++k) {
                double t = double(round_bf16(p.x[m * p.ldx + k])) * double(round_bf16(p.w[n * K + k]));
                v += t;
                mag += std::fabs(t);
              }
              v = gelu_ref(v) + p.r[m * p.ldy + n];
              double tol = 1e-6 * (std::sqrt(double(K)) + 2) * (1 + mag + std::fabs(p.r[m * p.ldy + n])) +
                           4e-7 * std::fabs(v);
              worst = std::max(worst, std::fabs(y[m * p.ldy + n] - v) / tol);
            }
          REQUIRE(worst <= 1.0);
          set_num_threads(2);
          std::vector<float> y2 = run_plain(p, pw, Activation::Gelu);
          set_num_threads(1);
          std::vector<float> y1 = run_plain(p, pw, Activation::Gelu);
          set_num_threads(0);
          REQUIRE(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0);
          REQUIRE(std::memcmp(y.data(), y2.data(), y1.size() * sizeof(float)) == 0);
          // The portable path sums in vdpbf16ps's order with its roundings: same bits before
          // the activation (whose polynomials may or may not be contracted to FMAs).
          std::vector<float> y_none = run_plain(p, pw, Activation::None);
          if (!generic) y_dispatched = y_none;
          else REQUIRE(std::memcmp(y_none.data(), y_dispatched.data(), y.size() * sizeof(float)) == 0);
        }
        force_generic_kernels(false);
      }
}

TEST_CASE("a layer norm fused into linear gives the bits of layer_norm then linear") {
  // The fused path normalises each task's rows with layer_norm_row into scratch and packs from
  // there, so it must agree exactly with the two-step path, on every kernel and thread count.
  uint32_t seed = 900;
  for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 33, 17},
                         {13, 64, 64},
                         {197, 100, 773},
                         {400, 768, 96}}) {
    const int64_t ldx = K + 3;
    auto x = random_floats(M * ldx, seed++, -2.0f, 3.0f), w = random_floats(N * K, seed++);
    auto b = random_floats(N, seed++), gamma = random_floats(K, seed++, 0.5f, 1.5f),
         beta = random_floats(K, seed++);
    const RowNorm norm{gamma.data(), beta.data(), 1e-6f};
    for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
      PackedLinear pw = pack_linear(w.data(), b.data(), N, K, type);
      for (bool generic : {false, true}) {
        force_generic_kernels(generic);
        INFO("M=" << M << " N=" << N << " K=" << K << " kernel=" << linear_kernel_name(type));
        std::vector<float> normed(M * K), expected(M * N);
        layer_norm(x.data(), M, K, ldx, gamma.data(), beta.data(), 1e-6f, normed.data(), K);
        linear(normed.data(), M, K, pw, expected.data(), N, Activation::Gelu);
        for (int threads : {1, 2}) {
          set_num_threads(threads);
          std::vector<float> fused(M * N);
          linear(x.data(), M, ldx, pw, fused.data(), N, Activation::Gelu, nullptr, &norm);
          CHECK(std::memcmp(fused.data(), expected.data(), fused.size() * sizeof(float)) == 0);
        }
        set_num_threads(0);
      }
      force_generic_kernels(false);
    }
  }
  std::vector<float> w(6, 1.0f), x(3, 1.0f), y(2, 0.0f);
  PackedLinear pw = pack_linear(w.data(), nullptr, 2, 3);
  const RowNorm missing{nullptr, nullptr, 1e-5f};
  REQUIRE_THROWS_AS(linear(x.data(), 1, 3, pw, y.data(), 2, Activation::None, nullptr, &missing),
                    Error);
}

TEST_CASE("pack_linear from a row source, with or without an arena, packs the same bytes as from memory") {
  // Awkward shapes: N not a multiple of the 32-wide panel, K odd (bf16 pairs and int8 quads pad).
  for (auto [N, K] : {std::pair<int64_t, int64_t>{70, 37}, {32, 8}, {5, 1}}) {
    for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
      INFO("N " << N << " K " << K << " type " << static_cast<int>(type));
      const std::vector<float> w = random_floats(N * K, 11), b = random_floats(N, 12);
      // Freed, dirty memory of the packed size first: the packer must write every word itself,
      // the padding's zeros included, whatever memory it gets.
      {
        std::vector<float> dirty(static_cast<size_t>((N + 31) / 32 * 32 * (K + 3) + 64),
                                 std::numeric_limits<float>::quiet_NaN());
      }
      PackedLinear from_memory = pack_linear(w.data(), b.data(), N, K, type);
      std::vector<std::atomic<int>> asked(N);
      std::atomic<int> bad_ranges{0};  // counted, not CHECKed: the callback runs on pool threads
      WeightRows rows = [&](int64_t n0, int64_t n1, float* dst) {
        if (n0 < 0 || n1 <= n0 || n1 > N || n0 % 32 != 0) {  // whole panels from the start
          ++bad_ranges;
          return;
        }
        for (int64_t n = n0; n < n1; ++n) ++asked[n];
        std::memcpy(dst, w.data() + n0 * K, sizeof(float) * (n1 - n0) * K);
      };
      PackedLinear streamed = pack_linear(rows, b.data(), N, K, type);
      CHECK(bad_ranges == 0);
      for (int64_t n = 0; n < N; ++n) CHECK(asked[n] == 1);  // each row asked for exactly once
      PackedLinear in_arena;
      {
        WeightArena arena;
        in_arena = pack_linear(rows, b.data(), N, K, type, &arena);
        PackedLinear other = pack_linear(rows, nullptr, N, K, type, &arena);  // a second piece
        CHECK(reinterpret_cast<uintptr_t>(in_arena.packed.get()) % 64 == 0);
        CHECK(reinterpret_cast<uintptr_t>(other.packed.get()) % 64 == 0);
        CHECK(other.packed.get() != in_arena.packed.get());
      }  // the arena goes; its pieces stay valid
      for (const PackedLinear* p : {&streamed, &in_arena}) {
        REQUIRE(p->packed_bytes == from_memory.packed_bytes);
        CHECK(std::memcmp(p->packed.get(), from_memory.packed.get(), p->packed_bytes) == 0);
        CHECK(std::memcmp(p->bias.get(), from_memory.bias.get(), sizeof(float) * N) == 0);
      }
      // The padding columns of the last panel are zeros (the kernels read them).
      if (type == WeightType::F32 && N % 32) {
        const float* last = static_cast<const float*>(from_memory.packed.get()) + (N / 32) * K * 32;
        int nonzero = 0;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = N % 32; c < 32; ++c) nonzero += last[k * 32 + c] != 0.0f;
        CHECK(nonzero == 0);
      }
      // And the arena's copy computes what the reference does.
      const std::vector<float> x = random_floats(3 * K, 13);
      std::vector<float> y1(3 * N), y2(3 * N);
      linear(x.data(), 3, K, from_memory, y1.data(), N);
      linear(x.data(), 3, K, in_arena, y2.data(), N);
      CHECK(y1 == y2);
    }
  }
}

TEST_CASE("the kernel family is capped by set_isa_cap and force_generic_kernels, never raised") {
  const IsaFamily top = isa_family();  // the CPU's, or TESSERA_ISA's cap
  for (IsaFamily cap : {IsaFamily::Generic, IsaFamily::Avx2, IsaFamily::Avx512}) {
    set_isa_cap(cap);
    const IsaFamily want = static_cast<int>(cap) < static_cast<int>(top) ? cap : top;
    INFO("cap " << isa_name(cap) << ", top " << isa_name(top));
    REQUIRE(isa_family() == want);
    REQUIRE(linear_kernel_name(WeightType::F32).rfind(want == IsaFamily::Avx512 ? "avx512" : isa_name(want), 0) == 0);
    force_generic_kernels(true);
    REQUIRE(isa_family() == IsaFamily::Generic);
    force_generic_kernels(false);
    REQUIRE(isa_family() == want);
  }
  set_isa_cap(IsaFamily::Avx512);
  REQUIRE(isa_family() == top);
  REQUIRE(parse_isa("avx2") == IsaFamily::Avx2);
  REQUIRE_THROWS_AS(parse_isa("sse4"), Error);
  REQUIRE_THROWS_WITH(parse_isa("AVX2"), Catch::Matchers::Contains("expected avx512, avx2 or generic"));
}

TEST_CASE("every family the CPU has gives the same packed weights' results within tolerance") {
  // The panels are the same for every family: one packing, run under each cap, against the
  // double reference (the fp32 tolerance above), bit-identical for 1 and 2 threads.
  uint32_t seed = 7000;
  for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{197, 100, 773}, {7, 33, 64}, {1, 768, 3}}) {
    Problem p = make_problem(M, N, K, K + 1, N + 3, seed++);
    PackedLinear pw = pack_linear(p.w.data(), p.b.data(), N, K);
    for (IsaFamily cap : {IsaFamily::Avx512, IsaFamily::Avx2, IsaFamily::Generic}) {
      set_isa_cap(cap);
      INFO("M=" << M << " N=" << N << " K=" << K << " kernel=" << linear_kernel_name(WeightType::F32));
      bool padding_ok = false;
      REQUIRE(run_case(p, pw, Case::BiasGelu, &padding_ok) <= 1.0);
      REQUIRE(run_case(p, pw, Case::BiasReluResidual, &padding_ok) <= 1.0);
      REQUIRE(padding_ok);
    }
  }
  set_isa_cap(IsaFamily::Avx512);
}

TEST_CASE("packing into the caller's buffer gives the same panels and product, and reuses it", "[gemm]") {
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const auto& [N, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {45, 19}, {70, 33}, {96, 64}}) {
    INFO("N " << N << " K " << K);
    std::vector<float> w(static_cast<size_t>(N * K)), bias(static_cast<size_t>(N)), x(static_cast<size_t>(5 * K));
    for (auto* v : {&w, &bias, &x})
      for (auto& e : *v) e = u(rng);
    const PackedLinear a = pack_linear(w.data(), bias.data(), N, K);
    // Stale contents in the buffer must not matter: fill it with NaN first, and pack twice.
    const int64_t floats = pack_linear_buffer_floats(N, K);
    float* buffer = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((floats * 4 + 63) / 64 * 64)));
    std::fill(buffer, buffer + floats, std::nanf(""));
    PackedLinear b = pack_linear(w.data(), bias.data(), N, K, buffer);
    b = pack_linear(w.data(), bias.data(), N, K, buffer);
    REQUIRE(a.packed_bytes == b.packed_bytes);
    CHECK(b.packed.get() == buffer);
    CHECK(std::memcmp(a.packed.get(), b.packed.get(), a.packed_bytes) == 0);
    std::vector<float> ya(static_cast<size_t>(5 * N)), yb(static_cast<size_t>(5 * N));
    linear(x.data(), 5, K, a, ya.data(), N);
    linear(x.data(), 5, K, b, yb.data(), N);
    CHECK(ya == yb);
    // The transposed packer into a buffer: the same panels again.
    std::vector<float> wt(static_cast<size_t>(K * N));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) wt[k * N + n] = w[n * K + k];
    const PackedLinear c = pack_linear_transposed(wt.data(), N, N, K, buffer);
    CHECK(c.packed_bytes == a.packed_bytes);
    CHECK(std::memcmp(a.packed.get(), c.packed.get(), a.packed_bytes) == 0);
    std::free(buffer);
  }
  std::vector<float> w(64);
  alignas(64) float unaligned[80];
  CHECK_THROWS_WITH(pack_linear(w.data(), nullptr, 8, 8, unaligned + 1), Catch::Contains("64-byte aligned"));
  CHECK_THROWS_WITH(pack_linear_transposed(w.data(), 8, 8, 8, unaligned + 1), Catch::Contains("64-byte aligned"));
}

namespace {
// Wᵀ of W [N, K] as K rows of ld >= N floats (the rest zero): what pack_linear_transposed reads.
std::vector<float> transposed(const std::vector<float>& w, int64_t N, int64_t K, int64_t ld) {
  std::vector<float> wt(static_cast<size_t>(K * ld), 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) wt[k * ld + n] = w[n * K + k];
  return wt;
}

// Two packings of one W must give the same y = x·Wᵀ (+ bias) on 3 random rows, bit for bit.
void check_same_product(const PackedLinear& a, const PackedLinear& b, int64_t N, int64_t K, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(3 * K)), ya(static_cast<size_t>(3 * N)), yb(static_cast<size_t>(3 * N));
  for (auto& v : x) v = u(rng);
  linear(x.data(), 3, K, a, ya.data(), N);
  linear(x.data(), 3, K, b, yb.data(), N);
  CHECK(ya == yb);
}
}  // namespace

TEST_CASE("pack_linear_transposed packs W from Wt exactly as pack_linear packs W", "[gemm]") {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const auto& [N, K, ld] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 1, 1}, {32, 7, 32}, {45, 19, 50}, {70, 33, 70}}) {
    std::vector<float> w(static_cast<size_t>(N * K));
    for (auto& v : w) v = u(rng);
    const std::vector<float> wt = transposed(w, N, K, ld);
    const PackedLinear a = pack_linear(w.data(), nullptr, N, K);
    const PackedLinear b = pack_linear_transposed(wt.data(), ld, N, K);
    INFO("N " << N << " K " << K << " ld " << ld);
    REQUIRE(a.packed_bytes == b.packed_bytes);
    CHECK(std::memcmp(a.packed.get(), b.packed.get(), a.packed_bytes) == 0);
    check_same_product(a, b, N, K, rng);  // and the same product
  }
}

TEST_CASE("bf16 packing from Wt and into a buffer gives pack_linear's bf16 panels, bit for bit", "[gemm]") {
  // Training's bf16 GEMMs pack W (forward, into a kept buffer) and Wᵀ / Xᵀ (backward) as bf16 pair
  // panels; both must be the panels the loader's bf16 packing makes, odd K (a padded pair) and
  // column tails included, whatever the buffer held before.
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const auto& [N, K, ld] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 1, 1}, {32, 7, 32}, {45, 19, 50}, {70, 34, 70}}) {
    INFO("N " << N << " K " << K << " ld " << ld);
    std::vector<float> w(static_cast<size_t>(N * K)), bias(static_cast<size_t>(N));
    for (auto& v : w) v = u(rng);
    for (auto& v : bias) v = u(rng);
    const std::vector<float> wt = transposed(w, N, K, ld);
    const PackedLinear a = pack_linear(w.data(), bias.data(), N, K, WeightType::BF16);
    const int64_t floats = pack_linear_buffer_floats(N, K);
    float* buffer = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((floats * 4 + 63) / 64 * 64)));
    std::fill(buffer, buffer + floats, std::nanf(""));
    const PackedLinear b = pack_linear(w.data(), bias.data(), N, K, buffer, WeightType::BF16);
    REQUIRE(b.type == WeightType::BF16);
    REQUIRE(a.packed_bytes == b.packed_bytes);
    CHECK(std::memcmp(a.packed.get(), b.packed.get(), a.packed_bytes) == 0);
    check_same_product(a, b, N, K, rng);  // the bias too
    std::fill(buffer, buffer + floats, std::nanf(""));
    const PackedLinear c = pack_linear_transposed(wt.data(), ld, N, K, buffer, WeightType::BF16);
    REQUIRE(c.type == WeightType::BF16);
    REQUIRE(a.packed_bytes == c.packed_bytes);
    CHECK(std::memcmp(a.packed.get(), c.packed.get(), a.packed_bytes) == 0);
    std::free(buffer);
  }
}

TEST_CASE("the AVX2 int8 kernel gives the same bits with AVX-VNNI's vpdpbusd as with vpmaddubsw") {
  // Both sum the same integer products exactly (vpdpbusd on x's bytes + 128, vpmaddubsw on
  // |w| x sign(w) xs), so the outputs must be bit-identical, for every row count of the 6-row
  // tile, odd K (padded quads) and column tails. Without AVX-VNNI both runs take vpmaddubsw.
  const bool has = cpu_features_seen().find("avxvnni") != std::string::npos;
  INFO("CPU features " << cpu_features_seen());
  if (!has) WARN("no AVX-VNNI on this CPU: only the vpmaddubsw path runs");
  const bool allowed = avxvnni_allowed();  // as the process began (TESSERA_AVXVNNI)
  set_isa_cap(IsaFamily::Avx2);
  uint32_t seed = 8100;
  for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 33, 17}, {5, 64, 3}, {6, 100, 773},
                         {197, 768, 768}, {29, 96, 3072}}) {
    Problem p = make_problem(M, N, K, K + 1, N + 2, seed++);
    PackedLinear pw = pack_linear(p.w.data(), p.b.data(), N, K, WeightType::INT8);
    set_avxvnni(false);
    INFO("M=" << M << " N=" << N << " K=" << K);
    REQUIRE(isa_family() == IsaFamily::Avx2);
    REQUIRE(linear_kernel_name(WeightType::INT8) == "avx2-int8");
    const std::vector<float> plain = run_plain(p, pw, Activation::Gelu);
    set_avxvnni(true);
    if (has) REQUIRE(linear_kernel_name(WeightType::INT8) == "avxvnni");
    const std::vector<float> vnni = run_plain(p, pw, Activation::Gelu);
    REQUIRE(std::memcmp(plain.data(), vnni.data(), plain.size() * sizeof(float)) == 0);
  }
  set_avxvnni(allowed);
  set_isa_cap(IsaFamily::Avx512);
}

TEST_CASE("linear_cols on x stored column-major gives linear's bits on the transposed copy", "[gemm]") {
  // Training's dW = dyᵀ·x products read dyᵀ in place: each family's fp32 and bf16 packers copy
  // x's columns, int8 and the portable kernels transpose a task's rows first. Every family the CPU
  // has, every weight type, micro-panel tails (1-15 rows), odd K (bf16's padded pair), ldx > M,
  // with and without a residual, at 1 and 2 threads: the bits of linear() on xᵀ copied out.
  const IsaFamily widest = cpu_isa_family();
  uint32_t seed = 9100;
  for (IsaFamily cap : {IsaFamily::Avx512, IsaFamily::Avx2, IsaFamily::Generic}) {
    if (cap > widest) continue;
    set_isa_cap(cap);
    for (auto [M, N, K, ldx] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 33, 17, 1}, {5, 64, 3, 9},
                                {13, 70, 19, 13}, {14, 32, 64, 20}, {29, 96, 130, 29}, {197, 100, 7, 200},
                                {400, 192, 512, 400}}) {
      std::vector<float> xt = random_floats(static_cast<size_t>(K * ldx), seed++);  // x[m, k] = xt[k * ldx + m]
      std::vector<float> x(static_cast<size_t>(M * K));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) x[m * K + k] = xt[k * ldx + m];
      const std::vector<float> w = random_floats(static_cast<size_t>(N * K), seed++);
      const std::vector<float> r = random_floats(static_cast<size_t>(M * N), seed++);
      for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
        const PackedLinear pw = pack_linear(w.data(), nullptr, N, K, type);
        for (int threads : {1, 2}) {
          set_num_threads(threads);
          for (int residual : {0, 1, 2}) {  // none, separate, aliasing y (as dW += dyᵀ·x uses it)
            std::vector<float> want(static_cast<size_t>(M * N)), got(static_cast<size_t>(M * N), std::nanf(""));
            if (residual == 2) got = r;
            linear(x.data(), M, K, pw, want.data(), N, Activation::None, residual ? r.data() : nullptr);
            linear_cols(xt.data(), M, ldx, pw, got.data(), N,
                        residual == 1 ? r.data() : residual == 2 ? got.data() : nullptr);
            INFO("family " << isa_name(isa_family()) << " kernel " << linear_kernel_name(type) << " M=" << M
                           << " N=" << N << " K=" << K << " ldx=" << ldx << " threads " << threads
                           << " residual " << residual);
            REQUIRE(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0);
          }
        }
      }
    }
  }
  set_num_threads(0);
  set_isa_cap(IsaFamily::Avx512);
  std::vector<float> xt(8);
  const std::vector<float> w(4, 1.0f);
  const PackedLinear pw = pack_linear(w.data(), nullptr, 2, 2);
  std::vector<float> y(8);
  CHECK_THROWS_WITH(linear_cols(xt.data(), 4, 3, pw, y.data(), 2), Catch::Contains("ldx 3 < rows 4"));
}
