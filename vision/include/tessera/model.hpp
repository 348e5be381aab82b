#pragma once
// Model folders: config.json (+ model.safetensors or a sharded index, + preprocessor_config.json)
// → a Model, whose forward gives the upstream outputs under their upstream names.
//
// Families: Hugging Face ViT / DeiT / DINOv2 (ViTForImageClassification, ViTModel,
// DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTModel, Dinov2Model,
// Dinov2ForImageClassification), timm ViTs as published in Hugging Face `timm/` repos, and
// torchvision VisionTransformer state dicts.
//
// Sharing between threads: a loaded Model is immutable (load_model returns it const) and may be
// used by any number of threads at once; a ModelWorkspace (and a VitWorkspace) belongs to one
// caller at a time — give each thread its own. Preprocessor is const after construction and may
// be shared. Results do not depend on how many callers run at once (tests/test_concurrency.cpp).
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/gemm.hpp"
#include "tessera/tensor.hpp"
#include "tessera/vit.hpp"

namespace tessera {

enum class ModelFamily { HuggingFace, Timm, Torchvision, Detector, Segmenter };

struct DetectionHead;     // tessera/detection.hpp: YOLOS, DETR decoder on a ViT
struct SegmentationHead;  // tessera/segmentation.hpp: Segmenter linear / mask transformer

// How the encoder's tokens become outputs.
enum class HeadKind {
  None,               // features only (ViTModel, DeiTModel, Dinov2Model)
  ClassToken,         // classifier(h[:, 0])                      HF ViT/DeiT, torchvision
  DeitTeacher,        // (cls_classifier(h[:,0]) + distillation_classifier(h[:,1])) / 2
  Dinov2ClassMean,    // classifier([h[:,0], mean(h[:,1:])])
  Timm,               // timm forward_head: pool (token/avg), fc_norm, head (+ head_dist)
};

struct ClassifierWeights {
  HeadKind kind = HeadKind::None;
  PackedLinear head;          // [num_labels, D] (or [num_labels, 2D] for Dinov2ClassMean)
  PackedLinear head_dist;     // DeiT / timm distilled
  PackedLinear pooler;        // HF ViTModel pooler (dense + tanh) / torchvision pre_logits
  bool has_pooler = false;
  std::string timm_pool = "token";  // "token" or "avg"
  Tensor fc_norm_weight, fc_norm_bias;  // timm fc_norm (empty when absent)
  int64_t num_labels = 0;
};

struct Model {
  std::string dir;
  std::string architecture;  // e.g. "ViTForImageClassification", "timm:vit_small_patch16_224"
  std::string model_type;    // "vit", "deit", "dinov2", "timm", "torchvision"
  ModelFamily family = ModelFamily::HuggingFace;
  VitWeights encoder;
  ClassifierWeights classifier;
  std::vector<std::string> labels;  // id2label, index = class id
  int64_t parameter_count = 0;
  std::string weight_dtype;  // as stored in the checkpoint ("F32", "BF16", ...)
  std::string config_json;   // the folder's config.json text, for pre-processing and info
  // The packed-weight cache (see load_model): "hit" (weights mapped from `weights_cache_file`),
  // "written" (packed, then saved there), "off", "small" (not worth caching), or
  // "not written: <reason>".
  std::string weights_cache = "off";
  std::string weights_cache_file;
  std::shared_ptr<const DetectionHead> detection;       // set for detectors
  std::shared_ptr<const SegmentationHead> segmentation; // set for segmenters
};

// Loads a model folder. Every tensor's name, dtype and shape is checked against the config
// before use; an error names the file, the tensor, what was expected and what was found.
//
// Packed-weight cache: packing a checkpoint's weights for the kernels costs more than reading
// it, so a load of a model with 32 MB or more of checkpoint (TESSERA_CACHE_MIN_MB) saves its
// packed weights to $TESSERA_CACHE_DIR (default $XDG_CACHE_HOME/tessera, else
// ~/.cache/tessera; "off" turns the cache off), one file per model folder and weight type. A
// later load of the same folder, with the same files (path, size, modification time) and
// weight type, by the same build of Tessera, maps that file instead of packing: the
// checkpoint's header and small tensors are still read and checked, the large weights are not.
// A stale or damaged cache file is ignored and rewritten; a cache that cannot be written costs
// nothing but a warning on stderr (once per process).
std::shared_ptr<const Model> load_model(const std::string& dir,
                                        WeightType weight_type = WeightType::F32);

// Per-caller activation memory: sized at the first call for a (batch, size), reused after.
struct DetectionWorkspace;  // tessera/detection.hpp's buffers (DETR decoder)
struct ModelWorkspace {
  VitWorkspace vit;
  std::shared_ptr<DetectionWorkspace> detection;
};

// Named outputs in the order the upstream returns them (e.g. logits, last_hidden_state).
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// pixel_values [B, C, H, W] → upstream outputs (fresh tensors, owned by the caller).
NamedTensors model_forward(const Model& model, const Tensor& pixel_values, ModelWorkspace& ws);

// Looks an output up by name (Error naming what exists if missing).
const Tensor& output(const NamedTensors& outputs, const std::string& name);

}  // namespace tessera

namespace tessera {

// FLOPs (2 per multiply-add) of one image of height x width through the model's matrix products:
// the encoder (vit_flops), then the classifier / pooler linears, detection_head_flops, or
// segmentation_head_flops (to the patch-level masks: the upsampling is not counted).
double model_flops(const Model& model, int64_t height, int64_t width);

// Random-weight models of standard shapes for benchmarks (not for predictions), built as their
// loaders build them (same layers, same dtype per layer):
//   "vit-ti16", "vit-s16", "vit-b16", "vit-l16": ImageNet-1k classifiers trained (position grid)
//       at image_size x image_size;
//   "yolos-ti": hustvl/yolos-tiny (800x1333 position grid, 100 detection tokens, 91 labels);
//   "segmenter-s": Segmenter ViT-S/16 + mask transformer, ADE20K's 150 classes, 512x512 grid.
// The detector and the segmenter keep their upstream grids, resampled to any input as upstream
// does, so image_size does not apply to them.
std::shared_ptr<const Model> random_model(const std::string& arch, int64_t image_size = 224,
                                          WeightType weight_type = WeightType::F32,
                                          uint64_t seed = 1);
std::vector<std::string> random_model_archs();

}  // namespace tessera
