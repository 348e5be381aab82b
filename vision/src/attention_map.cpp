#include "tessera/attention_map.hpp"

#include <opencv2/imgproc.hpp>

#include "tessera/detection.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/vit.hpp"

namespace tessera {

std::vector<int64_t> rollout_query_tokens(const VitConfig& c, int64_t height, int64_t width, int64_t token) {
  const int64_t T = vit_num_tokens(c, height, width);
  if (token >= 0) {
    check(token < T, "attention map: token " + std::to_string(token) + " does not exist (the model has " +
                         std::to_string(T) + " tokens at " + std::to_string(width) + "x" +
                         std::to_string(height) + ")");
    return {token};
  }
  std::vector<int64_t> q;
  const int64_t prefix = c.num_prefix_tokens(), patches = (height / c.patch_size) * (width / c.patch_size);
  if (c.num_detection_tokens > 0) {
    for (int64_t t = prefix + patches; t < T; ++t) q.push_back(t);
  } else if (c.class_token) {
    q.push_back(0);
  } else {
    for (int64_t t = prefix; t < prefix + patches; ++t) q.push_back(t);
  }
  return q;
}

Tensor attention_rollout_row(const std::vector<Tensor>& attention, int64_t image,
                             const std::vector<int64_t>& query_tokens, double residual) {
  check(!attention.empty(), "attention map: no attention was recorded (set VitWorkspace::record_attention)");
  check(!query_tokens.empty(), "attention map: no query token");
  check(residual >= 0 && residual <= 1, "attention map: the residual weight must be in [0, 1]");
  const Shape& s = attention[0].shape();
  check(s.size() == 3 && s[1] == s[2], "attention map: recorded attention must be [B, T, T], got " + shape_str(s));
  const int64_t B = s[0], T = s[1];
  check(image >= 0 && image < B, "attention map: image " + std::to_string(image) + " is not in a batch of " +
                                     std::to_string(B));
  // v = q, then v ← v · Â_l for l = L … 1: v ends as q · Â_L ⋯ Â_1 = q · R.
  std::vector<double> v(T, 0.0), next(T);
  for (int64_t t : query_tokens) {
    check(t >= 0 && t < T, "attention map: token " + std::to_string(t) + " is outside [0, " + std::to_string(T) + ")");
    v[t] += 1.0 / static_cast<double>(query_tokens.size());
  }
  std::vector<double> row(T);
  for (size_t l = attention.size(); l-- > 0;) {
    check(attention[l].shape() == s, "attention map: layers recorded different shapes");
    const float* a = attention[l].data() + image * T * T;
    std::fill(next.begin(), next.end(), 0.0);
    for (int64_t i = 0; i < T; ++i) {
      if (v[i] == 0.0) continue;
      double sum = 0;
      for (int64_t j = 0; j < T; ++j) sum += row[j] = (1.0 - residual) * a[i * T + j] + (i == j ? residual : 0.0);
      const double w = v[i] / sum;
      for (int64_t j = 0; j < T; ++j) next[j] += w * row[j];
    }
    v.swap(next);
  }
  Tensor out({T});
  for (int64_t j = 0; j < T; ++j) out[j] = static_cast<float>(v[j]);
  return out;
}

Tensor attention_rollout(const std::vector<Tensor>& attention, int64_t image, const VitConfig& c, int64_t height,
                         int64_t width, const RolloutOptions& options) {
  const int64_t T = vit_num_tokens(c, height, width);
  check(!attention.empty() && attention[0].ndim() == 3 && attention[0].dim(1) == T,
        "attention map: the recorded attention does not match a " + std::to_string(width) + "x" +
            std::to_string(height) + " input (" + std::to_string(T) + " tokens)");
  const Tensor row =
      attention_rollout_row(attention, image, rollout_query_tokens(c, height, width, options.token), options.residual);
  const int64_t gh = height / c.patch_size, gw = width / c.patch_size, prefix = c.num_prefix_tokens();
  Tensor map({gh, gw});
  std::copy(row.data() + prefix, row.data() + prefix + gh * gw, map.data());
  return map;
}

Tensor attention_map(const Model& model, const Preprocessor& pre, const cv::Mat& rgb, ModelWorkspace& ws,
                     const RolloutOptions& options) {
  check(!model.detection || model.detection->window == 0,
        model.dir + ": its DETR encoder reads the image in windows; attention rollout needs one pass over the whole image");
  const Tensor chw = pre.image(rgb);
  const Tensor x = chw.reshape({1, chw.dim(0), chw.dim(1), chw.dim(2)});
  const bool was = ws.vit.record_attention;
  ws.vit.record_attention = true;
  try {
    vit_forward(model.encoder, x, ws.vit);
  } catch (...) {
    ws.vit.record_attention = was;
    throw;
  }
  ws.vit.record_attention = was;
  Tensor map = attention_rollout(ws.vit.attention, 0, model.encoder.config, x.dim(2), x.dim(3), options);
  if (!was) ws.vit.attention.clear();  // T x T per layer: do not keep it around
  return map;
}

cv::Rect2d model_view_region(cv::Size original, const PreprocessConfig& cfg, int64_t patch_size) {
  const cv::Size resized = cfg.do_resize ? resize_output_size(original, cfg) : original;
  const cv::Rect crop = crop_window(resized, cfg);
  const double sx = static_cast<double>(original.width) / resized.width;
  const double sy = static_cast<double>(original.height) / resized.height;
  const int64_t gw = crop.width / patch_size, gh = crop.height / patch_size;
  return {crop.x * sx, crop.y * sy, static_cast<double>(gw * patch_size) * sx, static_cast<double>(gh * patch_size) * sy};
}

cv::Mat render_attention(const cv::Mat& original_bgr, const Tensor& map, const PreprocessConfig& cfg,
                         int64_t patch_size, float alpha) {
  return heatmap_overlay(original_bgr, map, alpha, model_view_region(original_bgr.size(), cfg, patch_size));
}

}  // namespace tessera
