// Per-pixel cross-entropy (see segmentation_loss.hpp), in double per pixel.
#include "tessera/segmentation_loss.hpp"

#include <algorithm>
#include <cmath>

#include "tessera/error.hpp"
#include "tessera/parallel.hpp"

namespace tessera {

double segmentation_cross_entropy(const Tensor& logits, const std::vector<int32_t>& labels, Tensor* dlogits,
                                  int32_t ignore_label) {
  check(logits.ndim() == 4, "segmentation loss: logits must be [B, C, H, W], got " + shape_str(logits.shape()));
  const int64_t B = logits.dim(0), C = logits.dim(1), HW = logits.dim(2) * logits.dim(3);
  check(static_cast<int64_t>(labels.size()) == B * HW, "segmentation loss: " + std::to_string(labels.size()) +
                                                          " labels for logits " + shape_str(logits.shape()));
  int64_t counted = 0;
  for (int32_t y : labels) {
    check(y == ignore_label || (y >= 0 && y < C),
          "segmentation loss: label " + std::to_string(y) + " is not one of the " + std::to_string(C) + " classes");
    counted += y != ignore_label;
  }
  if (dlogits) {
    *dlogits = Tensor(logits.shape());
    std::fill(dlogits->data(), dlogits->data() + dlogits->numel(), 0.0f);
  }
  if (counted == 0) return 0.0;
  const double inv = 1.0 / static_cast<double>(counted);
  // Per-image partial sums, added in image order: the same result for any thread count.
  std::vector<double> partial(static_cast<size_t>(B), 0.0);
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* z = logits.data() + b * C * HW;
      float* dz = dlogits ? dlogits->data() + b * C * HW : nullptr;
      double sum = 0;
      for (int64_t p = 0; p < HW; ++p) {
        const int32_t y = labels[b * HW + p];
        if (y == ignore_label) continue;
        double mx = z[p];
        for (int64_t c = 1; c < C; ++c) mx = std::max<double>(mx, z[c * HW + p]);
        double s = 0;
        for (int64_t c = 0; c < C; ++c) s += std::exp(z[c * HW + p] - mx);
        sum += std::log(s) + mx - z[y * HW + p];
        if (dz)
          for (int64_t c = 0; c < C; ++c)
            dz[c * HW + p] = static_cast<float>(inv * (std::exp(z[c * HW + p] - mx) / s - (c == y ? 1.0 : 0.0)));
      }
      partial[b] = sum;
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total * inv;
}

}  // namespace tessera
