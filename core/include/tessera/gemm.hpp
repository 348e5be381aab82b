#pragma once
// Linear layers: y[M,N] = act(x[M,K] · Wᵀ + b) (+ residual), with W in PyTorch's [N,K] layout.
// Weights are packed once, at load, into the layout the micro-kernel streams; the forward pass
// then only reads them. Kernels are chosen at run time from the CPU's features.
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

// F32: exact fp32 products. BF16: W and x rounded to bfloat16 (nearest even), products summed in
// fp32 (vdpbf16ps where the CPU has it; AVX2 widens the bf16 weights to fp32 in registers and
// sums in the same order). INT8: W quantized per output channel (symmetric, s8), x per row at
// run time (asymmetric, u8: 255 levels, 254 on the AVX2 path), exact int32 dot products
// (vpdpbusd where the CPU has AVX512-VNNI, vpmaddubsw on AVX2), one fp32 rescale per output;
// the math is in core/src/gemm_internal.hpp.
enum class WeightType { F32, BF16, INT8 };
enum class Activation { None, Gelu /* exact erf */, Relu };

// The type for a model's edge layers (patch embedding, pooler, classifier heads) when the
// encoder blocks use `blocks`: int8 there cost the conformance models up to 0.0016 of logits
// cosine similarity and flipped a top-1 for ~1% of the FLOPs, so they stay fp32; bf16 is kept.
inline WeightType edge_layer_type(WeightType blocks) {
  return blocks == WeightType::INT8 ? WeightType::F32 : blocks;
}

struct PackedLinear {
  int64_t out_features = 0;  // N
  int64_t in_features = 0;   // K
  WeightType type = WeightType::F32;
  std::shared_ptr<float[]> bias;     // N floats (zero-padded to the panel width), or null
  std::shared_ptr<void> packed;      // kernel-specific layout
  size_t packed_bytes = 0;
};

// Packs W [N,K] (row-major) and bias [N] (may be null).
PackedLinear pack_linear(const float* weight, const float* bias, int64_t out_features,
                         int64_t in_features, WeightType type = WeightType::F32);

// 64-byte aligned floats that only grow: scratch that a caller keeps from one call to the next,
// so a loop of same-sized calls touches no new pages after the first.
class ScratchFloats {
 public:
  ScratchFloats() = default;
  ScratchFloats(const ScratchFloats&) = delete;
  ScratchFloats& operator=(const ScratchFloats&) = delete;
  ~ScratchFloats();
  float* get(int64_t floats);  // at least `floats` floats; contents unspecified

 private:
  float* p_ = nullptr;
  int64_t cap_ = 0;
};

// The same fp32 packing into the caller's memory (`buffer`: 64-byte aligned,
// pack_linear_buffer_floats(N, K) floats, bias included), valid as long as the buffer is: for
// weights that change every call (training packs every layer's weights every step, and new memory
// each time was fresh pages, page faults and the kernel zeroing them, every step).
int64_t pack_linear_buffer_floats(int64_t out_features, int64_t in_features);
PackedLinear pack_linear(const float* weight, const float* bias, int64_t out_features, int64_t in_features,
                         float* buffer, WeightType type = WeightType::F32);  // F32 or BF16

// The same fp32 packing of W [N,K], given Wᵀ instead: wt [K, N] row-major, rows ldwt >= N floats
// apart. The packed panels are strips of wt's rows, so this is a copy, not a transpose: what the
// backward's dX = dY·W (W as the weight of a [K, N] layer) and dW = dYᵀ·X (X [M, K] as the
// weight's transpose) need. Bit-identical to pack_linear on the transposed matrix.
PackedLinear pack_linear_transposed(const float* wt, int64_t ldwt, int64_t out_features, int64_t in_features);

// The same, packed into the caller's memory instead of a new buffer: `buffer` as for
// pack_linear's (64-byte aligned, pack_linear_buffer_floats(N, K) floats, alive as long as the
// result is used). For the backward, which packs the same shapes every step: a new buffer each
// time was fresh pages (page faults and kernel zeroing) on every call.
// type BF16: the bf16 pair panels of pack_linear(..., WeightType::BF16) on the transposed matrix,
// bit for bit (for training's bf16 GEMMs, below).
PackedLinear pack_linear_transposed(const float* wt, int64_t ldwt, int64_t out_features, int64_t in_features,
                                    float* buffer, WeightType type = WeightType::F32);

// The precision of training's GEMMs (the linear layers' forward, dX = dY·W and dW = dYᵀ·X: what
// train_pack and linear_backward pack): F32 (the default) or BF16, whose operands are rounded to
// bf16 and multiplied with fp32 accumulation (vdpbf16ps where the CPU has it), the outputs,
// weights, gradients and optimizer state staying fp32. One process-wide setting, as the ISA cap.
void set_training_gemm_type(WeightType type);
WeightType training_gemm_type();

// set_training_gemm_type for a scope, the setting before restored at its end: e.g. fp32 for the
// training forward that checks an exported (fp32) model or measures it on validation data.
class TrainingGemmScope {
 public:
  explicit TrainingGemmScope(WeightType type) : before_(training_gemm_type()) { set_training_gemm_type(type); }
  ~TrainingGemmScope() { set_training_gemm_type(before_); }
  TrainingGemmScope(const TrainingGemmScope&) = delete;
  TrainingGemmScope& operator=(const TrainingGemmScope&) = delete;

 private:
  WeightType before_;
};

// Memory for the packed weights of one model load. Pieces are cut one after another from
// 2 MiB-aligned slabs that ask for transparent huge pages, so a model's weights fill whole huge
// pages instead of each tensor ending in 4 KiB ones: a ViT-B's tails are ~9,000 small page
// faults, and on a VM each costs ~30 us, most of a load. A slab is reserved address space, not
// memory: only the pages its pieces touch count. Each piece keeps its slab alive; drop the arena
// when the load is done, which gives back the part of the last slab nothing reached.
class WeightArena {
 public:
  WeightArena() = default;
  ~WeightArena();
  WeightArena(const WeightArena&) = delete;
  WeightArena& operator=(const WeightArena&) = delete;
  // n floats, 64-byte aligned, uninitialised (when replaying: the cached contents). Thread-safe.
  std::shared_ptr<float[]> floats(size_t n);
  // The same for a piece its caller fills itself even when replaying (a small tensor read from
  // the checkpoint). When replaying it comes from a slab, not from the cache's mapping, whose
  // copy of the piece is skipped: a write into the mapping would copy that page and break the
  // mapping's 2 MiB page around it into 4 KiB ones, and the weights sharing that 2 MiB would be
  // slower to stream (ViT-B, 2 threads, batch 1: ~6% slower in all when the small tensors were
  // written into the mapping).
  std::shared_ptr<float[]> writable_floats(size_t n);

  // The packed-weight cache. A load records the size of every piece it cuts; save() writes
  // the pieces, in order, to one file, with `key` (what the pieces were made from). replay()
  // maps such a file instead: the same load then gets its pieces from the mapping (private,
  // copy-on-write: the file is never written through it) and skips packing the ones the file
  // holds (replaying() is true), so a load costs reading the checkpoint's header and its small
  // tensors. A load that asks for other sizes, or fewer pieces, throws CacheMismatch.
  //
  // replay: false (and nothing changes) when `path` does not exist, is not a cache file, or was
  // made for another key or layout version; Error when it claims to be one but is damaged.
  bool replay(const std::string& path, const std::string& key);
  bool replaying() const { return static_cast<bool>(mapping_); }
  void finish_replay() const;  // CacheMismatch unless the load used every cached piece
  // Writes the pieces cut so far to `path` atomically (a temporary file, then a rename); Error
  // with the reason when it cannot. Not while replaying.
  void save(const std::string& path, const std::string& key) const;
  struct CacheMismatch : Error {
    using Error::Error;
  };

 private:
  struct Slab;
  struct Mapping;
  static std::shared_ptr<Slab> new_slab(size_t at_least);
  void retire();  // stops cutting from the current slab and trims its unreached tail
  std::shared_ptr<float[]> cut(size_t n, bool writable);  // floats / writable_floats
  std::mutex mutex_;
  std::shared_ptr<Slab> slab_;
  size_t used_ = 0;
  std::vector<std::pair<const void*, size_t>> pieces_;  // every piece cut, in order (for save)
  std::shared_ptr<Mapping> mapping_;  // when replaying
  std::vector<uint64_t> sizes_;       // the cached pieces' sizes
  size_t next_ = 0, offset_ = 0;      // the next cached piece and its offset in the mapping
};

// Bump when any packed layout (or what a loader puts in its arena) changes: caches made by
// another version are then ignored and rewritten.
inline constexpr int kPackedLayoutVersion = 1;

// W's rows [n0, n1), in_features floats each, written row-major to dst.
using WeightRows = std::function<void(int64_t n0, int64_t n1, float* dst)>;

// As above, with W produced a few panels (32 rows each, ~256 KiB in all) at a time by `rows`,
// called from several threads at once: a loader reads the rows from the checkpoint into a
// per-thread buffer, so W never exists whole in memory. The packed weights come from `arena`
// when one is given.
PackedLinear pack_linear(const WeightRows& rows, const float* bias, int64_t out_features,
                         int64_t in_features, WeightType type, WeightArena* arena = nullptr);

// A layer norm over each x row's K features (kernels.hpp's layer_norm_row), applied by linear()
// to the rows as it packs them: the normalised rows never make a round trip through memory.
struct RowNorm {
  const float* gamma;  // K floats
  const float* beta;   // K floats
  float eps;
};

// y[m, n] = act(sum_k x'[m, k] W[n, k] + b[n]) + (residual ? residual[m, n] : 0), for m < M,
// where x' = x, or layer_norm(x) row by row when `norm` is given (then y must not alias x).
// x rows are ldx apart, y and residual rows ldy apart (residual may alias y). Parallel inside.
void linear(const float* x, int64_t M, int64_t ldx, const PackedLinear& w, float* y, int64_t ldy,
            Activation act = Activation::None, const float* residual = nullptr,
            const RowNorm* norm = nullptr);

// The same product with x given column-major: x[m, k] is at x[k * ldx + m] (ldx >= M), i.e. x
// is the transpose of an array whose rows hold x's columns. The backward GEMMs need xᵀ·y
// products; this packs xᵀ's micro-panels straight from the untransposed array, so no transposed
// copy of it makes a round trip through memory. The same sums in the same order as linear() on
// the transposed copy: the same bits.
void linear_cols(const float* x, int64_t M, int64_t ldx, const PackedLinear& w, float* y, int64_t ldy,
                 const float* residual = nullptr);

// Kernel families, widest last. Every dispatched kernel (GEMM of each type, its GELU/erf
// epilogue, layer norm, attention, the FMA peak) runs the family isa_family() names: the
// widest the CPU has (CPUID, once: avx512 = avx512f/bw/vl/dq, avx2 = avx2 + fma), capped by the
// environment variable TESSERA_ISA=avx512|avx2|generic, by set_isa_cap and by
// force_generic_kernels. Packed weights do not depend on the family (every family reads the
// same panels), so a model packed under one cap runs under any other.
enum class IsaFamily { Generic = 0, Avx2 = 1, Avx512 = 2 };
const char* isa_name(IsaFamily f);  // "generic", "avx2", "avx512"
// "avx512" / "avx2" / "generic" → the family; Error naming `what` and the value otherwise.
IsaFamily parse_isa(const std::string& name, const std::string& what = "TESSERA_ISA");
IsaFamily cpu_isa_family();  // the widest family this CPU supports
// The family in use: min(CPU, TESSERA_ISA, set_isa_cap, force_generic_kernels). Error (once
// per call) when TESSERA_ISA holds something else than the three names.
IsaFamily isa_family();
// Caps dispatch at `cap` for the whole process (IsaFamily::Avx512: no cap); tests and
// `tessera bench --isa` use it. The environment's cap still applies.
void set_isa_cap(IsaFamily cap);
// The CPU features dispatch looked at, as "avx2 fma avx512f ..." (those present).
std::string cpu_features_seen();

// Which kernel linear() uses for this type on this CPU and cap ("avx512f", "avx512bf16",
// "avx512vnni", "avx2", "avx2-bf16", "avx2-int8", "avxvnni", "generic"); its prefix names the
// family.
std::string linear_kernel_name(WeightType type);
// Lets the AVX2 family's int8 kernel use AVX-VNNI's vpdpbusd where the CPU has it (the default,
// unless TESSERA_AVXVNNI=off), or keeps it on vpmaddubsw. Both give the same bits.
void set_avxvnni(bool on);
// Whether that switch is on (the CPU may still lack AVX-VNNI: linear_kernel_name says what runs).
bool avxvnni_allowed();
// Forces the portable kernels (tests use it to check the fallback path), or lifts that cap (the
// set_isa_cap and environment caps stay). It covers every dispatched kernel (layer norm and
// attention in kernels.hpp too).
void force_generic_kernels(bool on);
bool generic_kernels_forced();
// Levels of the run-time x quantization of the int8 GEMM in use: 255 (u8: AVX-512 VNNI and
// the portable path), or 254 (the AVX2 path, whose vpmaddubsw would saturate on u8 x s8; see
// core/src/gemm_internal.hpp).
int linear_int8_levels();

// The fused epilogue's exact-erf GELU, 0.5 x (1 + erf(x / sqrt 2)), and its erf, on n floats
// through the dispatched kernel; exposed so tests can check them against std::erf.
void linear_gelu(const float* x, float* y, int64_t n);
void linear_erf(const float* x, float* y, int64_t n);
// The training backward of that GELU, vectorised per family: dx[i] += dy[i] · (Φ(x) + x·φ(x)),
// Φ(x) = ½(1 + erf(x/√2)) as the epilogue computes it, φ the normal density (0 past |x| = √60);
// with accumulate false, dx[i] = dy[i] · (…).
void linear_gelu_backward(const float* x, const float* dy, float* dx, int64_t n, bool accumulate = true);

// The CPU's fp32 multiply-add ceiling right now, for the family in use: every arena thread at
// once runs independent FMAs on registers only (24 zmm, 12 ymm or 24 scalar accumulators, no
// memory). GFLOP/s
// over all threads, 2 FLOPs per multiply-add, median of `repeats` runs of ~15 ms each. No fp32
// GEMM can beat it; `tessera bench --gemm` reports it as the yardstick beside the GEMM rate.
double fma_peak_gflops(int repeats = 7);

}  // namespace tessera
