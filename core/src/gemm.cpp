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

bool use_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && use_avx512();
}

float bf16_float(uint32_t bits16) {
  uint32_t u = bits16 << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
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

// y[r0 + r, j*32 + c] = act(acc[r][c] + b) (+ residual) for r < R and the panel's valid c.
template <int R>
void store_generic(const float (&acc)[R][kNR], const LinearArgs& a, int64_t r0, int64_t j) {
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
  store_generic<R>(acc, a, r0, j);
}

// As generic_tile with bf16 x and W, summed as vdpbf16ps does: per k pair, acc += x1 w1, then
// acc += x0 w0 (bf16 products are exact in fp32, so each step rounds once).
template <int R>
void generic_tile_bf16(const LinearArgs& a, int64_t r0, int64_t j) {
  float acc[R][kNR] = {};
  const int64_t K2 = ceil_div(a.K, 2);
  const uint32_t* panel = a.wpack_bf16 + j * K2 * kNR;
  for (int64_t i = 0; i < K2; ++i) {
    const uint32_t* b = panel + i * kNR;
    for (int r = 0; r < R; ++r) {
      uint32_t xv = bf16_pair(a.x + (r0 + r) * a.ldx, 2 * i, a.K);
      float x0 = bf16_float(xv & 0xffffu), x1 = bf16_float(xv >> 16);
      for (int c = 0; c < kNR; ++c) {
        acc[r][c] += x1 * bf16_float(b[c] >> 16);
        acc[r][c] += x0 * bf16_float(b[c] & 0xffffu);
      }
    }
  }
  store_generic<R>(acc, a, r0, j);
}

template <template <int> class Tile>
void linear_task_generic(const LinearArgs& a, const RowSplit& rows, int64_t p0, int64_t p1,
                         int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t p = p0; p < p1; ++p) {
      int64_t r0 = rows.row_begin(p), n = rows.row_begin(p + 1) - r0;
      switch (n) {
        case 1: Tile<1>::run(a, r0, j); break;
        case 2: Tile<2>::run(a, r0, j); break;
        case 3: Tile<3>::run(a, r0, j); break;
        default: Tile<4>::run(a, r0, j); break;
      }
    }
}
template <int R>
struct TileF32 {
  static void run(const LinearArgs& a, int64_t r0, int64_t j) { generic_tile<R>(a, r0, j); }
};
template <int R>
struct TileBf16 {
  static void run(const LinearArgs& a, int64_t r0, int64_t j) { generic_tile_bf16<R>(a, r0, j); }
};

// ---- threading --------------------------------------------------------------------------------

// A task is a block of consecutive micro-panels x a group of consecutive column panels; blocks
// and groups are split as evenly as possible. Picks the split with the least estimated time on
// `threads` threads: ceil(tasks / threads) waves of the largest task, which costs one unit per
// micro-tile, plus re-packing its x rows (~0.5 tile per micro-panel) and streaming each W panel
// from L3 once (~0.3 tile). Row blocks are capped at ~384 KiB of packed x so they stay in L2
// while the task walks its panels.
struct Split {
  int64_t row_blocks, col_blocks;
};

Split choose_split(int64_t P, int64_t NP, int64_t mr, int64_t K, int threads) {
  const int64_t rp_cap = std::clamp<int64_t>((384 * 1024) / (mr * K * 4), 1, P);
  const int64_t rb_min = ceil_div(P, rp_cap), rb_max = std::min(P, rb_min + 2 * threads + 8);
  Split best{rb_min, 1};
  double best_cost = 1e300;
  for (int64_t rb = rb_min; rb <= rb_max; ++rb) {
    const double rp = static_cast<double>(ceil_div(P, rb));
    for (int64_t cb = 1; cb <= NP; ++cb) {
      const double pg = static_cast<double>(ceil_div(NP, cb));
      const double waves = static_cast<double>(ceil_div(rb * cb, threads));
      const double cost = waves * (rp * (pg + 0.5) + 0.3 * pg + 0.1);
      if (cost < best_cost * (1 - 1e-9)) {
        best_cost = cost;
        best = {rb, cb};
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
  // K rows of 32 floats per panel, or ceil(K/2) rows of 32 bf16 pairs; zero-filled padding.
  const int64_t rows = type == WeightType::BF16 ? ceil_div(K, 2) : K;
  auto packed = aligned_floats(static_cast<size_t>(panels * rows * kNR));
  for (int64_t n = 0; n < N; ++n) {
    const float* row = weight + n * K;
    const int64_t at = (n / kNR) * rows * kNR + (n % kNR);
    if (type == WeightType::BF16) {
      uint32_t* col = reinterpret_cast<uint32_t*>(packed.get()) + at;
      for (int64_t i = 0; i < rows; ++i) col[i * kNR] = bf16_pair(row, 2 * i, K);
    } else {
      float* col = packed.get() + at;
      for (int64_t k = 0; k < K; ++k) col[k * kNR] = row[k];
    }
  }
  p.packed = std::shared_ptr<void>(packed, packed.get());
  p.packed_bytes = static_cast<size_t>(panels * rows * kNR) * sizeof(float);
  if (bias) {
    p.bias = aligned_floats(static_cast<size_t>(panels * kNR));
    std::memcpy(p.bias.get(), bias, static_cast<size_t>(N) * sizeof(float));
  }
  return p;
}

void linear(const float* x, int64_t M, int64_t ldx, const PackedLinear& w, float* y, int64_t ldy,
            Activation act, const float* residual) {
  const int64_t K = w.in_features, N = w.out_features;
  check(w.packed != nullptr, "linear: weights are not packed");
  check(w.type == WeightType::F32 || w.type == WeightType::BF16, "linear: unsupported weight type");
  check(M >= 0, "linear: negative row count " + std::to_string(M));
  check(ldx >= K, "linear: ldx " + std::to_string(ldx) + " < in_features " + std::to_string(K));
  check(ldy >= N, "linear: ldy " + std::to_string(ldy) + " < out_features " + std::to_string(N));
  if (M == 0) return;
  check(x != nullptr && y != nullptr, "linear: null input or output");

  const bool bf16 = w.type == WeightType::BF16;
  LinearArgs a{x, M, ldx, K, N, bf16 ? nullptr : static_cast<const float*>(w.packed.get()),
               bf16 ? static_cast<const uint32_t*>(w.packed.get()) : nullptr, w.bias.get(), y, ldy,
               residual, act};
  const bool avx512 = bf16 ? use_avx512_bf16() : use_avx512();
  const int64_t mr = avx512 ? kMR : kGenericMR;
  const RowSplit rows(M, mr);
  const int64_t NP = ceil_div(N, kNR);
  const Split s = choose_split(rows.panels, NP, mr, K, num_threads());
  parallel_for(0, s.row_blocks * s.col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t rb = t / s.col_blocks, cb = t % s.col_blocks;
      int64_t p0 = rb * rows.panels / s.row_blocks, p1 = (rb + 1) * rows.panels / s.row_blocks;
      int64_t j0 = cb * NP / s.col_blocks, j1 = (cb + 1) * NP / s.col_blocks;
      if (avx512 && bf16)
        linear_task_avx512_bf16(a, rows, p0, p1, j0, j1,
                                reinterpret_cast<uint32_t*>(thread_scratch(
                                    static_cast<size_t>((p1 - p0) * ceil_div(K, 2) * kMR))));
      else if (avx512)
        linear_task_avx512(a, rows, p0, p1, j0, j1,
                           thread_scratch(static_cast<size_t>((p1 - p0) * K * kMR)));
      else if (bf16)
        linear_task_generic<TileBf16>(a, rows, p0, p1, j0, j1);
      else
        linear_task_generic<TileF32>(a, rows, p0, p1, j0, j1);
    }
  });
}

std::string linear_kernel_name(WeightType type) {
  if (type == WeightType::BF16) return use_avx512_bf16() ? "avx512bf16" : "generic";
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
