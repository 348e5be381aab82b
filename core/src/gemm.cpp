// fp32 linear layers: weight packing, run-time kernel dispatch, the task split over threads, and
// the portable kernel (plain C++ the compiler vectorises), which is also the fallback.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "gemm_internal.hpp"
#include "tessera/error.hpp"
#include "tessera/parallel.hpp"

namespace tessera {
using namespace gemm_detail;

namespace {

std::atomic<bool> g_force_generic{false};

bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has && !g_force_generic.load(std::memory_order_relaxed);
}

// ---- portable epilogue: the same approximations as the AVX-512 one, in scalar C++ ----------

template <int N>
float poly(float t, const float (&c)[N]) {
  float r = c[0];
  for (int i = 1; i < N; ++i) r = r * t + c[i];
  return r;
}

// exp(p) for p in [-30, 0], as exp_neg in gemm_avx512.cpp.
float exp_neg(float p) {
  float n = std::nearbyint(p * 1.44269504088896341f);
  float r = p - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-6f;
  return std::ldexp(poly(r, kExp), static_cast<int>(n));
}

float erfc_large(float t) {  // erfc(t) for t >= 0.921875, 0 past 4
  if (t > kErfcZero) return 0.0f;
  return exp_neg(poly(std::max(t, kErfSplit), kLogErfc));
}

float erf_small(float z) { return z + z * poly(z * z, kErfSmall); }  // |z| <= 0.921875

float erf_generic(float z) {
  float t = std::fabs(z);
  if (t <= kErfSplit) return erf_small(z);
  return std::copysign(1.0f - erfc_large(t), z);
}

float gelu_generic(float x) {
  float z = x * 0.70710678118654752f;
  float t = std::fabs(z);
  float one_plus = t <= kErfSplit ? 1.0f + erf_small(z) : z > 0 ? 2.0f - erfc_large(t) : erfc_large(t);
  return 0.5f * x * one_plus;
}

// ---- portable kernel --------------------------------------------------------------------------

constexpr int64_t kGenericMR = 4;  // 4 x 32 accumulators: 8 zmm / 32 xmm-sized vectors

// y[r, j*32 : j*32+32] = epilogue(sum_k x[r, k] W[j*32 + c, k]) for r < R, over one panel.
template <int R>
void generic_tile(const LinearArgs& a, int64_t r0, int64_t j) {
  float acc[R][kNR] = {};
  const float* panel = a.wpack + j * a.K * kNR;
  for (int64_t k = 0; k < a.K; ++k) {
    const float* b = panel + k * kNR;
    for (int r = 0; r < R; ++r) {
      float xv = a.x[(r0 + r) * a.ldx + k];
      for (int c = 0; c < kNR; ++c) acc[r][c] += xv * b[c];
    }
  }
  int64_t cols = std::min(kNR, a.N - j * kNR);
  for (int r = 0; r < R; ++r) {
    float* yr = a.y + (r0 + r) * a.ldy + j * kNR;
    const float* rr = a.residual ? a.residual + (r0 + r) * a.ldy + j * kNR : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      float v = acc[r][c] + (a.bias ? a.bias[j * kNR + c] : 0.0f);
      if (a.act == Activation::Gelu) v = gelu_generic(v);
      else if (a.act == Activation::Relu) v = std::max(v, 0.0f);
      if (rr) v += rr[c];
      yr[c] = v;
    }
  }
}

void linear_task_generic(const LinearArgs& a, const RowSplit& rows, int64_t p0, int64_t p1,
                         int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t p = p0; p < p1; ++p) {
      int64_t r0 = rows.row_begin(p), n = rows.row_begin(p + 1) - r0;
      switch (n) {
        case 1: generic_tile<1>(a, r0, j); break;
        case 2: generic_tile<2>(a, r0, j); break;
        case 3: generic_tile<3>(a, r0, j); break;
        default: generic_tile<4>(a, r0, j); break;
      }
    }
}

// ---- threading --------------------------------------------------------------------------------

// A task is a block of `rp` micro-panels x `pg` column panels. Chooses the split that minimises
// the estimated time on `threads` threads: waves of equal tasks, each costing its tiles plus
// re-packing its rows of x (about half a panel's work). A blocks are capped at ~384 KiB so they
// stay in L2 while the task walks its panels.
struct Split {
  int64_t rp, pg, row_blocks, col_blocks;
};

Split choose_split(int64_t P, int64_t NP, int64_t mr, int64_t K, int threads) {
  int64_t rp_cap = std::clamp<int64_t>((384 * 1024) / (mr * K * 4), 1, P);
  Split best{1, 1, P, NP};
  double best_cost = 1e300;
  for (int64_t rp = rp_cap; rp >= 1; --rp) {
    int64_t row_blocks = ceil_div(P, rp);
    for (int64_t col_blocks = 1; col_blocks <= NP; ++col_blocks) {
      int64_t pg = ceil_div(NP, col_blocks);
      if (ceil_div(NP, pg) != col_blocks) continue;  // same split as a smaller count
      int64_t tasks = row_blocks * col_blocks;
      double waves = static_cast<double>(ceil_div(tasks, threads));
      double cost = waves * (static_cast<double>(rp) * (static_cast<double>(pg) + 0.5) + 0.1);
      if (cost < best_cost * (1 - 1e-9)) {
        best_cost = cost;
        best = {rp, pg, row_blocks, col_blocks};
      }
    }
  }
  return best;
}

// Per-thread scratch for packed rows of x, grown (rarely) and reused; a task never waits, so a
// thread never uses it for two tasks at once.
float* thread_scratch(size_t floats) {
  struct Buffer {
    float* p = nullptr;
    size_t cap = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (buf.cap < floats) {
    std::free(buf.p);
    buf.p = nullptr;
    buf.cap = 0;
    size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
    buf.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!buf.p) throw std::bad_alloc();
    buf.cap = floats;
  }
  return buf.p;
}

}  // namespace

PackedLinear pack_linear(const float* weight, const float* bias, int64_t out_features,
                         int64_t in_features, WeightType type) {
  if (type == WeightType::BF16) fail("pack_linear: bf16 weights are not supported yet");
  if (type == WeightType::INT8) fail("pack_linear: int8 weights are not supported yet");
  check(out_features >= 1 && in_features >= 1,
        "pack_linear: weight shape [" + std::to_string(out_features) + ", " +
            std::to_string(in_features) + "] must have both dimensions >= 1");
  check(weight != nullptr, "pack_linear: weight pointer is null");
  const int64_t N = out_features, K = in_features, panels = ceil_div(N, kNR);
  PackedLinear p;
  p.out_features = N;
  p.in_features = K;
  p.type = type;
  auto packed = aligned_floats(static_cast<size_t>(panels * K * kNR));  // zero-filled
  float* dst = packed.get();
  for (int64_t n = 0; n < N; ++n) {
    float* col = dst + (n / kNR) * K * kNR + (n % kNR);
    const float* row = weight + n * K;
    for (int64_t k = 0; k < K; ++k) col[k * kNR] = row[k];
  }
  p.packed = std::shared_ptr<void>(packed, packed.get());
  p.packed_bytes = static_cast<size_t>(panels * K * kNR) * sizeof(float);
  if (bias) {
    p.bias = aligned_floats(static_cast<size_t>(panels * kNR));
    std::memcpy(p.bias.get(), bias, static_cast<size_t>(N) * sizeof(float));
  }
  return p;
}

void linear(const float* x, int64_t M, int64_t ldx, const PackedLinear& w, float* y, int64_t ldy,
            Activation act, const float* residual) {
  const int64_t K = w.in_features, N = w.out_features;
  check(w.packed != nullptr && w.type == WeightType::F32, "linear: weights are not packed fp32");
  check(M >= 0, "linear: negative row count " + std::to_string(M));
  check(ldx >= K, "linear: ldx " + std::to_string(ldx) + " < in_features " + std::to_string(K));
  check(ldy >= N, "linear: ldy " + std::to_string(ldy) + " < out_features " + std::to_string(N));
  if (M == 0) return;
  check(x != nullptr && y != nullptr, "linear: null input or output");

  LinearArgs a{x, M, ldx, K, N, static_cast<const float*>(w.packed.get()), w.bias.get(), y, ldy,
               residual, act};
  const bool avx512 = use_avx512();
  const int64_t mr = avx512 ? kMR : kGenericMR;
  const RowSplit rows(M, mr);
  const int64_t NP = ceil_div(N, kNR);
  const Split s = choose_split(rows.panels, NP, mr, K, num_threads());
  parallel_for(0, s.row_blocks * s.col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t rb = t / s.col_blocks, cb = t % s.col_blocks;
      int64_t p0 = rb * s.rp, p1 = std::min(rows.panels, p0 + s.rp);
      int64_t j0 = cb * s.pg, j1 = std::min(NP, j0 + s.pg);
      if (avx512)
        linear_task_avx512(a, rows, p0, p1, j0, j1,
                           thread_scratch(static_cast<size_t>((p1 - p0) * K * kMR)));
      else
        linear_task_generic(a, rows, p0, p1, j0, j1);
    }
  });
}

std::string linear_kernel_name(WeightType type) {
  if (type != WeightType::F32) return "unsupported";
  return use_avx512() ? "avx512f" : "generic";
}

void force_generic_kernels(bool on) { g_force_generic.store(on); }

void linear_gelu(const float* x, float* y, int64_t n) {
  if (use_avx512()) return gelu_avx512(x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_generic(x[i]);
}

void linear_erf(const float* x, float* y, int64_t n) {
  if (use_avx512()) return erf_avx512(x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = erf_generic(x[i]);
}

}  // namespace tessera
