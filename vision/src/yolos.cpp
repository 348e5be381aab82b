// YOLOS (transformers YolosForObjectDetection): the HF ViT encoder with detection tokens appended
// after the patches, position embeddings resized bicubically to every input's patch grid (inputs
// keep their aspect ratio), optional mid-layer position embeddings, and two 3-layer MLP heads on
// the detection tokens: class logits (num_labels + 1, "no object" last) and sigmoid boxes.
#include "detection_internal.hpp"

namespace tessera::detail {

MlpHead load_mlp_head(Checkpoint& ck, const std::string& base, int64_t num_layers, int64_t in,
                      int64_t hidden, int64_t out, WeightType type) {
  const WeightType edge = edge_layer_type(type);  // a head: fp32 under int8, as classifier heads
  MlpHead head;
  for (int64_t i = 0; i < num_layers; ++i) {
    const std::string l = base + "layers." + std::to_string(i) + ".";
    const int64_t fan_in = i == 0 ? in : hidden, fan_out = i + 1 == num_layers ? out : hidden;
    head.layers.push_back(pack(ck, l + "weight", l + "bias", fan_out, fan_in, true, edge));
  }
  check(!ck.has(base + "layers." + std::to_string(num_layers) + ".weight"),
        ck.file + ": " + base + " has more than " + std::to_string(num_layers) + " layers");
  return head;
}

void load_yolos(Model& m, const Config& cfg, Checkpoint& ck, WeightType type) {
  check(m.architecture == "YolosForObjectDetection",
        cfg.file + ": architecture \"" + m.architecture +
            "\" is not supported for model_type \"yolos\" (supported: YolosForObjectDetection)");
  VitConfig& c = m.encoder.config;
  c = hf_vit_config(cfg, "yolos");
  c.num_detection_tokens = cfg.positive("num_detection_tokens");
  c.pos_resample = PosResample::SizeBicubic;  // InterpolateInitialPositionEmbeddings: to the grid size
  load_hf_encoder(m.encoder, ck, "vit.", "yolos", type);
  const int64_t d = c.hidden_size;
  if (cfg.boolean("use_mid_position_embeddings", false)) {
    const int64_t n = c.num_prefix_tokens() + c.grid_height() * c.grid_width() + c.num_detection_tokens;
    const int64_t L = c.num_hidden_layers;
    Tensor mid = ck.get("vit.encoder.mid_position_embeddings", {L - 1, 1, n, d});
    for (int64_t i = 0; i + 1 < L; ++i)
      m.encoder.mid_pos_embed.push_back(mid.reshape({L - 1, n, d}).slice0(i, i + 1).reshape({n, d}));
  } else {
    check(!ck.has("vit.encoder.mid_position_embeddings"),
          ck.file + ": has vit.encoder.mid_position_embeddings but config.json has "
                    "use_mid_position_embeddings false");
  }
  auto head = std::make_shared<DetectionHead>();
  head->kind = DetectionKind::Yolos;
  head->num_slots = c.num_detection_tokens;
  // The class head's last layer fixes num_labels + 1; config.json's id2label must agree.
  const Shape& last = ck.shape("class_labels_classifier.layers.2.weight");
  check(last.size() == 2 && last[0] >= 2,
        ck.file + ": class_labels_classifier.layers.2.weight must be [num_labels + 1, " +
            std::to_string(d) + "], got " + shape_str(last));
  head->num_labels = last[0] - 1;
  if (cfg.has("id2label") && cfg.j["id2label"].is_object())
    check(static_cast<int64_t>(cfg.j["id2label"].size()) == head->num_labels,
          cfg.file + ": id2label has " + std::to_string(cfg.j["id2label"].size()) +
              " labels but class_labels_classifier gives " + std::to_string(head->num_labels));
  head->class_head = load_mlp_head(ck, "class_labels_classifier.", 3, d, d, head->num_labels + 1, type);
  head->box_head = load_mlp_head(ck, "bbox_predictor.", 3, d, d, 4, type);
  m.labels = labels_from(cfg.j, head->num_labels, cfg.file);
  read_post_process(cfg, *head);
  m.detection = std::move(head);
}

}  // namespace tessera::detail
