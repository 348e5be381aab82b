#pragma once
// The DETR / YOLOS training loss, exactly as transformers 4.40 computes it (DetrHungarianMatcher,
// DetrLoss, and the weighting in DetrForObjectDetection / YolosForObjectDetection.forward), and its
// gradient with respect to the class logits and the predicted boxes. Per image:
//   - Hungarian matching (optimal: linear_sum_assignment) of targets to queries on the cost
//       class_cost · (-softmax(logits)[target class]) + bbox_cost · L1(centre boxes)
//       + giou_cost · (-GIoU(corner boxes));
//   - class loss: cross-entropy over every query of the batch, the unmatched ones labelled
//     no-object (the last class), class weights 1 and eos_coefficient for no-object, averaged as
//     PyTorch's weighted cross_entropy does (Σ wᵢ·lᵢ / Σ wᵢ);
//   - box losses over the matched pairs: L1 on the normalised centre boxes and 1 - GIoU, each summed
//     and divided by the number of target boxes in the batch (at least 1);
//   - total class_loss_coefficient · class + bbox_loss_coefficient · L1 + giou_loss_coefficient · GIoU,
//     plus the same for every auxiliary decoder layer (each matched on its own).
// Boxes are (cx, cy, w, h) normalised to [0, 1], as the processors make them from COCO boxes.
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "tessera/tensor.hpp"

namespace tessera {

struct SetLossConfig {  // DetrConfig / YolosConfig defaults
  double class_cost = 1, bbox_cost = 5, giou_cost = 2;
  double eos_coefficient = 0.1;
  double class_loss_coefficient = 1, bbox_loss_coefficient = 5, giou_loss_coefficient = 2;
  // > 0: the box terms' divisor instead of this batch's box count. Data-parallel training passes
  // the global batch's count / ranks, as DETR's SetCriterion all-reduces num_boxes, so that the
  // ranks' averaged box gradients are the global batch's.
  double num_boxes = 0;
};

struct DetectionTarget {
  std::vector<int64_t> labels;              // class ids in [0, num_labels)
  std::vector<std::array<float, 4>> boxes;  // cx, cy, w, h in [0, 1]
};

struct SetLossLayer {
  double class_loss = 0, l1_loss = 0, giou_loss = 0;  // unweighted, as DetrLoss reports them
  std::vector<std::vector<std::pair<int64_t, int64_t>>> matches;  // per image: (query, target), by query
};

struct SetLossResult {
  double loss = 0;                  // the weighted total over every layer
  std::vector<SetLossLayer> layers; // in the order given (the model's output last, as transformers)
};

// One entry per decoder layer whose output is supervised: logits [B, Q, num_labels + 1] and boxes
// [B, Q, 4]; with auxiliary loss off, just the model's output. When dlogits / dboxes are given they
// receive d loss / d logits and d loss / d boxes (same shapes; overwritten). Error on shape mismatches,
// labels out of range, or non-finite inputs.
SetLossResult set_loss(const std::vector<const Tensor*>& logits, const std::vector<const Tensor*>& boxes,
                       const std::vector<DetectionTarget>& targets, const SetLossConfig& config = {},
                       const std::vector<Tensor*>& dlogits = {}, const std::vector<Tensor*>& dboxes = {});

// Minimum-cost assignment of a rows x cols cost matrix (row-major, finite), as
// scipy.optimize.linear_sum_assignment: min(rows, cols) pairs (row, column), sorted by row.
// Shortest augmenting paths (Hungarian / Jonker-Volgenant), O(n² m).
std::vector<std::pair<int64_t, int64_t>> linear_sum_assignment(const std::vector<double>& cost, int64_t rows,
                                                               int64_t cols);

// Generalized IoU of two (cx, cy, w, h) boxes, as transformers' generalized_box_iou on their
// corners; with grad_a, d GIoU / d a.
double generalized_box_iou(const std::array<double, 4>& a, const std::array<double, 4>& b,
                           std::array<double, 4>* grad_a = nullptr);

}  // namespace tessera
