// The detection forward shared by YOLOS and the DETR head (slots → class logits and sigmoid boxes),
// Hugging Face's post_process_object_detection, and run_detector (no padding, same-size images
// share a forward pass, so a batch never changes an image's result).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>

#include "detection_internal.hpp"
#include "tessera/kernels.hpp"

namespace tessera {

namespace {

// x [M, in] → out [M, out_features] through Linear (+ReLU between) layers.
void mlp_forward(const MlpHead& head, const float* x, int64_t M, int64_t ldx, float* out,
                 DetectionWorkspace& ws) {
  const float* in = x;
  int64_t ld = ldx;
  for (size_t i = 0; i < head.layers.size(); ++i) {
    const PackedLinear& l = head.layers[i];
    const bool last = i + 1 == head.layers.size();
    float* y = last ? out : (i % 2 == 0 ? ws.mlp_a.data() : ws.mlp_b.data());
    linear(in, M, ld, l, y, l.out_features, last ? Activation::None : Activation::Relu);
    in = y, ld = l.out_features;
  }
}

int64_t mlp_hidden(const MlpHead& head) {
  int64_t n = 0;
  for (size_t i = 0; i + 1 < head.layers.size(); ++i) n = std::max(n, head.layers[i].out_features);
  return n;
}

}  // namespace

Tensor windowed_encoder_forward(const Model& m, const Tensor& pixel_values, ModelWorkspace& ws) {
  check(m.detection && m.detection->window > 0, m.dir + ": not a windowed DETR model");
  const DetectionHead& head = *m.detection;
  const VitConfig& c = m.encoder.config;
  const int64_t B = pixel_values.dim(0), H = pixel_values.dim(2), W = pixel_values.dim(3);
  check(H >= head.window && W >= head.window && H % c.patch_size == 0 && W % c.patch_size == 0,
        m.dir + ": its windowed DETR encoder needs an input of at least " + std::to_string(head.window) + " pixels a side, "
        "a multiple of the patch size " + std::to_string(c.patch_size) + ", got " + std::to_string(W) + "x" +
            std::to_string(H));
  const Tensor rows = vit_forward(m.encoder, cut_windows(pixel_values, head.window, head.window_stride), ws.vit);
  Tensor merged({B, (H / c.patch_size) * (W / c.patch_size), rows.dim(2)});
  merge_windows(rows.data(), B, H, W, head.window, head.window_stride, c.patch_size, rows.dim(1), c.num_prefix_tokens(),
                rows.dim(2), merged.data(), head.window_centre);
  return merged;
}

NamedTensors detection_forward(const Model& m, const Tensor& pixel_values, ModelWorkspace& mws) {
  const DetectionHead& head = *m.detection;
  if (!mws.detection) mws.detection = std::make_shared<DetectionWorkspace>();
  DetectionWorkspace& ws = *mws.detection;
  const VitConfig& c = m.encoder.config;
  const int64_t nh = pixel_values.dim(2) / c.patch_size, nw = pixel_values.dim(3) / c.patch_size;
  Tensor hidden;
  int64_t first_patch = c.num_prefix_tokens();
  if (head.window > 0) {
    hidden = windowed_encoder_forward(m, pixel_values, mws);
    first_patch = 0;
  } else {
    hidden = vit_forward(m.encoder, pixel_values, mws.vit);
  }
  const int64_t B = hidden.dim(0), T = hidden.dim(1), denc = hidden.dim(2), S = head.num_slots;

  const float* slots = nullptr;
  int64_t dslot = 0;
  Tensor last_hidden;
  if (head.kind == DetectionKind::Yolos) {
    // YolosForObjectDetection: the heads read the last num_detection_tokens tokens.
    if (ws.heads_for != head.id || ws.head_rows != B * S) {
      ws.heads_for = head.id;
      ws.head_rows = B * S;
      ws.slots = Tensor({B * S, denc});
      const int64_t hid = std::max(mlp_hidden(head.class_head), mlp_hidden(head.box_head));
      ws.mlp_a = Tensor({B * S, std::max<int64_t>(hid, 1)});
      ws.mlp_b = Tensor({B * S, std::max<int64_t>(hid, 1)});
    }
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(ws.slots.data() + b * S * denc, hidden.data() + (b * T + T - S) * denc,
                  sizeof(float) * S * denc);
    slots = ws.slots.data(), dslot = denc;
    last_hidden = hidden.clone();
  } else {
    detr_decode(head, hidden.data(), B, T, denc, first_patch, nh, nw, ws);
    if (ws.heads_for != head.id || ws.head_rows != B * S) {
      ws.heads_for = head.id;
      ws.head_rows = B * S;
      const int64_t hid = std::max(mlp_hidden(head.class_head), mlp_hidden(head.box_head));
      ws.mlp_a = Tensor({B * S, std::max<int64_t>(hid, 1)});
      ws.mlp_b = Tensor({B * S, std::max<int64_t>(hid, 1)});
    }
    slots = ws.h.data(), dslot = head.d_model;
    last_hidden = ws.h.reshape({B, S, head.d_model}).clone();
  }
  Tensor logits({B, S, head.num_labels + 1}), boxes({B, S, 4});
  mlp_forward(head.class_head, slots, B * S, dslot, logits.data(), ws);
  mlp_forward(head.box_head, slots, B * S, dslot, boxes.data(), ws);
  for (float& v : boxes.span()) v = 1.0f / (1.0f + std::exp(-v));
  NamedTensors out;
  out.emplace_back("logits", logits);
  out.emplace_back("pred_boxes", boxes);
  out.emplace_back("last_hidden_state", last_hidden);
  return out;
}

double detection_head_flops(const DetectionHead& head, const VitConfig& encoder, int64_t height,
                            int64_t width) {
  auto linear_flops = [](const PackedLinear& l, double rows) {
    return 2.0 * rows * static_cast<double>(l.in_features) * static_cast<double>(l.out_features);
  };
  const double S = static_cast<double>(head.num_slots);
  double flops = 0;
  for (const MlpHead* mlp : {&head.class_head, &head.box_head})
    for (const PackedLinear& l : mlp->layers) flops += linear_flops(l, S);
  if (head.kind == DetectionKind::Detr) {
    // detr_decode: memory = input_projection(patch tokens); per layer, self-attention over the
    // Q queries, cross-attention from the queries to the np memory rows, and the FFN.
    const double np = static_cast<double>((height / encoder.patch_size) * (width / encoder.patch_size));
    const double Q = S, D = static_cast<double>(head.d_model);
    flops += linear_flops(head.input_projection, np);
    for (const DetrDecoderLayer& l : head.layers) {
      flops += linear_flops(l.self_qk, Q) + linear_flops(l.self_v, Q) + linear_flops(l.self_out, Q);
      flops += 4 * Q * Q * D;  // q·kᵀ and attention·v
      flops += linear_flops(l.cross_q, Q) + linear_flops(l.cross_k, np) + linear_flops(l.cross_v, np) +
               linear_flops(l.cross_out, Q);
      flops += 4 * Q * np * D;
      flops += linear_flops(l.fc1, Q) + linear_flops(l.fc2, Q);
    }
  }
  return flops;
}

namespace {

float iou(const Detection& a, const Detection& b) {
  const float ix = std::max(0.0f, std::min(a.x1, b.x1) - std::max(a.x0, b.x0));
  const float iy = std::max(0.0f, std::min(a.y1, b.y1) - std::max(a.y0, b.y0));
  const float inter = ix * iy;
  const float area_a = std::max(0.0f, a.x1 - a.x0) * std::max(0.0f, a.y1 - a.y0);
  const float area_b = std::max(0.0f, b.x1 - b.x0) * std::max(0.0f, b.y1 - b.y0);
  const float uni = area_a + area_b - inter;
  return uni > 0 ? inter / uni : 0.0f;
}

}  // namespace

std::vector<Detection> post_process_detections(const float* logits, const float* boxes, int64_t slots,
                                               int64_t n, int64_t width, int64_t height,
                                               const std::vector<std::string>& labels,
                                               const PostProcessOptions& o) {
  check(n >= 2, "detection logits need num_labels + 1 >= 2 columns, got " + std::to_string(n));
  std::vector<Detection> out;
  const float fw = static_cast<float>(width), fh = static_cast<float>(height);
  for (int64_t s = 0; s < slots; ++s) {
    const float* row = logits + s * n;
    // softmax over all num_labels + 1; score, label = max, argmax over the real classes
    const float mx = *std::max_element(row, row + n);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
    // The candidate classes: every real class; with several labels per slot, not the "N/A"
    // placeholders of gaps in a label map (COCO's), which would only add boxes no one asked for.
    std::vector<int64_t> order;
    for (int64_t i = 0; i < n - 1; ++i)
      if (o.labels_per_slot == 1 || i >= static_cast<int64_t>(labels.size()) || labels[i] != "N/A") order.push_back(i);
    const int64_t k = std::min<int64_t>(std::max<int64_t>(o.labels_per_slot, 1), static_cast<int64_t>(order.size()));
    // first by logit, ties to the lower id (argmax's first maximum); a NaN logit ranks last
    auto key = [&](int64_t i) { return std::isnan(row[i]) ? -INFINITY : row[i]; };
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return key(a) != key(b) ? key(a) > key(b) : a < b; });
    const float* b = boxes + s * 4;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t best = order[static_cast<size_t>(j)];
      const float score = static_cast<float>(std::exp(static_cast<double>(row[best]) - mx) / sum);
      if (!(score > o.threshold)) continue;
      if (!o.classes.empty() && std::find(o.classes.begin(), o.classes.end(), best) == o.classes.end())
        continue;
      Detection d;
      d.label = best;
      d.name = best < static_cast<int64_t>(labels.size()) ? labels[best] : std::to_string(best);
      d.score = score;
      // center_to_corners_format, then * (w, h, w, h) of the target size
      d.x0 = (b[0] - 0.5f * b[2]) * fw, d.y0 = (b[1] - 0.5f * b[3]) * fh;
      d.x1 = (b[0] + 0.5f * b[2]) * fw, d.y1 = (b[1] + 0.5f * b[3]) * fh;
      d.slot = s;
      out.push_back(std::move(d));
    }
  }
  auto by_score = [](const Detection& a, const Detection& b) {
    return a.score != b.score ? a.score > b.score : a.slot < b.slot;
  };
  if (o.nms && o.soft_nms_sigma > 0) {
    // Gaussian soft-NMS (Bodla et al., 2017), class-wise: the best remaining detection is kept and
    // every other one of its class has its score multiplied by exp(-IoU^2 / sigma); those that
    // fall to the threshold or below go; repeat. Kept in the order chosen (scores non-increasing).
    std::vector<Detection> rest = std::move(out), kept;
    while (!rest.empty()) {
      const auto best = std::min_element(rest.begin(), rest.end(), by_score);
      const Detection top = *best;
      rest.erase(best);
      for (Detection& d : rest)
        if (d.label == top.label) {
          const float v = iou(top, d);
          d.score *= std::exp(-v * v / o.soft_nms_sigma);
        }
      std::erase_if(rest, [&](const Detection& d) { return !(d.score > o.threshold); });
      kept.push_back(top);
    }
    out = std::move(kept);
  } else if (o.nms) {
    std::stable_sort(out.begin(), out.end(), by_score);
    std::vector<Detection> kept;
    for (const Detection& d : out) {
      bool suppressed = false;
      for (const Detection& k : kept)
        if (k.label == d.label && iou(k, d) > o.nms_iou) {
          suppressed = true;
          break;
        }
      if (!suppressed) kept.push_back(d);
    }
    out = std::move(kept);
  }
  if (o.top_k > 0) {
    std::stable_sort(out.begin(), out.end(), by_score);
    if (static_cast<int64_t>(out.size()) > o.top_k) out.resize(static_cast<size_t>(o.top_k));
  }
  return out;
}

std::vector<Detection> post_process(const RawDetections& raw, const std::vector<std::string>& labels,
                                    const PostProcessOptions& options) {
  return post_process_detections(raw.logits.data(), raw.boxes.data(), raw.logits.dim(0),
                                 raw.logits.dim(1), raw.width, raw.height, labels, options);
}

PostProcessOptions model_post_process(const Model& model) {
  require_detector(model);
  PostProcessOptions o;
  const DetectionPostProcess& post = model.detection->post;
  o.labels_per_slot = post.labels_per_query;
  o.nms = post.nms_iou > 0 || post.soft_nms_sigma > 0;
  if (post.nms_iou > 0) o.nms_iou = post.nms_iou;
  o.soft_nms_sigma = post.soft_nms_sigma;
  return o;
}

namespace detail {

void read_post_process(const Config& cfg, DetectionHead& head) {
  if (!cfg.has("post_process")) return;
  const Config p = cfg.sub("post_process");
  for (const auto& [key, value] : p.j.items())
    check(key == "labels_per_query" || key == "nms_iou" || key == "soft_nms_sigma",
          p.file + ": unknown field \"" + brief_text(key) + "\" (labels_per_query, nms_iou, soft_nms_sigma)");
  head.post.labels_per_query = p.integer("labels_per_query", 1);
  check(head.post.labels_per_query >= 1 && head.post.labels_per_query <= head.num_labels,
        p.file + ": \"labels_per_query\" must be 1 to " + std::to_string(head.num_labels) + " (the classes), got " +
            std::to_string(head.post.labels_per_query));
  const double t = p.number("nms_iou", 0.0);
  // (the messages read the value only when it is there and wrong: a const json has no missing key)
  if (!(t >= 0 && t <= 1)) fail(p.file + ": \"nms_iou\" must be in [0, 1] (0: no NMS), got " + brief(p.j.at("nms_iou")));
  head.post.nms_iou = static_cast<float>(t);
  const double sigma = p.number("soft_nms_sigma", 0.0);
  if (!(sigma >= 0 && sigma <= 100))
    fail(p.file + ": \"soft_nms_sigma\" must be in [0, 100] (0: no soft-NMS), got " + brief(p.j.at("soft_nms_sigma")));
  check(sigma == 0 || t == 0, p.file + ": give \"nms_iou\" (NMS) or \"soft_nms_sigma\" (soft-NMS), not both");
  head.post.soft_nms_sigma = static_cast<float>(sigma);
}

}  // namespace detail

void require_detector(const Model& model) {
  if (!model.detection)
    fail(model.dir + ": " + (model.architecture.empty() ? model.model_type : model.architecture) +
         " is not a detector (detection needs a YolosForObjectDetection or vit-detr model folder)");
}

std::vector<RawDetections> run_detector(const Model& model, const Preprocessor& pre,
                                        const std::vector<cv::Mat>& rgb_images, ModelWorkspace& ws) {
  require_detector(model);
  std::vector<Tensor> pixels(rgb_images.size());
  for (size_t i = 0; i < rgb_images.size(); ++i) pixels[i] = pre.image(rgb_images[i]);
  // Each image pre-processed alone (no padding); images of one size run together.
  std::map<Shape, std::vector<size_t>> groups;
  for (size_t i = 0; i < pixels.size(); ++i) groups[pixels[i].shape()].push_back(i);
  std::vector<RawDetections> out(rgb_images.size());
  for (const auto& [shape, members] : groups) {
    const int64_t n = static_cast<int64_t>(members.size()), per = shape_numel(shape);
    Tensor x({n, shape[0], shape[1], shape[2]});
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(x.data() + j * per, pixels[members[j]].data(), sizeof(float) * per);
    NamedTensors res = detection_forward(model, x, ws);
    const Tensor& logits = output(res, "logits");
    const Tensor& boxes = output(res, "pred_boxes");
    const int64_t S = logits.dim(1), C = logits.dim(2);
    for (int64_t j = 0; j < n; ++j) {
      RawDetections& r = out[members[j]];
      r.logits = Tensor({S, C});
      r.boxes = Tensor({S, 4});
      std::memcpy(r.logits.data(), logits.data() + j * S * C, sizeof(float) * S * C);
      std::memcpy(r.boxes.data(), boxes.data() + j * S * 4, sizeof(float) * S * 4);
      r.width = rgb_images[members[j]].cols, r.height = rgb_images[members[j]].rows;
    }
  }
  return out;
}

}  // namespace tessera
