// Optimisers over flat spans (tessera/optim.hpp), with PyTorch's arithmetic order.
#include "tessera/optim.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "tessera/error.hpp"
#include "tessera/parallel.hpp"

namespace tessera {
namespace {
constexpr int64_t kGrain = 1 << 14;  // elements per task; also the fixed slice of grad_norm
}

void sgd_step(std::span<float> w, std::span<const float> g, std::span<float> buf, float lr,
              float momentum, float weight_decay, bool first_step) {
  check(g.size() == w.size(), "sgd_step: weights and gradients differ in size");
  check(momentum == 0.0f || buf.size() == w.size(), "sgd_step: momentum needs a velocity per weight");
  const int64_t n = static_cast<int64_t>(w.size());
  parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float d = g[i];
      if (weight_decay != 0.0f) d += weight_decay * w[i];
      if (momentum != 0.0f) {
        buf[i] = first_step ? d : momentum * buf[i] + d;
        d = buf[i];
      }
      w[i] -= lr * d;
    }
  });
}

namespace {

// One AdamW step's constants, as torch.optim.AdamW (single-tensor) makes them: the bias
// corrections in double, the updates in float.
struct AdamWConstants {
  float step_size, bc2_sqrt, decay, b1, b2, one_b1, one_b2, eps;
  AdamWConstants(const AdamWOptions& o, int64_t step) {
    const double bc1 = 1.0 - std::pow(static_cast<double>(o.beta1), static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(o.beta2), static_cast<double>(step));
    step_size = static_cast<float>(o.lr / bc1);
    bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    decay = 1.0f - o.lr * o.weight_decay;
    b1 = o.beta1, b2 = o.beta2, one_b1 = 1.0f - o.beta1, one_b2 = 1.0f - o.beta2, eps = o.eps;
  }
};

void adamw_range(float* w, const float* g, float* m, float* v, int64_t i0, int64_t i1, const AdamWConstants& c) {
  for (int64_t i = i0; i < i1; ++i) {
    w[i] *= c.decay;
    m[i] = m[i] * c.b1 + g[i] * c.one_b1;
    v[i] = v[i] * c.b2 + c.one_b2 * g[i] * g[i];
    const float denom = std::sqrt(v[i]) / c.bc2_sqrt + c.eps;
    w[i] -= c.step_size * (m[i] / denom);
  }
}

}  // namespace

void adamw_step(std::span<float> w, std::span<const float> g, std::span<float> m,
                std::span<float> v, int64_t step, const AdamWOptions& o) {
  adamw_step(w, g, m, v, step, std::vector<AdamWSegment>{{0, static_cast<int64_t>(w.size()), o}});
}

void adamw_step(std::span<float> w, std::span<const float> g, std::span<float> m,
                std::span<float> v, int64_t step, const std::vector<AdamWSegment>& segments) {
  check(g.size() == w.size() && m.size() == w.size() && v.size() == w.size(),
        "adamw_step: weights, gradients and moments differ in size");
  check(step >= 1, "adamw_step: steps count from 1");
  const int64_t n = static_cast<int64_t>(w.size());
  // The non-empty segments sorted by offset, disjoint, inside the buffer; each with its constants
  // and its start in the trained elements alone (frozen gaps take no work).
  std::vector<const AdamWSegment*> sorted;
  for (const AdamWSegment& sg : segments) {
    check(sg.offset >= 0 && sg.length >= 0 && sg.offset + sg.length <= n,
          "adamw_step: segments must be disjoint ranges of the buffer");
    if (sg.length > 0) sorted.push_back(&sg);
  }
  std::sort(sorted.begin(), sorted.end(), [](const AdamWSegment* a, const AdamWSegment* b) { return a->offset < b->offset; });
  std::vector<int64_t> first{0};  // first[s]: trained elements before segment s
  std::vector<AdamWConstants> constants;
  for (size_t s = 0; s < sorted.size(); ++s) {
    check(s == 0 || sorted[s]->offset >= sorted[s - 1]->offset + sorted[s - 1]->length,
          "adamw_step: segments must be disjoint ranges of the buffer");
    first.push_back(first.back() + sorted[s]->length);
    constants.emplace_back(sorted[s]->options, step);
  }
  // Even slices of the trained elements; each updates the parts of the segments it covers.
  parallel_for(0, first.back(), kGrain / 4, [&](int64_t t0, int64_t t1) {
    size_t s = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), t0) - first.begin()) - 1;
    for (; s < sorted.size() && first[s] < t1; ++s) {
      const int64_t lo = std::max(t0, first[s]) - first[s], hi = std::min(t1, first[s + 1]) - first[s];
      adamw_range(w.data(), g.data(), m.data(), v.data(), sorted[s]->offset + lo, sorted[s]->offset + hi, constants[s]);
    }
  });
}

double grad_norm(std::span<const float> g) {
  const int64_t n = static_cast<int64_t>(g.size());
  const int64_t slices = (n + kGrain - 1) / kGrain;
  std::vector<double> partial(static_cast<size_t>(slices));
  parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      double sum = 0;
      for (int64_t i = s * kGrain; i < std::min(n, (s + 1) * kGrain); ++i)
        sum += static_cast<double>(g[i]) * g[i];
      partial[s] = sum;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return std::sqrt(total);
}

double clip_grad_norm(std::span<float> g, double max_norm) {
  const double total = grad_norm(g);
  if (max_norm <= 0) return total;
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    const float c = static_cast<float>(coef);
    const int64_t n = static_cast<int64_t>(g.size());
    parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) g[i] *= c;
    });
  }
  return total;
}

double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double peak, double min_lr) {
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t span = total - warmup;
  if (span <= 0) return peak;
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(span));
  return min_lr + (peak - min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

}  // namespace tessera
