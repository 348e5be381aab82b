#pragma once
// The ViT encoder shared by every Tessera model: patch embedding, prefix tokens (class,
// distillation, registers), detection tokens appended after the patches (YOLOS), position
// embeddings (interpolated the way each upstream does it), pre-norm blocks with optional layer
// scale, final norm. Weights are data (VitWeights); vit_forward is a function over them and a
// workspace that is sized once per (batch, height, width).
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/gemm.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

// How position embeddings follow the input when its patch grid differs from the training grid.
enum class PosResample {
  None,            // fixed size only (torchvision): a different size is an error
  HfScaleBicubic,  // HF ViT/DeiT/DINOv2: bicubic, scale_factor = (grid + 0.1) / sqrt(N), only if
                   // the grid differs or is not square
  SizeBicubic,     // YOLOS: bicubic to the new grid size, always
  TimmAntialias,   // timm resample_abs_pos_embed: bicubic, antialias=True
  SizeBilinear,    // Segmenter: bilinear to the new grid size
};

// Gelu / QuickGelu: fc2(act(fc1 x)). SwiGlu (DINOv2 giant): fc1 gives [a, b] of F each,
// fc2(silu(a) * b), with intermediate_size = F.
enum class MlpActivation { Gelu, QuickGelu, SwiGlu };

struct VitConfig {
  int64_t image_height = 224, image_width = 224;  // training size (sets the position grid)
  int64_t patch_size = 16;
  int64_t num_channels = 3;
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t intermediate_size = 3072;
  float layer_norm_eps = 1e-12f;
  bool qkv_bias = true;
  // Tokens: [prefix (class, distillation, registers)] [patches] [detection tokens].
  bool class_token = true;
  int64_t num_distillation_tokens = 0;  // DeiT: 1
  int64_t num_register_tokens = 0;      // timm reg tokens (follow class/dist tokens)
  int64_t num_detection_tokens = 0;     // YOLOS (appended after the patches)
  // How many of the leading prefix tokens have a position embedding: all of them (HF, torchvision,
  // timm default) or none (timm no_embed_class). Detection tokens always have one.
  bool prefix_has_pos_embed = true;
  bool pre_norm = false;     // CLIP-style norm_pre after the position embedding
  bool layer_scale = false;  // DINOv2 / timm LayerScale (folded into the projections at load)
  bool final_norm = true;    // timm with fc_norm has no final norm
  // YOLOS use_mid_position_embeddings (the training pass reads it; inference keeps the tables in
  // VitWeights::mid_pos_embed).
  bool mid_position_embeddings = false;
  // The patch projection has a bias (timm's CLIP towers have none; the training pass reads it).
  bool patch_bias = true;
  MlpActivation activation = MlpActivation::Gelu;
  PosResample pos_resample = PosResample::HfScaleBicubic;

  int64_t grid_height() const { return image_height / patch_size; }
  int64_t grid_width() const { return image_width / patch_size; }
  int64_t num_prefix_tokens() const {
    return (class_token ? 1 : 0) + num_distillation_tokens + num_register_tokens;
  }
  int64_t head_dim() const { return hidden_size / num_attention_heads; }
};

struct VitLayer {
  Tensor norm1_weight, norm1_bias, norm2_weight, norm2_bias;
  PackedLinear qkv;        // [3D, D]: query, key, value rows stacked
  PackedLinear attn_out;   // [D, D], layer scale folded in
  PackedLinear fc1;        // [F, D] ([2F, D] for SwiGLU)
  PackedLinear fc2;        // [D, F], layer scale folded in
};

// A number no other weights object of this process has: workspaces remember which weights they
// were sized for, so one workspace can serve several models (a shape alone does not say which).
uint64_t new_weights_id();

struct VitWeights {
  uint64_t id = new_weights_id();  // copies share it (same contents)
  VitConfig config;
  PackedLinear patch_embed;  // [D, C*p*p], the convolution as one GEMM over patches
  Tensor prefix_tokens;      // [num_prefix_tokens, D]
  Tensor detection_tokens;   // [num_detection_tokens, D]
  Tensor pos_embed;          // [num_positions, D]: (prefix if it has one), grid, detection
  // YOLOS use_mid_position_embeddings: one more table per layer but the first, laid out and
  // resampled like pos_embed, added to the residual stream before layers 1 .. L-1.
  std::vector<Tensor> mid_pos_embed;  // L-1 of [num_positions, D], or empty
  Tensor pre_norm_weight, pre_norm_bias;
  std::vector<VitLayer> layers;
  Tensor final_norm_weight, final_norm_bias;
};

// Activation buffers for one (batch, height, width): allocated once, reused by every call.
struct VitWorkspace {
  uint64_t weights_id = 0;  // the VitWeights it is sized for (its position tables come from them)
  int64_t batch = -1, height = -1, width = -1;
  int64_t tokens = 0;
  Tensor patches;   // [B*Np, C*p*p]
  Tensor hidden;    // [B*T, D] the residual stream; after the forward: the last hidden state
  Tensor embedded;  // [B*Np, D] the patch embeddings, before the tokens are assembled
  Tensor qkv;       // [B*T, 3D]
  Tensor context;   // [B*T, D]
  Tensor mlp;       // [B*T, F] ([B*T, 2F] for SwiGLU)
  Tensor pos;       // [T, D] position embedding for this size
  std::vector<Tensor> mid_pos;  // [T, D] each: the mid position embeddings for this size
  // Set record_attention to also get each layer's attention probabilities, averaged over heads,
  // in attention[layer] as [B, T, T] (computed explicitly, for attention maps; slower).
  bool record_attention = false;
  std::vector<Tensor> attention;
};

int64_t vit_num_tokens(const VitConfig& config, int64_t height, int64_t width);

// Throws unless a height x width input fits the token budget (tessera::max_tokens(), see
// tessera/limits.hpp); the one-line message names `what` (a file, "--window 1000" ...), the
// size, the tokens, and the largest size of the same shape that fits.
void check_token_budget(int64_t patch_size, int64_t height, int64_t width, const std::string& what);

// Position embedding [T, D] for an input of height x width, as the upstream computes it, from
// pos_embed or from another table of the same layout (a mid position embedding).
Tensor vit_position_embedding(const VitWeights& weights, int64_t height, int64_t width);
Tensor vit_position_embedding(const VitWeights& weights, const Tensor& table, int64_t height,
                              int64_t width);

// pixel_values [B, C, H, W] → last hidden state [B, T, D] (a view of ws.hidden; valid until
// the next call with the same workspace). T = prefix + (H/p)(W/p) + detection tokens.
Tensor vit_forward(const VitWeights& weights, const Tensor& pixel_values, VitWorkspace& ws);

// FLOPs (2 per multiply-add) of one image through the encoder at height x width.
double vit_flops(const VitConfig& config, int64_t height, int64_t width);

}  // namespace tessera
