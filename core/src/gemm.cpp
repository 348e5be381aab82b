// fp32 linear layers: weight packing, run-time kernel dispatch, the task split over threads, and
// the portable kernel (plain C++ the compiler vectorises), which is also the fallback.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>
#if defined(__SSE__)
#include <cpuid.h>
#include <xmmintrin.h>
#endif

#include "gemm_internal.hpp"
#include "tessera/error.hpp"
#include "tessera/kernels.hpp"
#include "tessera/parallel.hpp"

namespace tessera {
using namespace gemm_detail;

namespace {

std::atomic<bool> g_force_generic{false};
std::atomic<int> g_isa_cap{static_cast<int>(IsaFamily::Avx512)};

bool cpu_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
bool cpu_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
bool cpu_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && cpu_avx512();
}
bool cpu_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has && cpu_avx512();
}
// AVX-VNNI: CPUID leaf 7, sub-leaf 1, EAX bit 4 (read directly: clang 14's
// __builtin_cpu_supports does not know "avxvnni", and the fuzz preset builds with it).
bool cpuid_avxvnni() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1u);
}
bool cpu_avxvnni() {
  static const bool has = cpuid_avxvnni();
  return has && cpu_avx2();
}
// TESSERA_AVXVNNI=off (read once) or set_avxvnni(false) keeps the AVX2 int8 kernel on
// vpmaddubsw on a CPU that has AVX-VNNI, so both paths run (and are tested) there.
std::atomic<bool> g_avxvnni_allowed{[] {
  const char* v = std::getenv("TESSERA_AVXVNNI");
  return v == nullptr || (std::string(v) != "off" && std::string(v) != "0");
}()};
bool use_avxvnni() { return cpu_avxvnni() && g_avxvnni_allowed.load(std::memory_order_relaxed); }

// TESSERA_ISA, read once; a bad value throws at every dispatch (its message names it).
struct EnvCap {
  IsaFamily cap = IsaFamily::Avx512;
  std::string error;
};
const EnvCap& env_cap() {
  static const EnvCap cap = [] {
    EnvCap c;
    const char* v = std::getenv("TESSERA_ISA");
    if (v == nullptr || *v == '\0') return c;
    try {
      c.cap = parse_isa(v);
    } catch (const Error& e) {
      c.error = e.what();
    }
    return c;
  }();
  return cap;
}

enum class Kernel { Generic, Avx2, Avx512 };

// Which kernel family runs `type` now: the family in use, except that an AVX-512 CPU without
// AVX512-BF16 (or -VNNI) runs bf16 (int8) on the AVX2 kernels, which need neither.
Kernel kernel_for(WeightType type) {
  const IsaFamily f = isa_family();
  if (f == IsaFamily::Generic) return Kernel::Generic;
  if (f == IsaFamily::Avx512) {
    if (type == WeightType::F32) return Kernel::Avx512;
    if (type == WeightType::BF16 && cpu_avx512_bf16()) return Kernel::Avx512;
    if (type == WeightType::INT8 && cpu_avx512_vnni()) return Kernel::Avx512;
  }
  return Kernel::Avx2;
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

// Per-thread scratch, grown (rarely) and reused; a task never waits, so a thread never uses a
// slot for two tasks at once. Slots: packed rows of x, and rows of x after a fused layer norm.
enum Scratch { kPackedRows, kNormedRows };
float* thread_scratch(size_t floats, Scratch slot = kPackedRows) {
  thread_local ScratchFloats bufs[2];
  return bufs[slot].get(static_cast<int64_t>(floats));
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
      float xv = a.row(r0 + r)[k];
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
      uint32_t xv = bf16_pair(a.row(r0 + r), 2 * i, a.K);
      float x0 = bf16_float(xv & 0xffffu), x1 = bf16_float(xv >> 16);
      for (int c = 0; c < kNR; ++c) {
        acc[r][c] += x1 * bf16_float(b[c] >> 16);
        acc[r][c] += x0 * bf16_float(b[c] & 0xffffu);
      }
    }
  }
  store_generic<R>(acc, a, r0, j);
}

// Quantizes x rows [r0, r0 + R) as gemm_internal.hpp describes: u[r][k] (K padded to 4n with
// zeros) and each row's scale and zero point.
template <int R>
void quantize_rows_generic(const LinearArgs& a, int64_t r0, uint8_t* u, RowQuant (&q)[R]) {
  const int64_t K4 = int8_quads(a.K) * 4;
  for (int r = 0; r < R; ++r) {
    const float* xr = a.row(r0 + r);
    float lo = 0.0f, hi = 0.0f;
    for (int64_t k = 0; k < a.K; ++k) lo = std::min(lo, xr[k]), hi = std::max(hi, xr[k]);
    q[r] = row_quant(lo, hi);
    for (int64_t k = 0; k < K4; ++k) u[r * K4 + k] = k < a.K ? static_cast<uint8_t>(quantize_u8(xr[k], q[r])) : 0;
  }
}

// As generic_tile with u8 x and s8 W: exact int32 dot products, then one rescale per output.
template <int R>
void generic_tile_int8(const LinearArgs& a, int64_t r0, int64_t j) {
  const int64_t K4 = int8_quads(a.K);
  uint8_t* u = reinterpret_cast<uint8_t*>(thread_scratch(static_cast<size_t>(R * K4)));
  RowQuant q[R];
  quantize_rows_generic<R>(a, r0, u, q);
  int32_t acc[R][kNR] = {};
  const uint32_t* panel = a.wpack_i8 + j * K4 * kNR;
  for (int64_t i = 0; i < K4; ++i) {
    const uint32_t* b = panel + i * kNR;
    for (int r = 0; r < R; ++r) {
      const uint8_t* ur = u + r * K4 * 4 + i * 4;
      for (int c = 0; c < kNR; ++c)
        for (int t = 0; t < 4; ++t)
          acc[r][c] += static_cast<int32_t>(ur[t]) * static_cast<int8_t>((b[c] >> (8 * t)) & 0xffu);
    }
  }
  float out[R][kNR];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kNR; ++c) {
      const int64_t n = j * kNR + c;
      out[r][c] = static_cast<float>(acc[r][c] - q[r].zero * a.wsum[n]) * q[r].scale * a.wscale[n];
    }
  store_generic<R>(out, a, r0, j);
}

template <template <int> class Tile>
void linear_task_generic(const LinearArgs& a, const RowSplit& rows, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t p = 0; p < rows.panels; ++p) {
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
template <int R>
struct TileInt8 {
  static void run(const LinearArgs& a, int64_t r0, int64_t j) { generic_tile_int8<R>(a, r0, j); }
};

// ---- threading --------------------------------------------------------------------------------

// A task is a block of consecutive rows x a group of consecutive column panels; M is cut into
// row_blocks blocks of (to a row) equal size, and each block into micro-panels (RowSplit), the
// column panels into col_blocks groups as evenly. Picks the split with the least estimated time
// on `threads` threads: ceil(tasks / threads) waves of the largest task, which costs one unit
// per micro-tile (time goes with rows, so a block of 98.5 rows is 98.5 / 14 units per panel),
// plus ~1 unit per micro-panel for packing its rows (and its layer norm, and reading rows that
// the other core wrote: a task that splits columns repeats all of this for its row block), plus
// ~0.1 per W panel it streams.
//
// A row block holds at most 8 micro-panels and ~768 KiB of packed x (bytes_per_row per row),
// so the walk over W keeps it in the 1 MiB L2. Measured against the split this replaced (blocks
// cut at micro-panel boundaries, 0.5 per packed micro-panel, 0.3 per W panel), 2 threads,
// alternating processes of the two builds:
// - batch 1: blocks of 98-99 rows, one per thread, instead of every thread taking all 197 rows
//   and half the columns. ViT-B's linears and attention (12 layers, distinct weights): bf16
//   -4.6%, int8 -8.3%, fp32 -1.9%; the whole model (tessera bench): bf16 -2.3%, fp32 -2.0%;
//   ViT-Ti -15%, ViT-S and Segmenter-S -5%, YOLOS-Ti -1%.
// - batch 8: -2 to 0% (blocks of ~98 rows). Without the 8-micro-panel cap, blocks of 197 rows
//   were 3-13% slower than the old split.
struct Split {
  int64_t row_blocks, col_blocks;
};

Split choose_split(int64_t M, int64_t NP, int64_t mr, int64_t bytes_per_row, int threads) {
  const int64_t cap = std::clamp<int64_t>(std::min<int64_t>((768 * 1024) / bytes_per_row, 8 * std::max(mr, kMR)), 1, M);
  const int64_t rb_min = ceil_div(M, cap);
  const int64_t rb_max = std::min(ceil_div(M, mr), rb_min + 2 * threads + 8);
  Split best{rb_min, 1};
  double best_cost = 1e300;
  for (int64_t rb = rb_min; rb <= rb_max; ++rb) {
    const double panels = static_cast<double>(M) / static_cast<double>(rb * mr);
    for (int64_t cb = 1; cb <= NP; ++cb) {
      const double pg = static_cast<double>(ceil_div(NP, cb));
      const double waves = static_cast<double>(ceil_div(rb * cb, threads));
      const double cost = waves * (panels * (pg + 1.0) + 0.1 * pg + 0.1);
      if (cost < best_cost * (1 - 1e-9)) {
        best_cost = cost;
        best = {rb, cb};
      }
    }
  }
  return best;
}

}  // namespace

namespace {

// 64-byte aligned, uninitialised: the packers write every word themselves, in parallel, so the
// pages are first touched by the threads that fill them. From the arena when there is one (a
// model load: see WeightArena). Otherwise buffers of 2 MiB or more are 2 MiB aligned and ask for
// transparent huge pages on their whole 2 MiB chunks: a ViT-B's 330 MB of packed weights then
// takes ~170 page faults instead of ~85000, and the GEMM streams them with fewer TLB misses.
std::shared_ptr<float[]> uninitialised_floats(size_t n, WeightArena* arena) {
  if (arena) return arena->floats(n);
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  const size_t alignment = bytes >= kHuge ? kHuge : 64;
  // aligned_alloc wants a multiple of the alignment; the rounded-up tail is never touched.
  void* p = std::aligned_alloc(alignment, (bytes + alignment - 1) / alignment * alignment);
  if (!p) throw std::bad_alloc();
  if (bytes >= kHuge) ::madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);  // a hint; may fail
  return std::shared_ptr<float[]>(static_cast<float*>(p), [](float* q) { std::free(q); });
}

// W's rows for pack_linear: already in memory, or produced a few panels at a time.
struct WeightSource {
  const float* weight;      // [N, K] row-major, or null
  const WeightRows* rows;   // used when weight is null
  int64_t N, K;

  // Panels per task: ~256 KiB of rows, so each read of the file is big enough that the system
  // call costs little next to the copy (96 KiB reads took ~15% longer for a ViT-B), and the
  // rows stay in L2 while they are packed.
  int64_t grain() const { return std::max<int64_t>(1, (256 * 1024) / (kNR * K * 4)); }

  // The rows of panels [j0, j1) (rows j0*32 up to min(N, j1*32)), row-major; valid until this
  // thread's next call.
  const float* panels(int64_t j0, int64_t j1) const {
    const int64_t n0 = j0 * kNR;
    if (weight) return weight + n0 * K;
    float* buffer = thread_scratch(static_cast<size_t>((j1 - j0) * kNR * K));
    (*rows)(n0, std::min(N, j1 * kNR), buffer);
    return buffer;
  }
};

// dst[0, n) = src[0, n) for n a multiple of 4 words and dst 16-byte aligned, with non-temporal
// stores where the CPU has them. Packed weights are written once and read much later, so
// streaming them past the caches saves reading each destination line in first (a third of a
// load's memory traffic) and leaves the caches to the rows being packed.
void stream_out(uint32_t* dst, const uint32_t* src, int64_t n) {
#if defined(__SSE__)
  for (int64_t i = 0; i < n; i += 4)
    _mm_stream_ps(reinterpret_cast<float*>(dst + i), _mm_load_ps(reinterpret_cast<const float*>(src + i)));
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * 4);
#endif
}

// Orders the streamed stores before whatever this thread does next (TBB's completion signal).
void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// out[i][c] = in[c][i] for a 16 x 16 block of words: four rounds, each swapping one bit of the
// row index with the same bit of the column index (two-input shuffles: vpermt2d with AVX-512).
using Words16 = uint32_t __attribute__((vector_size(64)));

template <int B>
void swap_index_bit(Words16 (&v)[16]) {
  // Rows r and r + B (bit B of r clear): lo takes its odd B-blocks from r + B, hi its even ones
  // from r; indices 16..31 name the second operand.
#define TESSERA_LO(e) (((e) & B) ? 16 + ((e) ^ B) : (e))
#define TESSERA_HI(e) (((e) & B) ? 16 + (e) : ((e) ^ B))
#define TESSERA_MASK(M) M(0), M(1), M(2), M(3), M(4), M(5), M(6), M(7), M(8), M(9), M(10), M(11), M(12), M(13), M(14), M(15)
  for (int r = 0; r < 16; ++r) {
    if (r & B) continue;
    const Words16 a = v[r], b = v[r + B];
    v[r] = __builtin_shufflevector(a, b, TESSERA_MASK(TESSERA_LO));
    v[r + B] = __builtin_shufflevector(a, b, TESSERA_MASK(TESSERA_HI));
  }
#undef TESSERA_LO
#undef TESSERA_HI
#undef TESSERA_MASK
}

// panel[i * 32 + c] = word i of row c (rows `stride` bytes apart, from `rows`) for c < valid and
// i < width, 0 for the padding columns c >= valid. Transposed 16 panel rows (2 KiB) at a time
// in an L1 block, in 16 x 16 register blocks where the panel is full, then streamed out, so
// every packed word is written once.
void transpose_to_panel(const void* rows, int64_t stride, int64_t width, int64_t valid, uint32_t* panel) {
  constexpr int64_t kBlockRows = 16;
  alignas(64) uint32_t block[kBlockRows * kNR];
  const auto* bytes = static_cast<const unsigned char*>(rows);
  for (int64_t i0 = 0; i0 < width; i0 += kBlockRows) {
    const int64_t n = std::min(kBlockRows, width - i0);
    if (n == kBlockRows && valid == kNR) {
      for (int64_t c0 = 0; c0 < kNR; c0 += 16) {
        Words16 v[16];
        for (int r = 0; r < 16; ++r) std::memcpy(&v[r], bytes + (c0 + r) * stride + i0 * 4, 64);
        swap_index_bit<1>(v);
        swap_index_bit<2>(v);
        swap_index_bit<4>(v);
        swap_index_bit<8>(v);
        for (int i = 0; i < 16; ++i) std::memcpy(&block[i * kNR + c0], &v[i], 64);
      }
    } else {
      for (int64_t c = 0; c < valid; ++c)
        for (int64_t i = 0; i < n; ++i) std::memcpy(&block[i * kNR + c], bytes + c * stride + (i0 + i) * 4, 4);
      for (int64_t i = 0; i < n && valid < kNR; ++i)
        std::memset(&block[i * kNR + valid], 0, static_cast<size_t>(kNR - valid) * 4);
    }
    stream_out(panel + i0 * kNR, block, n * kNR);
  }
}

// A per-thread buffer for a panel's rows converted to bf16 pairs or int8 quads.
template <typename T>
T* thread_buffer(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// The int8 layout of gemm_internal.hpp: quad panels, then per-column scales and column sums.
void pack_int8(const WeightSource& w, int64_t N, int64_t K, PackedLinear& p, WeightArena* arena) {
  const int64_t panels = ceil_div(N, kNR), K4 = int8_quads(K), cols = panels * kNR;
  const size_t words = static_cast<size_t>(panels * K4 * kNR + 2 * cols);
  auto packed = uninitialised_floats(words, arena);
  p.packed = std::shared_ptr<void>(packed, packed.get());
  p.packed_bytes = words * sizeof(float);
  if (arena && arena->replaying()) return;  // packed by an earlier load: see WeightArena::replay
  uint32_t* quads = reinterpret_cast<uint32_t*>(packed.get());
  float* scale = packed.get() + panels * K4 * kNR;
  int32_t* sum = reinterpret_cast<int32_t*>(scale + cols);
  std::memset(scale, 0, 2 * static_cast<size_t>(cols) * sizeof(float));  // padding columns: 0
  parallel_for(0, panels, w.grain(), [&](int64_t j0, int64_t j1) {
    // Local copies: the int8 stores below may alias anything, so the compiler would otherwise
    // reload the captured sizes after each one and not vectorise the loops.
    const int64_t n_rows = N, k_len = K, k_padded = K4 * 4;
    int8_t* q = thread_buffer<int8_t>(static_cast<size_t>(kNR * k_padded));
    const float* all_rows = w.panels(j0, j1);
    for (int64_t j = j0; j < j1; ++j) {
      const float* rows = all_rows + (j - j0) * kNR * k_len;
      const int64_t valid = std::min(kNR, n_rows - j * kNR);
      for (int64_t c = 0; c < valid; ++c) {  // row c quantized to K bytes (+ zeros to 4 K4)
        const float* row = rows + c * k_len;
        int8_t* qc = q + c * k_padded;
        float part[16] = {};  // max |w| in 16 lanes (max does not depend on the order)
        int64_t k = 0;
        for (; k + 16 <= k_len; k += 16)
          for (int l = 0; l < 16; ++l) part[l] = std::max(part[l], std::fabs(row[k + l]));
        float amax = 0.0f;
        for (; k < k_len; ++k) amax = std::max(amax, std::fabs(row[k]));
        for (float m : part) amax = std::max(amax, m);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (k = 0; k < k_len; ++k) {
          const int32_t v = std::clamp(static_cast<int32_t>(std::nearbyint(row[k] * inv)), -127, 127);
          total += v;
          qc[k] = static_cast<int8_t>(v);
        }
        for (k = k_len; k < k_padded; ++k) qc[k] = 0;
        scale[j * kNR + c] = amax / 127.0f;
        sum[j * kNR + c] = total;
      }
      // Word i of row c is bytes 4i .. 4i+3 of its quantized row (little-endian, as vpdpbusd reads).
      transpose_to_panel(q, K4 * 4, K4, valid, quads + j * K4 * kNR);
    }
    stream_fence();
  });
}

PackedLinear pack_weights(const WeightSource& w, const float* bias, int64_t out_features,
                          int64_t in_features, WeightType type, WeightArena* arena, float* into = nullptr) {
  check(out_features >= 1 && in_features >= 1,
        "pack_linear: weight shape [" + std::to_string(out_features) + ", " +
            std::to_string(in_features) + "] must have both dimensions >= 1");
  const int64_t N = out_features, K = in_features, panels = ceil_div(N, kNR);
  PackedLinear p;
  p.out_features = N;
  p.in_features = K;
  p.type = type;
  if (type == WeightType::INT8) {
    pack_int8(w, N, K, p, arena);
  } else {
    // K rows of 32 floats per panel, or ceil(K/2) rows of 32 bf16 pairs; zero-filled padding.
    const int64_t rows = type == WeightType::BF16 ? ceil_div(K, 2) : K;
    auto packed = into ? std::shared_ptr<float[]>(into, [](float*) {})
                       : uninitialised_floats(static_cast<size_t>(panels * rows * kNR), arena);
    p.packed = std::shared_ptr<void>(packed, packed.get());
    p.packed_bytes = static_cast<size_t>(panels * rows * kNR) * sizeof(float);
    // Panels are disjoint, so they are filled in parallel (unless an earlier load's are mapped).
    if (!(arena && arena->replaying())) parallel_for(0, panels, w.grain(), [&](int64_t j0, int64_t j1) {
      const float* rows_read = w.panels(j0, j1);
      for (int64_t j = j0; j < j1; ++j) {
        const float* src = rows_read + (j - j0) * kNR * K;
        const int64_t valid = std::min(kNR, N - j * kNR);
        uint32_t* panel = reinterpret_cast<uint32_t*>(packed.get()) + j * rows * kNR;
        if (type == WeightType::BF16) {
          uint32_t* pairs = thread_buffer<uint32_t>(static_cast<size_t>(kNR * rows));
          for (int64_t c = 0; c < valid; ++c) {  // row c as bf16 pairs (the last one padded)
            const float* row = src + c * K;
            uint32_t* out = pairs + c * rows;
            for (int64_t i = 0; i < K / 2; ++i) out[i] = bf16_bits(row[2 * i]) | bf16_bits(row[2 * i + 1]) << 16;
            if (K % 2) out[K / 2] = bf16_bits(row[K - 1]);
          }
          transpose_to_panel(pairs, rows * 4, rows, valid, panel);
        } else {
          transpose_to_panel(src, K * 4, K, valid, panel);
        }
      }
      stream_fence();
    });
  }
  if (bias) {
    const int64_t rows = type == WeightType::BF16 ? ceil_div(K, 2) : K;  // the bias after the panels
    p.bias = into ? std::shared_ptr<float[]>(into + panels * rows * kNR, [](float*) {})
                  : uninitialised_floats(static_cast<size_t>(panels * kNR), arena);
    if (arena && arena->replaying()) return p;
    std::memcpy(p.bias.get(), bias, static_cast<size_t>(N) * sizeof(float));
    std::memset(p.bias.get() + N, 0, static_cast<size_t>(panels * kNR - N) * sizeof(float));
  }
  return p;
}

}  // namespace

PackedLinear pack_linear(const float* weight, const float* bias, int64_t out_features,
                         int64_t in_features, WeightType type) {
  check(weight != nullptr, "pack_linear: weight pointer is null");
  return pack_weights({weight, nullptr, out_features, in_features}, bias, out_features, in_features,
                      type, nullptr);
}

ScratchFloats::~ScratchFloats() { std::free(p_); }

float* ScratchFloats::get(int64_t floats) {
  if (cap_ < floats) {
    std::free(p_);
    p_ = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((floats * 4 + 63) / 64 * 64)));
    cap_ = p_ ? floats : 0;
    if (!p_) throw std::bad_alloc();
  }
  return p_;
}

int64_t pack_linear_buffer_floats(int64_t out_features, int64_t in_features) {
  return ceil_div(out_features, kNR) * kNR * (in_features + 1);
}

PackedLinear pack_linear(const float* weight, const float* bias, int64_t out_features, int64_t in_features,
                         float* buffer, WeightType type) {
  check(weight != nullptr, "pack_linear: weight pointer is null");
  check(buffer != nullptr && reinterpret_cast<uintptr_t>(buffer) % 64 == 0,
        "pack_linear: the buffer must be 64-byte aligned");
  check(type != WeightType::INT8, "pack_linear: int8 weights are packed into their own memory");
  return pack_weights({weight, nullptr, out_features, in_features}, bias, out_features, in_features,
                      type, nullptr, buffer);
}

PackedLinear pack_linear_transposed(const float* wt, int64_t ldwt, int64_t out_features, int64_t in_features) {
  check(out_features >= 1 && in_features >= 1, "pack_linear_transposed: weight shape [" +
                                                   std::to_string(out_features) + ", " +
                                                   std::to_string(in_features) + "]");
  auto packed = uninitialised_floats(static_cast<size_t>(ceil_div(out_features, kNR) * in_features * kNR), nullptr);
  PackedLinear p = pack_linear_transposed(wt, ldwt, out_features, in_features, packed.get());
  p.packed = std::shared_ptr<void>(packed, packed.get());
  return p;
}

PackedLinear pack_linear_transposed(const float* wt, int64_t ldwt, int64_t out_features, int64_t in_features,
                                    float* buffer, WeightType type) {
  check(wt != nullptr, "pack_linear_transposed: weight pointer is null");
  check(out_features >= 1 && in_features >= 1 && ldwt >= out_features,
        "pack_linear_transposed: weight shape [" + std::to_string(out_features) + ", " +
            std::to_string(in_features) + "] (row stride " + std::to_string(ldwt) + ")");
  check(buffer != nullptr && reinterpret_cast<uintptr_t>(buffer) % 64 == 0,
        "pack_linear_transposed: the buffer must be 64-byte aligned");
  const int64_t N = out_features, K = in_features, panels = ceil_div(N, kNR);
  PackedLinear p;
  p.out_features = N;
  p.in_features = K;
  check(type != WeightType::INT8, "pack_linear_transposed: fp32 or bf16 only");
  p.type = type;
  p.packed = std::shared_ptr<void>(buffer, [](void*) {});
  if (type == WeightType::BF16) {
    // panel j, pair row i, column c = bf16(wt[2i][j·32 + c]) | bf16(wt[2i+1][j·32 + c]) << 16, the
    // words pack_weights makes from W's rows (K odd: the last pair's high half 0).
    const int64_t K2 = ceil_div(K, 2);
    p.packed_bytes = static_cast<size_t>(panels * K2 * kNR) * sizeof(uint32_t);
    uint32_t* words = reinterpret_cast<uint32_t*>(buffer);
    parallel_for(0, panels, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t valid = std::min(kNR, N - j * kNR);
        for (int64_t i = 0; i < K2; ++i) {
          uint32_t* out = words + (j * K2 + i) * kNR;
          const float* lo = wt + 2 * i * ldwt + j * kNR;
          const float* hi = 2 * i + 1 < K ? lo + ldwt : nullptr;
          for (int64_t c = 0; c < valid; ++c) out[c] = bf16_bits(lo[c]) | (hi ? bf16_bits(hi[c]) << 16 : 0u);
          for (int64_t c = valid; c < kNR; ++c) out[c] = 0;
        }
      }
    });
    return p;
  }
  p.packed_bytes = static_cast<size_t>(panels * K * kNR) * sizeof(float);
  // panel j, row i = W[j·32 .. j·32 + 31][i] = wt[i][j·32 ..]: 32 contiguous floats of row i.
  parallel_for(0, panels, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t valid = std::min(kNR, N - j * kNR);
      float* panel = buffer + j * K * kNR;
      for (int64_t i = 0; i < K; ++i) {
        std::memcpy(panel + i * kNR, wt + i * ldwt + j * kNR, static_cast<size_t>(valid) * sizeof(float));
        if (valid < kNR) std::memset(panel + i * kNR + valid, 0, static_cast<size_t>(kNR - valid) * sizeof(float));
      }
    }
  });
  return p;
}

PackedLinear pack_linear(const WeightRows& rows, const float* bias, int64_t out_features,
                         int64_t in_features, WeightType type, WeightArena* arena) {
  check(static_cast<bool>(rows), "pack_linear: no weight rows");
  return pack_weights({nullptr, &rows, out_features, in_features}, bias, out_features, in_features,
                      type, arena);
}

namespace {

// linear() and linear_cols(): x row-major (x_cols false) or column-major.
void linear_impl(const float* x, int64_t M, int64_t ldx, bool x_cols, const PackedLinear& w, float* y,
                 int64_t ldy, Activation act, const float* residual, const RowNorm* norm) {
  const int64_t K = w.in_features, N = w.out_features;
  // if/fail rather than check(): the messages are built only when they are needed, so a
  // forward pass does not allocate strings.
  if (w.packed == nullptr) fail("linear: weights are not packed");
  if (M < 0) fail("linear: negative row count " + std::to_string(M));
  if (x_cols && ldx < M) fail("linear_cols: ldx " + std::to_string(ldx) + " < rows " + std::to_string(M));
  if (!x_cols && ldx < K) fail("linear: ldx " + std::to_string(ldx) + " < in_features " + std::to_string(K));
  if (ldy < N) fail("linear: ldy " + std::to_string(ldy) + " < out_features " + std::to_string(N));
  if (M == 0) return;
  if (x == nullptr || y == nullptr) fail("linear: null input or output");
  if (norm && (norm->gamma == nullptr || norm->beta == nullptr))
    fail("linear: layer norm without weights");

  const bool bf16 = w.type == WeightType::BF16, int8 = w.type == WeightType::INT8;
  const int64_t NP = ceil_div(N, kNR);
  LinearArgs a{x, M, ldx, K, N, nullptr, nullptr, nullptr, nullptr, nullptr, w.bias.get(), y, ldy,
               residual, act};
  if (int8) {
    a.wpack_i8 = static_cast<const uint32_t*>(w.packed.get());
    a.wscale = reinterpret_cast<const float*>(a.wpack_i8 + NP * int8_quads(K) * kNR);
    a.wsum = reinterpret_cast<const int32_t*>(a.wscale + NP * kNR);
  } else if (bf16) {
    a.wpack_bf16 = static_cast<const uint32_t*>(w.packed.get());
  } else {
    a.wpack = static_cast<const float*>(w.packed.get());
  }
  const Kernel kernel = kernel_for(w.type);
  const bool avx512 = kernel == Kernel::Avx512, avx2 = kernel == Kernel::Avx2;
  const int64_t mr = avx512 ? kMR : avx2 ? kMrAvx2 : kGenericMR;
  // Packed x bytes per row: fp32, bf16 pairs, or u8 quads and the row's scale and zero point.
  // (The AVX2 bf16 kernel packs x as bf16-rounded fp32: K * 4.)
  const int64_t bytes_per_row = int8 ? int8_quads(K) * 4 + 8 : bf16 && !avx2 ? ceil_div(K, 2) * 4 : K * 4;
  const Split s = choose_split(M, NP, mr, bytes_per_row, num_threads());
  parallel_for(0, s.row_blocks * s.col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t / s.col_blocks, cb = t % s.col_blocks;
      const int64_t m0 = rb * M / s.row_blocks, m1 = (rb + 1) * M / s.row_blocks;
      const RowSplit rows(m1 - m0, mr, m0);
      const int64_t j0 = cb * NP / s.col_blocks, j1 = (cb + 1) * NP / s.col_blocks;
      LinearArgs ta = a;
      if (norm) {  // this task's rows, normalised into per-thread scratch (cache-resident)
        float* xn = thread_scratch(static_cast<size_t>((m1 - m0) * K), kNormedRows);
        for (int64_t r = m0; r < m1; ++r)
          layer_norm_row(x + r * ldx, K, norm->gamma, norm->beta, norm->eps, xn + (r - m0) * K);
        ta.x = xn;
        ta.ldx = K;
        ta.x_first = m0;
      } else if (x_cols && (int8 || !(avx512 || avx2))) {
        // The kernels that cannot pack x's columns (int8, generic) take this task's rows
        // transposed into per-thread scratch (cache-resident); the fp32 and bf16 AVX-512 and AVX2
        // packers read them in place.
        float* xt = thread_scratch(static_cast<size_t>((m1 - m0) * K), kNormedRows);
        for (int64_t k0 = 0; k0 < K; k0 += 16)  // 16 x 16 blocks: both sides stay in cache
          for (int64_t b0 = m0; b0 < m1; b0 += 16)
            for (int64_t r = b0; r < std::min(m1, b0 + 16); ++r)
              for (int64_t k = k0; k < std::min(K, k0 + 16); ++k) xt[(r - m0) * K + k] = x[k * ldx + r];
        ta.x = xt;
        ta.ldx = K;
        ta.x_first = m0;
      } else if (x_cols) {
        ta.x_cols = true;
      }
      if (avx512 && int8)
        linear_task_avx512_int8(ta, rows, j0, j1,
                                reinterpret_cast<uint32_t*>(thread_scratch(
                                    static_cast<size_t>(rows.panels * int8_apack_words(K, kMR)))));
      else if (avx512 && bf16)
        linear_task_avx512_bf16(ta, rows, j0, j1,
                                reinterpret_cast<uint32_t*>(thread_scratch(
                                    static_cast<size_t>(rows.panels * ceil_div(K, 2) * kMR))));
      else if (avx512)
        linear_task_avx512(ta, rows, j0, j1,
                           thread_scratch(static_cast<size_t>(rows.panels * K * kMR)));
      else if (avx2 && int8)
        linear_task_avx2_int8(ta, rows, j0, j1,
                              reinterpret_cast<uint32_t*>(thread_scratch(
                                  static_cast<size_t>(rows.panels * int8_apack_words(K, kMrAvx2)))),
                              use_avxvnni());
      else if (avx2 && bf16)
        linear_task_avx2_bf16(ta, rows, j0, j1,
                              thread_scratch(static_cast<size_t>(rows.panels * 2 * ceil_div(K, 2) * kMrAvx2)));
      else if (avx2)
        linear_task_avx2(ta, rows, j0, j1, thread_scratch(static_cast<size_t>(rows.panels * K * kMrAvx2)));
      else if (int8)
        linear_task_generic<TileInt8>(ta, rows, j0, j1);
      else if (bf16)
        linear_task_generic<TileBf16>(ta, rows, j0, j1);
      else
        linear_task_generic<TileF32>(ta, rows, j0, j1);
    }
  });
}

}  // namespace

void linear(const float* x, int64_t M, int64_t ldx, const PackedLinear& w, float* y, int64_t ldy,
            Activation act, const float* residual, const RowNorm* norm) {
  linear_impl(x, M, ldx, false, w, y, ldy, act, residual, norm);
}

void linear_cols(const float* x, int64_t M, int64_t ldx, const PackedLinear& w, float* y, int64_t ldy,
                 const float* residual) {
  linear_impl(x, M, ldx, true, w, y, ldy, Activation::None, residual, nullptr);
}

const char* isa_name(IsaFamily f) {
  return f == IsaFamily::Avx512 ? "avx512" : f == IsaFamily::Avx2 ? "avx2" : "generic";
}

IsaFamily parse_isa(const std::string& name, const std::string& what) {
  if (name == "avx512") return IsaFamily::Avx512;
  if (name == "avx2") return IsaFamily::Avx2;
  if (name == "generic") return IsaFamily::Generic;
  fail(what + ": unknown kernel family '" + name + "' (expected avx512, avx2 or generic)");
}

IsaFamily cpu_isa_family() {
  return cpu_avx512() ? IsaFamily::Avx512 : cpu_avx2() ? IsaFamily::Avx2 : IsaFamily::Generic;
}

IsaFamily isa_family() {
  const EnvCap& env = env_cap();
  if (!env.error.empty()) fail(env.error);
  if (g_force_generic.load(std::memory_order_relaxed)) return IsaFamily::Generic;
  const int f = std::min({static_cast<int>(cpu_isa_family()), static_cast<int>(env.cap),
                          g_isa_cap.load(std::memory_order_relaxed)});
  return static_cast<IsaFamily>(f);
}

void set_isa_cap(IsaFamily cap) { g_isa_cap.store(static_cast<int>(cap)); }

namespace {
std::atomic<int> g_training_gemm_type{static_cast<int>(WeightType::F32)};
}

void set_training_gemm_type(WeightType type) {
  check(type != WeightType::INT8, "training GEMMs run in fp32 or bf16, not int8");
  g_training_gemm_type.store(static_cast<int>(type));
}

WeightType training_gemm_type() { return static_cast<WeightType>(g_training_gemm_type.load(std::memory_order_relaxed)); }

std::string cpu_features_seen() {
  std::string s;
  auto add = [&](const char* name, bool has) {
    if (!has) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add("avx2", __builtin_cpu_supports("avx2"));
  add("fma", __builtin_cpu_supports("fma"));
  add("avxvnni", cpuid_avxvnni());
  add("avx512f", __builtin_cpu_supports("avx512f"));
  add("avx512bw", __builtin_cpu_supports("avx512bw"));
  add("avx512vl", __builtin_cpu_supports("avx512vl"));
  add("avx512dq", __builtin_cpu_supports("avx512dq"));
  add("avx512bf16", __builtin_cpu_supports("avx512bf16"));
  add("avx512vnni", __builtin_cpu_supports("avx512vnni"));
  return s.empty() ? "none of avx2, fma, avx512*" : s;
}

std::string linear_kernel_name(WeightType type) {
  switch (kernel_for(type)) {
    case Kernel::Avx512:
      return type == WeightType::BF16 ? "avx512bf16" : type == WeightType::INT8 ? "avx512vnni" : "avx512f";
    case Kernel::Avx2:
      return type == WeightType::BF16 ? "avx2-bf16" : type != WeightType::INT8 ? "avx2" : use_avxvnni() ? "avxvnni" : "avx2-int8";
    default:
      return "generic";
  }
}

int linear_int8_levels() { return kernel_for(WeightType::INT8) == Kernel::Avx2 ? 254 : 255; }

void set_avxvnni(bool on) { g_avxvnni_allowed.store(on); }
bool avxvnni_allowed() { return g_avxvnni_allowed.load(std::memory_order_relaxed); }

void force_generic_kernels(bool on) { g_force_generic.store(on); }
bool generic_kernels_forced() { return g_force_generic.load(std::memory_order_relaxed); }

void linear_gelu(const float* x, float* y, int64_t n) {
  const IsaFamily f = isa_family();
  if (f == IsaFamily::Avx512) return gelu_avx512(x, y, n);
  if (f == IsaFamily::Avx2) return gelu_avx2(x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_generic(x[i]);
}

void linear_erf(const float* x, float* y, int64_t n) {
  const IsaFamily f = isa_family();
  if (f == IsaFamily::Avx512) return erf_avx512(x, y, n);
  if (f == IsaFamily::Avx2) return erf_avx2(x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = erf_generic(x[i]);
}

void linear_gelu_backward(const float* x, const float* dy, float* dx, int64_t n, bool accumulate) {
  const IsaFamily f = isa_family();
  if (f == IsaFamily::Avx512) return gelu_backward_avx512(x, dy, dx, n, accumulate);
  if (f == IsaFamily::Avx2) return gelu_backward_avx2(x, dy, dx, n, accumulate);
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], h = -0.5f * v * v;
    const float pdf = h >= -30.0f ? 0.39894228040143268f * std::exp(h) : 0.0f;
    const float cdf = 0.5f * (1.0f + erf_generic(v * 0.70710678118654752f));
    const float d = dy[i] * (cdf + v * pdf);
    dx[i] = accumulate ? dx[i] + d : d;
  }
}

namespace {
// The portable twin of fma_loop_avx512: 24 independent scalar chains.
float fma_loop_generic(int64_t n) {
  float a[24];
  for (int j = 0; j < 24; ++j) a[j] = static_cast<float>(j);
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < 24; ++j) a[j] = a[j] * 0.999999f + 1e-7f;
  float sum = 0;
  for (float v : a) sum += v;
  return sum;
}
}  // namespace

double fma_peak_gflops(int repeats) {
  const IsaFamily family = isa_family();
  // ~15 ms a run at this core's ~220 GFLOP/s (AVX-512, AVX2), a few ms for the portable loop.
  const int64_t steps = family == IsaFamily::Avx512 ? 4'000'000 : 8'000'000;
  const double flop_per_step = family == IsaFamily::Avx512 ? 24.0 * 16 * 2
                               : family == IsaFamily::Avx2 ? 12.0 * 8 * 2
                                                            : 24.0 * 2;
  const int threads = num_threads();
  std::vector<double> rates;
  volatile float sink = 0;
  for (int r = 0; r < std::max(repeats, 1); ++r) {
    std::atomic<float> total{0};
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      float s = 0;
      for (int64_t t = b; t < e; ++t) s += family == IsaFamily::Avx512 ? fma_loop_avx512(steps)
             : family == IsaFamily::Avx2  ? fma_loop_avx2(steps)
                                          : fma_loop_generic(steps);
      total.fetch_add(s, std::memory_order_relaxed);
    });
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + total.load();
    // All threads' work over the wall time: a thread that started late only lowers the rate.
    rates.push_back(flop_per_step * static_cast<double>(steps) * threads / sec / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace tessera
