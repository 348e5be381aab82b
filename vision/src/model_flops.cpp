// FLOPs of a whole model: the encoder (vit_flops) and whichever head the model has.
#include "tessera/detection.hpp"
#include "tessera/model.hpp"
#include "tessera/segmentation.hpp"

namespace tessera {

double model_flops(const Model& m, int64_t height, int64_t width) {
  const VitConfig& c = m.encoder.config;
  if (m.segmentation) {  // the encoder sees the input zero-padded up to the patch size
    const int64_t p = c.patch_size;
    const int64_t hp = (height + p - 1) / p * p, wp = (width + p - 1) / p * p;
    return vit_flops(c, hp, wp) + segmentation_head_flops(*m.segmentation, c, height, width);
  }
  if (m.detection && m.detection->window > 0) {  // the encoder on every window
    const DetectionHead& h = *m.detection;
    const double windows = static_cast<double>(window_anchors(height, h.window, h.window_stride).size() *
                                               window_anchors(width, h.window, h.window_stride).size());
    return windows * vit_flops(c, h.window, h.window) + detection_head_flops(h, c, height, width);
  }
  if (m.detection) return vit_flops(c, height, width) + detection_head_flops(*m.detection, c, height, width);
  // Classifier / feature heads: each linear present reads one vector per image.
  double flops = vit_flops(c, height, width);
  for (const PackedLinear* l : {&m.classifier.pooler, &m.classifier.head, &m.classifier.head_dist})
    flops += 2.0 * static_cast<double>(l->in_features) * static_cast<double>(l->out_features);
  return flops;
}

}  // namespace tessera
