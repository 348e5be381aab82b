#pragma once
// Optimisers as plain functions over flat spans (weights, gradients and state laid out alike).
// Which tensors take weight decay is the caller's choice: call once per span with its own decay.
// Element-wise updates are split by element, the global norm is summed in fixed slices in a fixed
// order, so every result is the same bit for bit for any thread count.
#include <cstdint>
#include <span>
#include <vector>

namespace tessera {

// PyTorch torch.optim.SGD (dampening 0, not Nesterov):
//   g' = g + weight_decay·w;  buf = momentum·buf + g' (buf = g' at step 1);  w -= lr·buf.
// With momentum 0, velocity is not used (may be empty) and the step is exactly w -= lr·g'.
// `first_step`: buf is taken as g' rather than decayed (PyTorch's lazily created buffer).
void sgd_step(std::span<float> weights, std::span<const float> grads, std::span<float> velocity,
              float lr, float momentum = 0.0f, float weight_decay = 0.0f, bool first_step = false);

// PyTorch torch.optim.AdamW (amsgrad off), `step` counting from 1:
//   w *= 1 − lr·wd;  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;
//   w -= (lr / (1 − β1^step)) · m / (sqrt(v) / sqrt(1 − β2^step) + eps).
struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f, beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
};
void adamw_step(std::span<float> weights, std::span<const float> grads, std::span<float> m,
                std::span<float> v, int64_t step, const AdamWOptions& options);

// adamw_step over many tensors of one flat buffer in one parallel pass: segment i is elements
// [offset, offset + length) with its own options (a model's parameters: decay or not, layer-wise
// lr). The same arithmetic per element as adamw_step on each segment, so the same bits; but the
// work is split evenly over the whole buffer, where a call per tensor ran the many small ones
// (biases, norms, a small model's matrices) on one thread each.
struct AdamWSegment {
  int64_t offset = 0, length = 0;
  AdamWOptions options;
};
void adamw_step(std::span<float> weights, std::span<const float> grads, std::span<float> m,
                std::span<float> v, int64_t step, const std::vector<AdamWSegment>& segments);

// torch.nn.utils.clip_grad_norm_ over one flat gradient buffer: total = ‖g‖₂ (summed in double);
// if max_norm > 0 and max_norm / (total + 1e-6) < 1, g *= max_norm / (total + 1e-6).
// Returns total (the norm before clipping).
double clip_grad_norm(std::span<float> grads, double max_norm);
// ‖g‖₂ in double, summed in fixed slices in a fixed order.
double grad_norm(std::span<const float> grads);

// Learning rate at optimizer step `step` (from 0) of `total`: linear warm-up to peak over `warmup`
// steps (step s < warmup: peak·(s+1)/warmup), then a cosine from peak to min_lr at step total:
//   lr = min_lr + (peak − min_lr)·½(1 + cos(π·(s − warmup)/(total − warmup))).
// With warmup 0, step 0 takes the full peak.
double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double peak, double min_lr = 0.0);

}  // namespace tessera
