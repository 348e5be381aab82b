// tessera train --task detect: trains a YolosForObjectDetection or a ViT + DETR decoder head
// (vit-detr) on a COCO instances JSON (vision/include/tessera/detect_trainer.hpp) and publishes it
// as a folder that `tessera detect` and `tessera eval` load as is.
//
// --arch yolos-ti | yolos-digits | detr-digits trains from scratch (--image-size S: S x S input;
// the preset's overrides --patch-size, --hidden-size, --layers, --heads, --mlp apply; a DETR head's
// --queries, --decoder-layers, --no-aux-loss), --init DIR fine-tunes a YOLOS or vit-detr folder at
// its config's image size (or --image-size), or puts a new DETR head on a ViT / DeiT / DINOv2
// classifier's encoder. Every image is resized to that one fixed size (the processor written with the model
// says so), so every batch is one tensor.
// The data's categories must be label ids of the model (COCO category id = label id, as DETR and
// YOLOS). A run writes into --out as it goes: log.csv, curves.png and checkpoint.safetensors
// (weights, optimiser state, step: --resume continues from it bit for bit), and with --val COCO
// AP / AP50 / AP75 on that JSON after every epoch (val.csv, curves.png); at the end
// config.json, model.safetensors, preprocessor_config.json and README.md (a model card).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tessera/detect_trainer.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/metrics.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/segmenter_train.hpp"
#include "tessera/detr_train.hpp"
#include "tessera/yolos_train.hpp"
#include "mpi.hpp"
#include "train_args.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

// An --init folder's encoder learned on the pixel values its own processor made: the detector's
// fixed-size processor keeps that processor's rescale and normalisation (mean 0.5 / std 0.5 for
// the bundled digit models, not DETR's ImageNet statistics); size and resampling are the
// detector's. A folder without preprocessor_config.json keeps the detection defaults.
std::string with_init_normalisation(const std::string& processor_json, const std::string& init) {
  if (init.empty()) return processor_json;
  const fs::path p = fs::path(init) / "preprocessor_config.json";
  if (!fs::exists(p)) return processor_json;
  const nlohmann::json src = nlohmann::json::parse(read_text_file(p.string()), nullptr, false);
  check(!src.is_discarded() && src.is_object(), p.string() + ": not a JSON object");
  nlohmann::ordered_json out = nlohmann::ordered_json::parse(processor_json);
  for (const char* key : {"do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"})
    if (src.contains(key)) out[key] = src[key];
  return out.dump(2) + "\n";
}

std::string fmt(const char* format, double x) {
  char b[64];
  std::snprintf(b, sizeof b, format, x);
  return b;
}

// The model's labels as config.json's id2label gives them ("" where it has none).
std::vector<std::string> model_labels(const VitTrainModel& model) {
  const nlohmann::json cfg = nlohmann::json::parse(model.config_json);
  std::vector<std::string> labels;
  for (int64_t i = 0; i < model.num_labels; ++i) {
    const bool has = cfg.contains("id2label") && cfg["id2label"].contains(std::to_string(i));
    labels.push_back(has ? cfg["id2label"][std::to_string(i)].get<std::string>() : "");
  }
  return labels;
}

}  // namespace

namespace {

// A folder whose encoder a new DETR head can sit on: a ViT / DeiT / DINOv2 classifier, or a
// Segmenter with its own (timm-layout) ViT encoder, whose patch tokens already know what each
// pixel is.
bool has_encoder_for_detr(const std::string& model_type) {
  return model_type == "vit" || model_type == "deit" || model_type == "dinov2" || model_type == "segmenter";
}

// The encoder of a classifier folder, or of a Segmenter folder (its decoder dropped).
VitTrainModel encoder_for_detr(const std::string& dir, const std::string& model_type) {
  if (model_type != "segmenter") return load_vit_train_model(dir);
  const SegmenterTrainModel seg = load_segmenter_train_model(dir);
  check(!seg.hf_backbone, (fs::path(dir) / "config.json").string() + ": a DETR head takes a Segmenter's own ViT "
                          "encoder; this one has a Hugging Face backbone_config (give that backbone's classifier)");
  return seg.vit;
}

}  // namespace

int train_detect(const TrainArgs& a) {
  using Clock = std::chrono::steady_clock;
  check(!(a.init.empty() == a.arch.empty()),
        "train --task detect: give exactly one of --init MODEL_DIR (a YOLOS or vit-detr folder, or a ViT "
        "classifier or Segmenter for a new DETR head) and --arch PRESET");
  check((a.queries == 0 && a.decoder_layers == 0 && !a.no_aux_loss && a.encoder_window == 0) || a.arch == "detr-digits" ||
            (!a.init.empty() && has_encoder_for_detr(folder_model_type(a.init))),
        "train --task detect: --queries, --decoder-layers, --no-aux-loss and --encoder-window shape a new DETR head "
        "(--arch detr-digits, or --init a ViT, DeiT or DINOv2 classifier or a Segmenter)");
  check((a.encoder_window_stride == 0 && a.encoder_window_merge.empty()) || a.encoder_window > 0,
        "train --task detect: --encoder-window-stride and --encoder-window-merge go with --encoder-window");


  check(a.label_smoothing == 0, "train --task detect: --label-smoothing is for classification (the set loss "
                                "weights no-object by eos_coefficient instead)");
  check(!a.crops, "train --task detect: --crops is for segmentation");
  check(a.box_loss == 0 && a.boxes.empty(), "train --task detect: --box-loss and --boxes are for segmentation (the "
                                            "encoder's pre-training); the detector's own loss is the set loss");
  check(a.sub_batches == 0, "train --task detect: --sub-batches is for classification");
  check(a.decoder == "linear", "train --task detect: --decoder is for segmentation (Segmenter's decoder)");
  check(a.teacher.empty(), "train --task detect: --teacher is for classification (a DeiT with teacher)");
  check(a.rrc == 0, "train --task detect: --random-resized-crop is for classification");
  check(a.elastic == 0, "train --task detect: --elastic is for classification");
  check(a.layer_decay == 1.0 || !a.init.empty(), "train: --layer-decay is for fine-tuning (--init)");
  // Everything is read and checked before anything trains.
  const DetectionData data = load_detection_data(a.data);
  if (!a.val.empty()) load_coco_instances(a.val);  // checked before training, evaluated each epoch

  VitTrainModel model;
  int64_t height = 0, width = 0;
  const std::vector<std::string> detr_presets = detr_train_presets();
  const bool detr_arch = std::find(detr_presets.begin(), detr_presets.end(), a.arch) != detr_presets.end();
  // --init with a ViT / DeiT classifier and --arch detr-digits: a new DETR head on that encoder.
  const std::string init_type = a.init.empty() ? "" : folder_model_type(a.init);
  if (!a.init.empty() && has_encoder_for_detr(init_type)) {
    const VitTrainModel vit = encoder_for_detr(a.init, init_type);
    height = width = a.image_size > 0 ? a.image_size : 128;
    DetrHeadConfig head;
    detr_train_preset("detr-digits", height, height, &head);
    apply_detr_options(head, a);
    model = detr_from_vit(vit, head, data.labels, height, width, a.seed);
  } else if (!a.init.empty()) {
    check(init_type == "vit-detr" || init_type == "yolos",
          (fs::path(a.init) / "config.json").string() + ": --init takes a YOLOS or vit-detr folder, or a ViT, DeiT "
          "or DINOv2 classifier or a Segmenter (a new DETR head on its encoder), got model_type \"" + init_type + "\"");
    model = init_type == "vit-detr" ? load_detr_train_model(a.init) : load_yolos_train_model(a.init);
    height = a.image_size > 0 ? a.image_size : model.config.image_height;
    width = a.image_size > 0 ? a.image_size : model.config.image_width;
    if (model.detr.window > 0 && a.image_size == 0) {  // the encoder's size is the window's; the input's is the processor's
      const fs::path pp = fs::path(a.init) / "preprocessor_config.json";
      check(fs::exists(pp), pp.string() + ": missing (a windowed vit-detr folder's input size is its processor's); or "
                                          "give --image-size");
      const PreprocessConfig given = load_preprocess_config(pp.string());
      check(given.do_resize && given.resize_rule == ResizeRule::exact,
            pp.string() + ": a windowed vit-detr folder's processor resizes to a fixed size; or give --image-size");
      height = given.height, width = given.width;
    }
    const std::vector<std::string> labels = model_labels(model);
    bool same = true;  // every category of the data is the model's label of that id
    for (size_t i = 0; i < data.labels.size(); ++i)
      if (data.labels[i] != "N/A")
        same = same && static_cast<int64_t>(i) < model.num_labels && labels[i] == data.labels[i];
    if (!same) {
      std::fprintf(stderr, "note: %s's categories are not %s's labels: a new class head for %zu label ids (its box "
                           "head and encoder kept)\n", a.data.c_str(), a.init.c_str(), data.labels.size());
      replace_detection_labels(model, data.labels);
    }
  } else if (detr_arch) {
    height = width = a.image_size > 0 ? a.image_size : 128;
    DetrHeadConfig head;
    VitConfig c = detr_train_preset(a.arch, height, width, &head);
    apply_arch_options(c, a, 3);
    apply_detr_options(head, a);
    model = make_detr_train_model(c, head, data.labels, a.seed);
  } else {
    height = width = a.image_size > 0 ? a.image_size : (a.arch == "yolos-digits" ? 128 : 512);
    VitConfig c = yolos_train_preset(a.arch, height, width);
    apply_arch_options(c, a, 3);
    model = make_yolos_train_model(c, data.labels, a.seed);
  }
  check(model.detr.window == 0 || (height >= model.detr.window && width >= model.detr.window),
        "train --task detect: the input " + std::to_string(height) + "x" + std::to_string(width) +
            " is smaller than the encoder's window " + std::to_string(model.detr.window));
  check(model.detr.window == 0 || a.freeze_encoder,
        "train --task detect: a DETR head on a windowed encoder (--encoder-window, or such a vit-detr folder) trains with "
        "the encoder frozen: add --freeze-encoder");
  if (a.freeze_encoder) {
    check(model.is_detr(), "train --task detect: --freeze-encoder trains a DETR head on a frozen encoder; a YOLOS "
                           "model's detection tokens are part of its encoder");
    model.frozen_encoder = true;
  }
  // A size of one's own choosing must be a multiple of the patch; a folder's own config size is
  // taken as it is (the patch grid floors it, as the convolution does upstream, e.g. 56x88 at 16).
  const bool own_size = !a.init.empty() && a.image_size == 0 && !model.is_detr();
  check(own_size || (height % model.config.patch_size == 0 && width % model.config.patch_size == 0),
        "train: the image size " + std::to_string(height) + "x" + std::to_string(width) +
            " is not a multiple of the patch size " + std::to_string(model.config.patch_size));
  const std::string processor_json = with_init_normalisation(
      model.is_detr() ? detr_preprocessor_json(height, width) : yolos_preprocessor_json(height, width), a.init);
  const PreprocessConfig processor = parse_preprocess_config(processor_json, "the model's preprocessor_config.json");

  {
    // The published folder's post-processing (what detect, view, eval and validation use): what
    // --init's folder had, with the flags applied; its labels per query must fit the labels this
    // run trains (checked now, not when the finished folder is loaded).
    nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(model.config_json);
    if (a.labels_per_query > 0 || a.nms_iou >= 0 || a.soft_nms_sigma >= 0) {
      nlohmann::ordered_json post = cfg.contains("post_process") && cfg["post_process"].is_object()
                                        ? cfg["post_process"] : nlohmann::ordered_json::object();
      if (a.labels_per_query > 0) post["labels_per_query"] = a.labels_per_query;
      // One suppression: a positive IoU replaces a soft-NMS sigma, a positive sigma an IoU.
      if (a.nms_iou >= 0) post["nms_iou"] = a.nms_iou;
      if (a.nms_iou > 0) post.erase("soft_nms_sigma");
      if (a.soft_nms_sigma >= 0) post["soft_nms_sigma"] = a.soft_nms_sigma;
      if (a.soft_nms_sigma > 0) post.erase("nms_iou");
      cfg["post_process"] = post;
      model.config_json = cfg.dump(2) + "\n";
    }
    const auto post = cfg.find("post_process");
    if (post != cfg.end() && post->is_object() && post->contains("labels_per_query") &&
        (*post)["labels_per_query"].is_number_integer()) {
      const int64_t k = (*post)["labels_per_query"].get<int64_t>();
      check(k <= model.num_labels, (a.labels_per_query > 0 ? "train --task detect: --labels-per-query "
                                                           : a.init + "/config.json: post_process labels_per_query ") +
                                       std::to_string(k) + " is more than the " + std::to_string(model.num_labels) +
                                       " classes" + (a.labels_per_query > 0 ? "" : " of " + a.data + "; give --labels-per-query"));
    }
  }

  DetectorTrainOptions o;
  o.batch = a.batch;
  o.max_steps = a.max_steps;
  const int64_t per_epoch0 = detector_steps_per_epoch(data, o);
  check(per_epoch0 > 0, a.data + ": " + std::to_string(data.size()) + " images make no batch of " + std::to_string(a.batch));
  o.epochs = a.epochs > 0 ? a.epochs : (a.max_steps > 0 ? (a.max_steps + per_epoch0 - 1) / per_epoch0 : 1);
  o.shuffle = !a.no_shuffle;
  o.seed = a.seed;
  o.warmup_steps = a.warmup;
  o.min_lr = a.min_lr;
  o.augment.enabled = !a.no_augment;
  o.augment.hflip = a.hflip;
  o.step = train_step_options(a);
  // Data-parallel (mpirun / srun): this rank's slice of every global batch, gradients averaged.
  Communicator* comm = data_parallel_world(a);
  if (comm) o.step.comm = comm, o.shard = comm->rank(), o.shards = comm->size();
  const bool lead = !comm || comm->rank() == 0;  // rank 0 alone prints, logs, checkpoints and publishes
  const int64_t total = detector_total_steps(data, o), per_epoch = detector_steps_per_epoch(data, o);
  if (a.freeze_encoder && o.augment.enabled)
    std::fprintf(stderr, "note: --freeze-encoder with augmentation runs the frozen encoder on every augmented batch; "
                         "with --no-augment it encodes each image once and trains the head on the cached features\n");
  const bool cached = detector_caches_features(model, data, processor, o);
  if (a.freeze_encoder && !o.augment.enabled && !cached)
    std::fprintf(stderr, "note: the features of %zu images would not fit the cache (8 GiB): the frozen encoder runs "
                         "on every batch\n", data.size());

  const fs::path out(a.out);
  std::error_code ec;
  fs::create_directories(out, ec);
  check(!ec, a.out + ": cannot create (" + ec.message() + ")");
  const fs::path ckpt = out / "checkpoint.safetensors";
  const std::map<std::string, std::string> identity = {
      {"task", "detect"}, {"data", a.data}, {"batch", std::to_string(a.batch)}, {"seed", std::to_string(a.seed)},
      {"total_steps", std::to_string(total)}, {"optimizer", a.optimizer}, {"augment", a.no_augment ? "0" : "1"},
      {"freeze_encoder", a.freeze_encoder ? "1" : "0"}, {"hflip", a.hflip ? "1" : "0"},
      {"image_size", std::to_string(height) + "x" + std::to_string(width)},
      {"encoder_window", std::to_string(model.detr.window) + "/" + std::to_string(model.detr.window_stride) +
                             (model.detr.window_centre ? "/centre" : "")},
      {"precision", a.precision}};
  VitTrainState state;
  if (a.resume) {
    check(fs::exists(ckpt), ckpt.string() + ": no checkpoint to resume (run without --resume to start)");
    const auto meta = load_train_checkpoint(ckpt.string(), model, state);
    for (const auto& [k, v] : identity) {
      const std::string was = checkpoint_identity_value(meta, k);
      check(was == v, ckpt.string() + ": was written by a run with another " + k + " (" + (was.empty() ? "none" : was) +
                          ", this run: " + v + ")");
    }
    std::fprintf(stderr, "resuming %s at step %lld of %lld\n", ckpt.string().c_str(), (long long)state.step,
                 (long long)total);
  }

  if (!lead) {  // a worker rank: the same steps on its slice, nothing written
    train_detector(model, state, data, processor, o, {});
    return 0;
  }
  if (comm)
    std::printf("data-parallel: %d MPI ranks, %lld images of each batch of %lld per rank\n", comm->size(),
                (long long)(a.batch / comm->size()), (long long)a.batch);
  int64_t params = 0, boxes = 0;
  for (const TrainParam& p : model.params) params += p.numel();
  for (const DetectionTarget& t : data.targets) boxes += static_cast<int64_t>(t.labels.size());
  const VitConfig& c = model.config;
  const DetrHeadShape& dh = model.detr;
  const std::string head_text =
      model.is_detr() ? "; DETR decoder: d_model " + std::to_string(dh.d_model) + ", " + std::to_string(dh.queries) +
                            " queries, " + std::to_string(dh.layers) + " layers, " + std::to_string(dh.heads) +
                            " heads, FFN " + std::to_string(dh.ffn) + (dh.auxiliary_loss ? ", auxiliary loss" : "") +
                            (dh.window > 0 ? "; encoder on " + std::to_string(dh.window) + "x" + std::to_string(dh.window) +
                                                 " windows every " + std::to_string(dh.window_stride) + " pixels, merged" +
                                                 (dh.window_centre ? " by a centre-weighted mean" : "")
                                           : std::string())
                      : ", " + std::to_string(c.num_detection_tokens) + " detection tokens";
  std::printf("data: %s, %zu images, %lld boxes, %zu label ids\n", data.source.c_str(), data.size(), (long long)boxes,
              data.labels.size());
  std::printf("model: %s, %lldx%lld patch %lld, D=%lld, %lld layers, %lld heads, MLP %lld%s: %lld parameters\n",
              model.architecture.c_str(), (long long)height, (long long)width, (long long)c.patch_size,
              (long long)c.hidden_size, (long long)c.num_hidden_layers, (long long)c.num_attention_heads,
              (long long)c.intermediate_size, head_text.c_str(), (long long)params);
  std::printf("processor: %s\n", processor.describe().c_str());
  std::printf("run: %lld steps (%lld per epoch, batch %lld), %s lr %g, warm-up %lld, weight decay %g, clip %g, "
              "augmentation %s, %d threads\n",
              (long long)total, (long long)per_epoch, (long long)a.batch, a.optimizer.c_str(), a.lr, (long long)a.warmup,
              a.weight_decay, a.clip_grad, a.no_augment ? "off" : "on", num_threads());
  if (cached)
    std::printf("frozen encoder: each image encoded once, %.1f MiB of cached features\n",
                static_cast<double>(data.size()) * static_cast<double>((height / c.patch_size) * (width / c.patch_size) *
                                                                       c.hidden_size) * 4.0 / (1024.0 * 1024.0));
  std::fflush(stdout);

  TrainLog log(a.out, total, state.step, {"class_loss", "l1_loss", "giou_loss", "match_acc"});
  const auto t0 = Clock::now();
  CocoEvalResult last_val;
  // Validation: the model as it would be published (a temporary folder through load_model), so
  // the numbers are the ones `tessera eval` gives.
  auto validate = [&](int64_t epoch, int64_t step) {
    const fs::path dir = out / (".val-" + std::to_string(::getpid()));
    save_vit_train_model(model, dir.string(), processor_json);
    last_val = evaluate_detector(*load_model(dir.string()), a.val);
    fs::remove_all(dir, ec);
    log.validation(epoch, step, {{"AP", last_val.ap()}, {"AP50", last_val.ap50()}, {"AP75", last_val.ap75()}});
  };
  auto save_checkpoint = [&](int64_t epoch) {
    auto meta = identity;
    meta["epoch"] = std::to_string(epoch);
    save_train_checkpoint(ckpt.string(), model, state, meta);
  };
  train_detector(model, state, data, processor, o, [&](const DetectorProgress& p) {
    log.step(p.step, p.epoch + 1, p.loss, p.lr, p.grad_norm, p.batch,
             {p.class_loss, p.l1_loss, p.giou_loss,
              p.matched > 0 ? static_cast<double>(p.correct) / static_cast<double>(p.matched) : 0.0});
    const bool epoch_end = p.step % per_epoch == 0 || p.step == total;
    const bool every = a.checkpoint_every > 0 && p.step % a.checkpoint_every == 0;
    if (epoch_end && !a.val.empty()) validate(p.epoch + 1, p.step);
    if ((epoch_end || every) && p.step < total) save_checkpoint(p.epoch + 1);
  });
  log.finish();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();

  // Publish: written beside, then renamed in, file by file.
  const fs::path tmp = out / (".export-" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  save_vit_train_model(model, tmp.string(), processor_json);
  {
    // The published folder must give the trainer's outputs through the inference path: load_model
    // + the processor it wrote + model_forward, on the first images of the data (fp32 on both
    // sides: the folder holds fp32 weights, whatever --precision trained them).
    const TrainingGemmScope fp32(WeightType::F32);
    std::vector<size_t> first(static_cast<size_t>(std::min<int64_t>(4, static_cast<int64_t>(data.size()))));
    for (size_t i = 0; i < first.size(); ++i) first[i] = i;
    DetectorTrainOptions plain = o;
    plain.augment.enabled = false;
    const auto loaded = load_model(tmp.string());
    const Tensor x = detection_batch(data, first, parse_preprocess_config(read_text_file((tmp / "preprocessor_config.json").string()), "exported"),
                                     plain, 0, nullptr);
    const std::vector<float>* want_logits = &state.acts.logits;
    const std::vector<float>* want_boxes = &state.acts.boxes;
    DetrTrainActivations detr_acts;
    if (model.is_detr()) {
      detr_train_forward(model, x, detr_acts);
      want_logits = &detr_acts.heads.back().logits, want_boxes = &detr_acts.heads.back().boxes;
    } else {
      yolos_train_forward(model, x, state.acts);
    }
    ModelWorkspace ws;
    const NamedTensors got = model_forward(*loaded, x, ws);
    double diff = 0;
    const Tensor& logits = output(got, "logits");
    const Tensor& pred_boxes = output(got, "pred_boxes");
    for (int64_t i = 0; i < logits.numel(); ++i)
      diff = std::max(diff, static_cast<double>(std::abs(logits[i] - (*want_logits)[static_cast<size_t>(i)])));
    for (int64_t i = 0; i < pred_boxes.numel(); ++i)
      diff = std::max(diff, static_cast<double>(std::abs(pred_boxes[i] - (*want_boxes)[static_cast<size_t>(i)])));
    std::printf("export check: max |difference| of logits and boxes through load_model + model_forward %.2e\n", diff);
    if (!(diff < 1e-3)) {
      fs::remove_all(tmp, ec);
      fail(a.out + ": the exported folder does not reproduce the trainer's outputs (max difference " + fmt("%.3g", diff) +
           "); not publishing it (the checkpoint is kept)");
    }
  }
  std::ostringstream card;
  const double mib = static_cast<double>(fs::file_size(tmp / "model.safetensors")) / (1024.0 * 1024.0);
  card << "# " << fs::path(a.out).filename().string() << ": a " << model.architecture << " trained by Tessera\n\n"
       << "Trained by `tessera train --task detect`; "
       << (model.is_detr() ? "a Tessera vit-detr folder (Hugging Face ViT backbone and DETR decoder names and config "
                             "fields: `config.json`, `model.safetensors`, `preprocessor_config.json`) that `tessera "
                             "detect`, `view` and `eval` load as is.\n\n"
                           : "a Hugging Face folder (`config.json`, `model.safetensors`, `preprocessor_config.json`) "
                             "that Tessera and transformers load as is.\n\n")
       << "| | |\n|---|---|\n"
       << "| architecture | " << height << "x" << width << " input, ViT patch " << c.patch_size
       << ", hidden " << c.hidden_size << ", " << c.num_hidden_layers << " layers, " << c.num_attention_heads
       << " heads, MLP " << c.intermediate_size << head_text << " |\n"
       << "| parameters | " << params << " (float32, " << fmt("%.2f", mib) << " MiB) |\n"
       << "| labels | " << model.num_labels << " ids (COCO category id = label id) |\n"
       << "| pre-processing | " << processor.describe() << " |\n"
       << "| training data | " << data.source << " (" << data.size() << " images, " << boxes << " boxes) |\n"
       << "| augmentation | "
       << (a.no_augment ? std::string("none")
                        : "scale ±" + fmt("%g", 100 * o.augment.scale) + "%, shift up to " +
                              fmt("%g", 100 * o.augment.translate) + "% (boxes kept inside)" +
                              (o.augment.hflip ? ", horizontal flip" : "") + ", brightness/contrast ±" +
                              fmt("%g", 100 * o.augment.contrast) + "%")
       << " |\n"
       << "| loss | Hungarian set loss: 1·CE (no-object weight 0.1) + 5·L1 + 2·GIoU"
       << (model.is_detr() && dh.auxiliary_loss ? " on every decoder layer" : "") << " |\n"
       << (a.freeze_encoder ? "| encoder | frozen (`--freeze-encoder`): the DETR head trained alone |\n" : "")
       << "| optimisation | " << a.optimizer << ", lr " << a.lr << " (warm-up " << a.warmup << " steps, cosine), weight decay "
       << a.weight_decay << ", clip " << a.clip_grad << ", batch " << a.batch << ", " << total << " steps (" << o.epochs
       << " epochs), seed " << a.seed << " |\n"
       << (a.val.empty() ? std::string()
                         : "| **validation** | **AP " + fmt("%.4f", last_val.ap()) + "**, AP50 " + fmt("%.4f", last_val.ap50()) +
                               ", AP75 " + fmt("%.4f", last_val.ap75()) + " on " + a.val + " (COCO box mAP, as `tessera eval`) |\n")
       << "| training time | " << fmt("%.0f", seconds) << " s on " << num_threads() << " threads"
       << (a.resume ? " (this last part of a resumed run)" : "") << " |\n\n"
       << "`log.csv` holds every step, `curves.png` draws it. Evaluate with `tessera eval --model DIR --data "
          "annotations.json`.\n\nCommand:\n\n```sh\n"
       << a.command_line << "\n```\n";
  {
    std::ofstream f(tmp / "README.md", std::ios::binary);
    f << card.str();
    check(static_cast<bool>(f), (tmp / "README.md").string() + ": cannot write");
  }
  for (const char* name : {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}) {
    fs::rename(tmp / name, out / name, ec);
    check(!ec, (out / name).string() + ": cannot publish (" + ec.message() + ")");
  }
  fs::remove_all(tmp, ec);
  fs::remove(ckpt, ec);
  std::printf("wrote %s (%.0f s of training)\n", a.out.c_str(), seconds);
  return 0;
}

}  // namespace tessera::cli
