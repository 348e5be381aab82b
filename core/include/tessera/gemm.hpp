#pragma once
// Linear layers: y[M,N] = act(x[M,K] · Wᵀ + b) (+ residual), with W in PyTorch's [N,K] layout.
// Weights are packed once, at load, into the layout the micro-kernel streams; the forward pass
// then only reads them. Kernels are chosen at run time from the CPU's features.
#include <cstdint>
#include <memory>
#include <string>

#include "tessera/tensor.hpp"

namespace tessera {

// F32: exact fp32 products. BF16: W and x rounded to bfloat16 (nearest even), products summed in
// fp32 (vdpbf16ps where the CPU has it). INT8: W quantized per output channel (symmetric, s8),
// x per row at run time (asymmetric, u8), exact int32 dot products (vpdpbusd where the CPU has
// AVX512-VNNI), one fp32 rescale per output; the math is in core/src/gemm_internal.hpp.
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

// Which kernel linear() uses for this type on this CPU ("avx512f", "generic", ...).
std::string linear_kernel_name(WeightType type);
// Forces the portable kernels (tests use it to check the fallback path), or restores dispatch.
// It covers every dispatched kernel (layer norm and attention in kernels.hpp too).
void force_generic_kernels(bool on);
bool generic_kernels_forced();

// The fused epilogue's exact-erf GELU, 0.5 x (1 + erf(x / sqrt 2)), and its erf, on n floats
// through the dispatched kernel; exposed so tests can check them against std::erf.
void linear_gelu(const float* x, float* y, int64_t n);
void linear_erf(const float* x, float* y, int64_t n);

}  // namespace tessera
