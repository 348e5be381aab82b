#pragma once
// Segmenter's training loss: per-pixel cross-entropy on logits already upsampled to the input size
// (segmentation_logits), mean over the pixels whose label is not the ignore label — PyTorch's
// F.cross_entropy(logits, labels, ignore_index=255), as Segmenter trains.
#include <cstdint>
#include <vector>

#include "tessera/tensor.hpp"

namespace tessera {

// logits [B, C, H, W]; labels B·H·W values (row-major per image), each in [0, C) or ignore_label.
// Returns the loss (0 when every pixel is ignored, where PyTorch gives NaN: nothing to learn);
// with dlogits, d loss / d logits (same shape, overwritten). Error for a label that is neither.
double segmentation_cross_entropy(const Tensor& logits, const std::vector<int32_t>& labels, Tensor* dlogits = nullptr,
                                  int32_t ignore_label = 255);

}  // namespace tessera
