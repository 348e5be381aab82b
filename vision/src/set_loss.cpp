// The DETR / YOLOS set loss (see set_loss.hpp). Arithmetic in double; PyTorch's float32 results
// agree to ~1e-6 relative.
#include "tessera/set_loss.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tessera/error.hpp"

namespace tessera {

std::vector<std::pair<int64_t, int64_t>> linear_sum_assignment(const std::vector<double>& cost, int64_t rows,
                                                               int64_t cols) {
  check(static_cast<int64_t>(cost.size()) == rows * cols, "linear_sum_assignment: cost has the wrong size");
  for (double c : cost) check(std::isfinite(c), "linear_sum_assignment: the cost matrix has a non-finite entry");
  if (rows == 0 || cols == 0) return {};
  // The algorithm wants n <= m: solve the transpose when there are more rows than columns.
  const bool transposed = rows > cols;
  const int64_t n = transposed ? cols : rows, m = transposed ? rows : cols;
  auto a = [&](int64_t i, int64_t j) { return transposed ? cost[j * cols + i] : cost[i * cols + j]; };
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n + 1, 0), v(m + 1, 0);
  std::vector<int64_t> p(m + 1, 0), way(m + 1, 0);  // p[j]: row (1-based) assigned to column j
  for (int64_t i = 1; i <= n; ++i) {
    p[0] = i;
    int64_t j0 = 0;
    std::vector<double> minv(m + 1, inf);
    std::vector<char> used(m + 1, 0);
    do {
      used[j0] = 1;
      const int64_t i0 = p[j0];
      double delta = inf;
      int64_t j1 = 0;
      for (int64_t j = 1; j <= m; ++j) {
        if (used[j]) continue;
        const double cur = a(i0 - 1, j - 1) - u[i0] - v[j];
        if (cur < minv[j]) minv[j] = cur, way[j] = j0;
        if (minv[j] < delta) delta = minv[j], j1 = j;
      }
      for (int64_t j = 0; j <= m; ++j) {
        if (used[j]) u[p[j]] += delta, v[j] -= delta;
        else minv[j] -= delta;
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int64_t j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t j = 1; j <= m; ++j)
    if (p[j] != 0) out.emplace_back(transposed ? j - 1 : p[j] - 1, transposed ? p[j] - 1 : j - 1);
  std::sort(out.begin(), out.end());
  return out;
}

double generalized_box_iou(const std::array<double, 4>& a, const std::array<double, 4>& b, std::array<double, 4>* grad_a) {
  // Corners, as center_to_corners_format.
  const double a0 = a[0] - 0.5 * a[2], a1 = a[1] - 0.5 * a[3], a2 = a[0] + 0.5 * a[2], a3 = a[1] + 0.5 * a[3];
  const double b0 = b[0] - 0.5 * b[2], b1 = b[1] - 0.5 * b[3], b2 = b[0] + 0.5 * b[2], b3 = b[1] + 0.5 * b[3];
  const double area_a = (a2 - a0) * (a3 - a1), area_b = (b2 - b0) * (b3 - b1);
  const double iw_raw = std::min(a2, b2) - std::max(a0, b0), ih_raw = std::min(a3, b3) - std::max(a1, b1);
  const double iw = std::max(iw_raw, 0.0), ih = std::max(ih_raw, 0.0);
  const double inter = iw * ih, uni = area_a + area_b - inter;
  const double ew_raw = std::max(a2, b2) - std::min(a0, b0), eh_raw = std::max(a3, b3) - std::min(a1, b1);
  const double ew = std::max(ew_raw, 0.0), eh = std::max(eh_raw, 0.0);
  const double enclosing = ew * eh;
  const double iou = inter / uni;
  const double giou = iou - (enclosing - uni) / enclosing;
  if (grad_a) {
    // giou = inter / uni - 1 + uni / enclosing. Partials of inter, uni and enclosing with respect to
    // the corners (a0, a1, a2, a3); min/max route the gradient to the argument they picked and
    // clamp(min=0) passes it where its input is >= 0, as PyTorch's backward does.
    double d_inter[4] = {0, 0, 0, 0}, d_area_a[4], d_enc[4] = {0, 0, 0, 0};
    if (iw_raw >= 0) {
      if (a2 < b2) d_inter[2] += ih;
      if (a0 > b0) d_inter[0] -= ih;
    }
    if (ih_raw >= 0) {
      if (a3 < b3) d_inter[3] += iw;
      if (a1 > b1) d_inter[1] -= iw;
    }
    d_area_a[0] = -(a3 - a1), d_area_a[2] = (a3 - a1), d_area_a[1] = -(a2 - a0), d_area_a[3] = (a2 - a0);
    if (ew_raw >= 0) {
      if (a2 > b2) d_enc[2] += eh;
      if (a0 < b0) d_enc[0] -= eh;
    }
    if (eh_raw >= 0) {
      if (a3 > b3) d_enc[3] += ew;
      if (a1 < b1) d_enc[1] -= ew;
    }
    double dc[4];
    for (int k = 0; k < 4; ++k) {
      const double d_uni = d_area_a[k] - d_inter[k];
      dc[k] = (d_inter[k] * uni - inter * d_uni) / (uni * uni) + (d_uni * enclosing - uni * d_enc[k]) / (enclosing * enclosing);
    }
    // Corners from (cx, cy, w, h): x0 = cx - w/2, x1 = cx + w/2.
    (*grad_a)[0] = dc[0] + dc[2];
    (*grad_a)[1] = dc[1] + dc[3];
    (*grad_a)[2] = 0.5 * (dc[2] - dc[0]);
    (*grad_a)[3] = 0.5 * (dc[3] - dc[1]);
  }
  return giou;
}

SetLossResult set_loss(const std::vector<const Tensor*>& logits, const std::vector<const Tensor*>& boxes,
                       const std::vector<DetectionTarget>& targets, const SetLossConfig& cfg,
                       const std::vector<Tensor*>& dlogits, const std::vector<Tensor*>& dboxes) {
  check(!logits.empty() && logits.size() == boxes.size(), "set loss: one logits and one boxes tensor per layer");
  check(dlogits.empty() || dlogits.size() == logits.size(), "set loss: one dlogits per layer");
  check(dboxes.empty() || dboxes.size() == logits.size(), "set loss: one dboxes per layer");
  const int64_t B = logits[0]->dim(0), Q = logits[0]->dim(1), C1 = logits[0]->dim(2), C = C1 - 1;
  check(static_cast<int64_t>(targets.size()) == B,
        "set loss: " + std::to_string(targets.size()) + " targets for a batch of " + std::to_string(B));
  int64_t total_boxes = 0;
  for (const DetectionTarget& t : targets) {
    check(t.labels.size() == t.boxes.size(), "set loss: a target has labels and boxes of different counts");
    for (int64_t l : t.labels)
      check(l >= 0 && l < C, "set loss: target label " + std::to_string(l) + " is not one of the " + std::to_string(C) + " classes");
    total_boxes += static_cast<int64_t>(t.labels.size());
  }
  const double num_boxes = cfg.num_boxes > 0 ? cfg.num_boxes : std::max<double>(static_cast<double>(total_boxes), 1.0);
  SetLossResult result;
  for (size_t layer = 0; layer < logits.size(); ++layer) {
    const Tensor& z = *logits[layer];
    const Tensor& bx = *boxes[layer];
    check(z.shape() == Shape{B, Q, C1}, "set loss: logits of layer " + std::to_string(layer) + " are " + shape_str(z.shape()));
    check(bx.shape() == Shape{B, Q, 4}, "set loss: boxes of layer " + std::to_string(layer) + " are " + shape_str(bx.shape()));
    for (float f : z.span()) check(std::isfinite(f), "set loss: non-finite logits");
    for (float f : bx.span()) check(std::isfinite(f), "set loss: non-finite boxes");
    Tensor* dz = dlogits.empty() ? nullptr : dlogits[layer];
    Tensor* db = dboxes.empty() ? nullptr : dboxes[layer];
    if (dz) *dz = Tensor({B, Q, C1}), std::fill(dz->data(), dz->data() + dz->numel(), 0.0f);
    if (db) *db = Tensor({B, Q, 4}), std::fill(db->data(), db->data() + db->numel(), 0.0f);
    // Softmax of every query, in double.
    std::vector<double> prob(static_cast<size_t>(B * Q * C1));
    for (int64_t r = 0; r < B * Q; ++r) {
      const float* row = z.data() + r * C1;
      const double mx = *std::max_element(row, row + C1);
      double s = 0;
      for (int64_t c = 0; c < C1; ++c) s += prob[r * C1 + c] = std::exp(row[c] - mx);
      for (int64_t c = 0; c < C1; ++c) prob[r * C1 + c] /= s;
    }
    auto box_of = [&](const float* p) { return std::array<double, 4>{p[0], p[1], p[2], p[3]}; };
    SetLossLayer L;
    std::vector<int64_t> target_class(static_cast<size_t>(B * Q), C);  // no-object unless matched
    for (int64_t b = 0; b < B; ++b) {
      const DetectionTarget& t = targets[b];
      const int64_t T = static_cast<int64_t>(t.labels.size());
      std::vector<double> cost(static_cast<size_t>(Q * T));
      for (int64_t q = 0; q < Q; ++q) {
        const std::array<double, 4> pb = box_of(bx.data() + (b * Q + q) * 4);
        for (int64_t j = 0; j < T; ++j) {
          const std::array<double, 4> tb{t.boxes[j][0], t.boxes[j][1], t.boxes[j][2], t.boxes[j][3]};
          double l1 = 0;
          for (int k = 0; k < 4; ++k) l1 += std::abs(pb[k] - tb[k]);
          cost[q * T + j] = cfg.bbox_cost * l1 - cfg.class_cost * prob[(b * Q + q) * C1 + t.labels[j]] -
                            cfg.giou_cost * generalized_box_iou(pb, tb);
        }
      }
      L.matches.push_back(linear_sum_assignment(cost, Q, T));
      for (const auto& [q, j] : L.matches.back()) {
        target_class[b * Q + q] = t.labels[j];
        const std::array<double, 4> tb{t.boxes[j][0], t.boxes[j][1], t.boxes[j][2], t.boxes[j][3]};
        const float* pp = bx.data() + (b * Q + q) * 4;
        std::array<double, 4> g{};
        L.giou_loss += 1 - generalized_box_iou(box_of(pp), tb, db ? &g : nullptr);
        for (int k = 0; k < 4; ++k) {
          const double diff = pp[k] - tb[k];
          L.l1_loss += std::abs(diff);
          if (db) {
            const double sign = diff > 0 ? 1 : diff < 0 ? -1 : 0;
            (*db)[(b * Q + q) * 4 + k] = static_cast<float>(
                (cfg.bbox_loss_coefficient * sign - cfg.giou_loss_coefficient * g[k]) / num_boxes);
          }
        }
      }
    }
    L.l1_loss /= num_boxes;
    L.giou_loss /= num_boxes;
    // Weighted cross-entropy over every query: Σ w_y · (-log p_y) / Σ w_y.
    double weighted = 0, weight_sum = 0;
    for (int64_t r = 0; r < B * Q; ++r) {
      const int64_t y = target_class[r];
      const double w = y == C ? cfg.eos_coefficient : 1.0;
      const float* row = z.data() + r * C1;
      const double mx = *std::max_element(row, row + C1);
      double s = 0;
      for (int64_t c = 0; c < C1; ++c) s += std::exp(row[c] - mx);
      weighted += w * (std::log(s) + mx - row[y]);
      weight_sum += w;
    }
    L.class_loss = weighted / weight_sum;
    if (dz)
      for (int64_t r = 0; r < B * Q; ++r) {
        const int64_t y = target_class[r];
        const double w = (y == C ? cfg.eos_coefficient : 1.0) * cfg.class_loss_coefficient / weight_sum;
        for (int64_t c = 0; c < C1; ++c)
          (*dz)[r * C1 + c] = static_cast<float>(w * (prob[r * C1 + c] - (c == y ? 1.0 : 0.0)));
      }
    result.loss += cfg.class_loss_coefficient * L.class_loss + cfg.bbox_loss_coefficient * L.l1_loss +
                   cfg.giou_loss_coefficient * L.giou_loss;
    result.layers.push_back(std::move(L));
  }
  return result;
}

}  // namespace tessera
