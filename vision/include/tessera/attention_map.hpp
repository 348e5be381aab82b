#pragma once
// Attention maps: where in the image a ViT's answer token looked, by attention rollout
// (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020).
//
// What is computed, exactly. Let A_l [T, T] be layer l's attention probabilities averaged over its
// heads (VitWorkspace::record_attention records them; each row sums to 1), for one image. The
// residual connection is accounted for by mixing in the identity and renormalising the rows:
//     Â_l = row_normalise(0.5 · A_l + 0.5 · I)
// and the rollout is the product from the first layer to the last:
//     R = Â_L · Â_{L-1} · … · Â_1            (each row of R sums to 1)
// R[i, j] is the share of token i's final representation that flows from input token j. The map
// is the row of the answer token restricted to the patch tokens and laid out on the patch grid:
//     map[r, c] = q · R[:, prefix + r · gw + c]
// where q selects the answer token (a one-hot row), or averages several (a uniform row over them):
//   - classifiers with a class token: the class token (token 0);
//   - YOLOS-style detectors: the mean over the detection tokens (rows are linear, so this is the
//     mean of their maps);
//   - models with neither (timm avg-pool without class token, a DETR decoder on a ViT whose
//     encoder has no detection tokens): the mean over the patch tokens;
//   - or any one token the caller names.
// The map is not renormalised: its entries sum to at most 1 (the rest flowed from prefix /
// detection tokens). Only the row q · R is evaluated (a vector times L matrices, from the last
// layer down), never the full T x T product.
#include <opencv2/core.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

struct RolloutOptions {
  int64_t token = -1;           // -1: automatic (see above); else this token's row (0 ≤ token < T)
  double residual = 0.5;        // weight of the identity in Â (0.5 as in the paper)
};

// Which tokens' rows are averaged, for a config at an input of height x width (with `token`).
std::vector<int64_t> rollout_query_tokens(const VitConfig& config, int64_t height, int64_t width,
                                          int64_t token = -1);

// q · R over all T tokens ([T], sums to 1), for image `image` of the recorded batch. `attention`
// is VitWorkspace::attention after a forward: one [B, T, T] per layer.
Tensor attention_rollout_row(const std::vector<Tensor>& attention, int64_t image,
                             const std::vector<int64_t>& query_tokens, double residual = 0.5);

// The rollout map [gh, gw] of image `image` of the recorded batch, for an input of height x width
// (the pixel tensor's H, W).
Tensor attention_rollout(const std::vector<Tensor>& attention, int64_t image, const VitConfig& config,
                         int64_t height, int64_t width, const RolloutOptions& options = {});

// Runs the model's encoder on one RGB image (pre-processed by `pre`) with attention recording on,
// and returns its rollout map [gh, gw].
Tensor attention_map(const Model& model, const Preprocessor& pre, const cv::Mat& rgb, ModelWorkspace& ws,
                     const RolloutOptions& options = {});

// The part of the original image (width x height) that the model saw after pre-processing
// (resize + center crop), in original pixels: the whole image unless the processor crops; it
// reaches outside the image when the crop pads. `patch_size` trims the rows/columns the patch
// grid drops (an input not a multiple of the patch size). This is where a [gh, gw] map belongs.
cv::Rect2d model_view_region(cv::Size original, const PreprocessConfig& config, int64_t patch_size);

// The map drawn over the original picture (BGR): a turbo heat map (min-max normalised) blended
// with weight `alpha` on the region the model saw; anything the crop cut off is dimmed.
cv::Mat render_attention(const cv::Mat& original_bgr, const Tensor& map, const PreprocessConfig& config,
                         int64_t patch_size, float alpha = 0.5f);

}  // namespace tessera
