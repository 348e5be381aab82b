#pragma once
// tessera train's options, shared by its three tasks (cmd_train.cpp parses them and runs
// classification; train_detect.cpp and train_segment.cpp run the other two), and the training log
// every task writes: a progress line (a bar on a TTY), DIR/log.csv and DIR/curves.png.
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "tessera/communicator.hpp"
#include "tessera/vit.hpp"
#include "tessera/detr_train.hpp"
#include "tessera/vit_train.hpp"

namespace tessera::cli {

struct TrainArgs {
  std::string task = "classify";  // classify | detect | segment
  std::string data, val, out;     // DATA and --val as the task reads them; --out: the model folder
  std::string init;               // --init MODEL_DIR: fine-tune this folder
  std::string teacher;            // --teacher MODEL_DIR: a DeiT with teacher's hard-distillation teacher
  std::string arch;               // --arch PRESET: train from scratch
  // Preset overrides (0: the preset's own value, or the data's natural size for image_size).
  int64_t image_size = 0, patch_size = 0, hidden_size = 0, layers = 0, heads = 0, mlp = 0;
  int64_t epochs = 0, max_steps = 0;  // one of them; neither: 1 epoch
  int64_t batch = 32;
  std::string optimizer = "adamw";  // adamw | sgd
  double lr = 1e-3, weight_decay = 0.05, clip_grad = 1.0, label_smoothing = 0.0;
  double momentum = 0.0;      // sgd
  double layer_decay = 1.0;   // layer-wise lr decay (fine-tuning); 1: off
  double min_lr = 0.0;        // the cosine's floor
  double elastic = 0.0;       // elastic distortion strength (classify augmentation); 0: off
  double rrc = 0.0;           // classify: random resized crop's smallest area fraction; 0: off
  int64_t warmup = 0;         // linear warm-up steps
  int64_t sub_batches = 0;    // classify: TrainStepOptions::sub_batches (0: automatic)
  bool freeze_encoder = false, no_augment = false, no_shuffle = false, resume = false, hflip = false;
  bool crops = false;  // segment --arch: train on image_size crops at the images' own resolution
  double box_loss = 0;    // segment: the patch-box loss's weight (segmenter_train.hpp); 0: off
  std::string boxes;      // segment --box-loss: the COCO JSON of the boxes (default DATA/annotations.json)
  // detect, a new DETR head (--arch detr-digits, or --init a ViT classifier): its queries and
  // decoder layers (0: the preset's), auxiliary loss on unless --no-aux-loss.
  int64_t queries = 0, decoder_layers = 0;
  bool no_aux_loss = false;
  // detect, a new DETR head: its encoder reads encoder_window-pixel windows every
  // encoder_window_stride pixels (0: window / 2); 0: the whole image in one pass.
  int64_t encoder_window = 0, encoder_window_stride = 0;
  std::string encoder_window_merge;  // "mean" (default) or "centre" (merge_windows)
  // detect: the published folder's post-processing (config.json "post_process", which validation
  // uses too): labels per query (0: keep the model's), the NMS IoU (< 0: keep; 0: no NMS) or the
  // soft-NMS sigma (< 0: keep; 0: none).
  int64_t labels_per_query = 0;
  double nms_iou = -1, soft_nms_sigma = -1;
  // segment, a new Segmenter (--arch, or --init a ViT classifier): "linear" or "mask_transformer"
  // (Segmenter's: 2 blocks of width D, D/64 heads, MLP 4D; --decoder-layers changes the blocks).
  std::string decoder = "linear";
  uint64_t seed = 0;
  int threads = 0;
  std::string precision = "fp32";  // the GEMMs' operands: fp32, or bf16 (fp32 accumulation, fp32 weights)
  int64_t checkpoint_every = 0;  // steps between checkpoints; 0: once per epoch (and at the end)
  std::string digits_png;        // digits.png for DATA "digits" (default: opencv-doc's)
  std::string command_line;      // the command as given, for the model card
};

// The file's text; an Error naming it when it cannot be read.
std::string read_text_file(const std::string& path);
// Hugging Face's ViTImageProcessor of a model trained from scratch at size x size: bilinear
// resize, x/255, mean = std = 0.5 (what google/vit-* ship).
std::string square_vit_processor_json(int64_t size);
// Data-parallel training under mpirun / srun: the MPI world (nullptr for one process) after the
// checks every task shares (no --freeze-encoder, a global --batch that splits over the ranks).
Communicator* data_parallel_world(const TrainArgs& a);

// A Hugging Face preprocessor_config.json retargeted to size x size (fine-tuning at another
// resolution): size {"height", "width"} becomes it; with a crop, crop_size becomes it and
// size.shortest_edge keeps its ratio to the crop (256/224 stays 256/224). Other rules are an Error.
std::string resized_processor_json(const std::string& json, int64_t size, const std::string& where);
// The same without the resize (do_resize false): images keep their own size (a Segmenter trained
// on crops runs sliding windows over the image as it is).
std::string keep_size_processor_json(int64_t size);
// The size options of an --arch preset (--patch-size, --hidden-size: the MLP then follows as
// mlp_ratio·D unless --mlp is given, --layers, --heads, --mlp), checked: the image a multiple of
// the patch, the width a multiple of the heads.
void apply_arch_options(VitConfig& c, const TrainArgs& a, int64_t mlp_ratio);
// config.json's model_type of a model folder ("" when it has none); an Error naming the file when
// it cannot be read or is not a JSON object.
std::string folder_model_type(const std::string& dir);
// --queries, --decoder-layers, --no-aux-loss applied to a new DETR head.
void apply_detr_options(DetrHeadConfig& head, const TrainArgs& a);
// The optimiser step the options ask for (--optimizer, --lr, --weight-decay, --momentum,
// --clip-grad, --layer-decay, --label-smoothing), the same for every task.
TrainStepOptions train_step_options(const TrainArgs& a);

// The other tasks (same options; each returns the process exit code).
int train_detect(const TrainArgs& args);
int train_segment(const TrainArgs& args);

// What one run prints and writes as it goes. Every step: a progress line on stderr (a redrawn
// bar with loss, lr, images/s and ETA on a TTY; a line every `print_every` steps otherwise) and a
// row of DIR/log.csv (step, epoch, loss, lr, grad_norm, images_per_s and the step's own extra
// columns). Each validation (and finish()) redraws DIR/curves.png: the training loss per step
// (and its running mean) and every validation metric per epoch. A resumed run appends to the log
// from its step on (rows after it, from the killed run, are dropped first).
// A resumed checkpoint's value of an identity key ("" when it has none); a checkpoint from before
// --precision existed was an fp32 run.
inline std::string checkpoint_identity_value(const std::map<std::string, std::string>& meta, const std::string& key) {
  const auto it = meta.find(key);
  if (it != meta.end()) return it->second;
  return key == "precision" ? "fp32" : "";
}

class TrainLog {
 public:
  // dir: the output folder (created); total_steps for the ETA; first_step the step a resumed run
  // starts from (0 for a fresh one).
  TrainLog(const std::string& dir, int64_t total_steps, int64_t first_step,
           std::vector<std::string> extra_columns = {});
  ~TrainLog();
  TrainLog(const TrainLog&) = delete;
  TrainLog& operator=(const TrainLog&) = delete;
  // step counts from 1; `images` the step's batch size; extra: one value per extra column.
  void step(int64_t step, int64_t epoch, double loss, double lr, double grad_norm, int64_t images,
            const std::vector<double>& extra = {});
  // A validation result after `epoch` (from 1): metric name → value, e.g. {"top1", 0.97}.
  // Printed, written to DIR/val.csv, drawn in curves.png.
  void validation(int64_t epoch, int64_t step, const std::map<std::string, double>& metrics);
  void finish();  // the last progress line ends; curves.png drawn

 private:
  struct State;
  State* s_;
};

}  // namespace tessera::cli
