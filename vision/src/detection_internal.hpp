#pragma once
// Shared by the detection heads (yolos.cpp, detr.cpp) and their forward (detection.cpp).
#include <string>

#include "model_internal.hpp"
#include "tessera/detection.hpp"

namespace tessera {

// Activation buffers of the detection heads: sized at the first call for a (batch, grid), reused.
struct DetectionWorkspace {
  uint64_t head_id = 0;  // the DetectionHead the decoder buffers are sized for
  int64_t batch = -1, grid_h = -1, grid_w = -1;
  // DETR decoder
  Tensor memory, memory_pos, cross_k, cross_v, pos;  // [B*np, D] ([np, D] for pos)
  Tensor h, a, qk, v, context, ffn;                  // [B*Q, ...]
  // heads
  uint64_t heads_for = 0;  // the DetectionHead the head buffers are sized for
  int64_t head_rows = -1;
  Tensor slots;           // [B*S, D] the slot features the heads read
  Tensor mlp_a, mlp_b;    // [B*S, hidden]
};

// encoder [B, T, denc] rows; patch tokens start at first_patch → decoder output in ws.h [B*Q, D].
void detr_decode(const DetectionHead& head, const float* encoder, int64_t B, int64_t T,
                 int64_t denc, int64_t first_patch, int64_t nh, int64_t nw, DetectionWorkspace& ws);

namespace detail {
// BASE "layers.{i}.weight/bias" for i < num_layers: in → hidden → ... → out.
MlpHead load_mlp_head(Checkpoint& ck, const std::string& base, int64_t num_layers, int64_t in,
                      int64_t hidden, int64_t out, WeightType type);
}  // namespace detail

}  // namespace tessera
