// What the three training tasks share beyond TrainLog (train_args.hpp): reading a text file, the
// processor of a square from-scratch model, and the --arch size options.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tessera/detr_train.hpp"
#include "tessera/error.hpp"
#include "mpi.hpp"
#include "train_args.hpp"

namespace tessera::cli {

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  check(static_cast<bool>(f), path + ": cannot read");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string square_vit_processor_json(int64_t size) {
  const nlohmann::ordered_json j = {
      {"image_processor_type", "ViTImageProcessor"},
      {"do_resize", true},
      {"size", {{"height", size}, {"width", size}}},
      {"resample", 2},  // PIL.Image.BILINEAR
      {"do_rescale", true},
      {"rescale_factor", 1.0 / 255.0},
      {"do_normalize", true},
      {"image_mean", {0.5, 0.5, 0.5}},
      {"image_std", {0.5, 0.5, 0.5}},
  };
  return j.dump(2) + "\n";
}

std::string keep_size_processor_json(int64_t size) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(square_vit_processor_json(size));
  j["do_resize"] = false;
  return j.dump(2) + "\n";
}

TrainStepOptions train_step_options(const TrainArgs& a) {
  check(a.optimizer == "adamw" || a.optimizer == "sgd", "--optimizer must be adamw or sgd, got " + a.optimizer);
  TrainStepOptions s;
  s.optimizer = a.optimizer == "sgd" ? Optimizer::Sgd : Optimizer::AdamW;
  s.lr = static_cast<float>(a.lr);
  s.weight_decay = static_cast<float>(a.weight_decay);
  s.momentum = static_cast<float>(a.momentum);
  s.clip_grad = static_cast<float>(a.clip_grad);
  s.layer_decay = a.layer_decay;
  s.label_smoothing = static_cast<float>(a.label_smoothing);
  s.sub_batches = a.sub_batches;
  return s;
}

std::string folder_model_type(const std::string& dir) {
  const std::string file = (std::filesystem::path(dir) / "config.json").string();
  const nlohmann::json j = nlohmann::json::parse(read_text_file(file), nullptr, false);
  check(j.is_object(), file + ": not a JSON object");
  const auto it = j.find("model_type");
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

void apply_detr_options(DetrHeadConfig& head, const TrainArgs& a) {
  if (a.queries > 0) head.queries = a.queries;
  if (a.decoder_layers > 0) head.layers = a.decoder_layers;
  if (a.no_aux_loss) head.auxiliary_loss = false;
  if (a.encoder_window > 0) {
    head.window = a.encoder_window;
    head.window_stride = a.encoder_window_stride > 0 ? a.encoder_window_stride : a.encoder_window / 2;
    head.window_centre = a.encoder_window_merge == "centre";
  }
}

void apply_arch_options(VitConfig& c, const TrainArgs& a, int64_t mlp_ratio) {
  if (a.patch_size > 0) c.patch_size = a.patch_size;
  if (a.hidden_size > 0) c.hidden_size = a.hidden_size, c.intermediate_size = mlp_ratio * a.hidden_size;
  if (a.layers > 0) c.num_hidden_layers = a.layers;
  if (a.heads > 0) c.num_attention_heads = a.heads;
  if (a.mlp > 0) c.intermediate_size = a.mlp;
  check(c.image_height % c.patch_size == 0 && c.image_width % c.patch_size == 0,
        "train: the image size " + std::to_string(c.image_height) + "x" + std::to_string(c.image_width) +
            " is not a multiple of the patch size " + std::to_string(c.patch_size));
  check(c.hidden_size % c.num_attention_heads == 0,
        "train: the hidden size " + std::to_string(c.hidden_size) + " is not a multiple of the head count " +
            std::to_string(c.num_attention_heads));
}

std::string resized_processor_json(const std::string& json, int64_t size, const std::string& where) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(json);
  const bool crop = j.value("do_center_crop", false) && j.contains("crop_size");
  if (crop) {
    const nlohmann::ordered_json& c = j["crop_size"];
    const int64_t old = c.is_object() ? c.value("height", int64_t{0}) : c.is_number() ? c.get<int64_t>() : 0;
    check(old > 0 && j.contains("size") && j["size"].is_object() && j["size"].contains("shortest_edge"),
          where + ": --image-size retargets a crop of size {\"shortest_edge\"}, crop_size {\"height\", \"width\"}");
    const int64_t edge = j["size"]["shortest_edge"].get<int64_t>();
    j["size"]["shortest_edge"] = static_cast<int64_t>(std::llround(static_cast<double>(edge) * size / old));
    j["crop_size"] = {{"height", size}, {"width", size}};
  } else {
    check(j.contains("size") && j["size"].is_object() && j["size"].contains("height") && j["size"].contains("width"),
          where + ": --image-size retargets a processor that resizes to size {\"height\", \"width\"} or crops");
    j["size"] = {{"height", size}, {"width", size}};
  }
  return j.dump(2) + "\n";
}

Communicator* data_parallel_world(const TrainArgs& a) {
  Communicator* comm = mpi_world();
  if (!comm) return nullptr;
  check(!a.freeze_encoder, "train: --freeze-encoder runs on one process (not under mpirun)");
  check(a.batch % comm->size() == 0, "train: --batch " + std::to_string(a.batch) + " is the global batch and must "
                                     "split evenly over the " + std::to_string(comm->size()) + " MPI ranks");
  return comm;
}

}  // namespace tessera::cli
