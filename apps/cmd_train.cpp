// tessera train: trains or fine-tunes the models the other commands run, on the training pass of
// the inference model itself (vit_train.hpp). --task classify is here; detect and segment are in
// train_detect.cpp and train_segment.cpp, on the same options (train_args.hpp).
//
// A run writes into --out as it goes: log.csv, val.csv, curves.png and checkpoint.safetensors
// (weights, optimiser state, step: --resume continues from it bit for bit). At the end the model
// folder is written beside --out, loaded back through the inference path (load_model, its own
// processor, model_forward) and checked against the trainer's forward, then moved into --out with
// a model card (README.md); the checkpoint is removed once the model is published.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "tessera/atomic_file.hpp"
#include "tessera/classify_trainer.hpp"
#include "tessera/datasets.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/vit_train.hpp"
#include "mpi.hpp"
#include "train_args.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

constexpr const char* kDefaultDigitsPng = "/usr/share/doc/opencv-doc/examples/data/digits.png";

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::string fmt(const char* format, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, x);
  return buf;
}

struct Accuracy {
  double top1 = 0, top5 = 0, loss = 0;
  int64_t n = 0;
};

// top-1 / top-5 and mean cross-entropy of the model on every sample (no augmentation), with the
// training forward in batches of 8 (it keeps every activation: small batches keep the peak memory
// near the training step's own).
Accuracy evaluate(const VitTrainModel& model, const ClassificationData& data, const PreprocessConfig& processor) {
  const TrainingGemmScope fp32(WeightType::F32);  // the model as published (fp32), whatever --precision
  Accuracy a;
  VitTrainActivations acts;
  const int64_t K = model.num_labels, chunk = 8;
  int64_t top1 = 0, top5 = 0;
  double loss = 0;
  for (size_t lo = 0; lo < data.size(); lo += chunk) {
    std::vector<size_t> idx;
    for (size_t i = lo; i < std::min(data.size(), lo + chunk); ++i) idx.push_back(i);
    std::vector<int64_t> labels;
    const Tensor x = classification_batch(data, idx, processor, &labels);
    const std::span<const float> z = vit_train_forward(model, x, acts);
    for (size_t i = 0; i < idx.size(); ++i) {
      const float* row = z.data() + i * K;
      const float target = row[labels[i]];
      int64_t above = 0;
      double mx = row[0], sum = 0;
      for (int64_t k = 0; k < K; ++k) above += row[k] > target, mx = std::max<double>(mx, row[k]);
      for (int64_t k = 0; k < K; ++k) sum += std::exp(row[k] - mx);
      loss += std::log(sum) + mx - target;
      top1 += above == 0, top5 += above < 5;
    }
  }
  a.n = static_cast<int64_t>(data.size());
  a.top1 = static_cast<double>(top1) / static_cast<double>(a.n);
  a.top5 = static_cast<double>(top5) / static_cast<double>(a.n);
  a.loss = loss / static_cast<double>(a.n);
  return a;
}

// Loads the folder through the inference path and returns the largest |logit difference| from
// the training forward over (up to) 16 samples; *agree counts equal argmaxes.
double verify_export(const VitTrainModel& trained, const std::string& dir, const ClassificationData& data,
                     int64_t* agree, int64_t* checked) {
  const TrainingGemmScope fp32(WeightType::F32);  // the folder holds fp32 weights: compare fp32 with fp32
  auto model = load_model(dir);
  const Preprocessor pre = model_preprocessor(*model);
  std::vector<size_t> idx;
  const size_t n = std::min<size_t>(16, data.size());  // spread over the data
  for (size_t i = 0; i < n; ++i) idx.push_back(i * data.size() / n);
  const Tensor x = classification_batch(data, idx, pre.config);
  VitTrainActivations acts;
  const std::span<const float> ours = vit_train_forward(trained, x, acts);
  ModelWorkspace ws;
  const Tensor z = output(model_forward(*model, x, ws), "logits");
  const int64_t K = trained.num_labels;
  check(z.numel() == static_cast<int64_t>(ours.size()), dir + ": the exported model gives logits of another shape");
  double diff = 0;
  *agree = 0, *checked = static_cast<int64_t>(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    const float* a = z.data() + i * K;
    const float* b = ours.data() + i * K;
    for (int64_t k = 0; k < K; ++k) diff = std::max(diff, static_cast<double>(std::abs(a[k] - b[k])));
    *agree += (std::max_element(a, a + K) - a) == (std::max_element(b, b + K) - b);
  }
  return diff;
}

// Moves every file of `from` into `to` (each a rename, so each appears whole), then removes `from`.
void publish_files(const fs::path& from, const fs::path& to) {
  for (const auto& e : fs::directory_iterator(from)) {
    std::error_code ec;
    fs::rename(e.path(), to / e.path().filename(), ec);
    check(!ec, (to / e.path().filename()).string() + ": cannot write (" + ec.message() + ")");
  }
  fs::remove_all(from);
}

int train_classify(const TrainArgs& a) {
  using Clock = std::chrono::steady_clock;
  const std::string digits_png = a.digits_png.empty() ? kDefaultDigitsPng : a.digits_png;
  // Everything is read and checked before anything trains.
  const ClassificationData data = load_classification_data(a.data, digits_png);
  check(data.size() > 0, a.data + ": no samples");
  ClassificationData val;
  if (!a.val.empty()) {
    val = load_classification_data(a.val, digits_png);
    check(val.classes == data.classes, a.val + ": its classes differ from " + a.data + "'s");
  }
  verify_images(data);
  if (!a.val.empty()) verify_images(val);
  check(!(a.init.empty() == a.arch.empty()), "train: give exactly one of --init MODEL_DIR (fine-tune) and --arch PRESET (from scratch)");
  check(!a.crops, "train --task classify: --crops is for segmentation");
  check(a.box_loss == 0 && a.boxes.empty(), "train --task classify: --box-loss and --boxes are for segmentation");
  check(a.labels_per_query == 0 && a.nms_iou < 0 && a.soft_nms_sigma < 0,
        "train --task classify: --labels-per-query, --nms-iou and --soft-nms-sigma are a detector's post-processing");
  check(a.queries == 0 && a.decoder_layers == 0 && !a.no_aux_loss && a.decoder == "linear" && a.encoder_window == 0 &&
            a.encoder_window_stride == 0 && a.encoder_window_merge.empty(),
        "train --task classify: --queries, --decoder-layers, --no-aux-loss, --encoder-window and --decoder shape "
        "detection and segmentation heads");
  const bool digits = a.data.rfind("digits", 0) == 0;

  VitTrainModel model;
  std::string processor_json;
  if (!a.init.empty()) {
    model = load_vit_train_model(a.init);
    const fs::path pp = fs::path(a.init) / "preprocessor_config.json";
    // timm and torchvision folders may carry no preprocessor_config.json: their pre-processing is
    // then timm's pretrained_cfg / torchvision's defaults, as load_model reads them (kept as is).
    if (model.layout == "hf" || fs::exists(pp)) processor_json = read_text_file(pp.string());
    std::vector<std::string> labels;
    const nlohmann::json cfg = nlohmann::json::parse(model.config_json);
    for (int64_t i = 0; i < model.num_labels; ++i) {
      const auto it = cfg.contains("id2label") ? cfg["id2label"].find(std::to_string(i)) : cfg.end();
      const bool named = cfg.contains("label_names") && cfg["label_names"].is_array() &&
                         i < static_cast<int64_t>(cfg["label_names"].size()) && cfg["label_names"][i].is_string();
      labels.push_back(cfg.contains("id2label") && it != cfg["id2label"].end() ? it->get<std::string>()
                       : named                                                  ? cfg["label_names"][i].get<std::string>()
                                                                                : "LABEL_" + std::to_string(i));  // as load_model names them
    }
    if (labels != data.classes) {
      std::fprintf(stderr, "note: %s's labels differ from %s's classes: a new classification head for %zu classes\n",
                   a.init.c_str(), a.data.c_str(), data.classes.size());
      replace_classifier(model, data.classes);
    }
    if (a.image_size > 0 && (a.image_size != model.config.image_height || a.image_size != model.config.image_width)) {
      // Fine-tuning at another resolution: the table resized once, the processor retargeted.
      check(a.freeze_encoder == false, "train: --image-size with --freeze-encoder would probe features the encoder "
                                       "never made at that size; fine-tune it whole, or keep its size");
      std::fprintf(stderr, "note: fine-tuning %s at %lldx%lld (trained at %lldx%lld): its position table resized once "
                           "(bicubic) and its processor's size set to it\n",
                   a.init.c_str(), (long long)a.image_size, (long long)a.image_size,
                   (long long)model.config.image_height, (long long)model.config.image_width);
      resize_position_table(model, a.image_size, a.image_size);
      processor_json = resized_processor_json(processor_json, a.image_size, (fs::path(a.init) / "preprocessor_config.json").string());
    }
  } else {
    const int64_t size = a.image_size > 0 ? a.image_size : digits ? 20 : 224;
    VitConfig c = vit_train_preset(a.arch, size);
    apply_arch_options(c, a, 4);
    model = make_vit_train_model(c, data.classes, a.seed);
    processor_json = square_vit_processor_json(size);
  }
  const PreprocessConfig processor =
      processor_json.empty() ? model_preprocessor(*load_model(a.init)).config
                             : parse_preprocess_config(processor_json, "the model's preprocessor_config.json");

  ClassifierTrainOptions o;
  o.batch = a.batch;
  o.epochs = a.epochs > 0 ? a.epochs : (a.max_steps > 0 ? 0 : 1);
  o.max_steps = a.max_steps;
  if (o.epochs == 0) o.epochs = (a.max_steps + steps_per_epoch(data, o) - 1) / std::max<int64_t>(1, steps_per_epoch(data, o));
  o.shuffle = !a.no_shuffle;
  o.seed = a.seed;
  o.warmup_steps = a.warmup;
  o.min_lr = a.min_lr;
  o.augment.enabled = !a.no_augment;
  o.augment.elastic = a.elastic;
  check(a.rrc >= 0 && a.rrc <= 1, "train: --random-resized-crop takes the smallest area fraction, in (0, 1]");
  o.augment.rrc_min_scale = a.rrc;
  o.augment.hflip = a.hflip;
  o.step = train_step_options(a);
  // Data-parallel (mpirun / srun): this rank's slice of every global batch, gradients averaged.
  Communicator* comm = data_parallel_world(a);
  if (comm) o.step.comm = comm, o.shard = comm->rank(), o.shards = comm->size();
  // --sub-batches, before anything is written: the step splits each rank's share of the batch.
  check(a.sub_batches == 0 || !a.freeze_encoder,
        "train: --sub-batches splits the whole model's step; --freeze-encoder trains the classifier alone on cached "
        "features");
  const int64_t per_rank = comm ? a.batch / comm->size() : a.batch;
  check(a.sub_batches == 0 || per_rank % a.sub_batches == 0,
        "train: --sub-batches " + std::to_string(a.sub_batches) + " does not divide the batch of " +
            std::to_string(per_rank) + (comm ? " images per rank" : ""));
  const bool lead = !comm || comm->rank() == 0;  // rank 0 alone prints, logs, checkpoints and publishes
  const int64_t total = total_steps(data, o), per_epoch = steps_per_epoch(data, o);
  std::shared_ptr<const Model> teacher;
  if (!a.teacher.empty()) {
    check(model.teacher, "train: --teacher is for a DeiT with a distillation head (DeiTForImageClassificationWithTeacher, "
                         "--init); " + model.architecture + " has none");
    teacher = load_model(a.teacher);
    check(teacher->labels == data.classes,
          a.teacher + ": the teacher's labels differ from " + a.data + "'s classes (it must be a classifier of the "
          "same classes, in the same order)");
    o.teacher = teacher.get();
  } else if (model.teacher && !a.freeze_encoder) {
    std::fprintf(stderr, "note: %s has a distillation head and no --teacher is given: the head learns the true labels\n",
                 model.architecture.c_str());
  }
  if (a.freeze_encoder && !a.no_augment)
    std::fprintf(stderr, "note: --freeze-encoder caches each image's features once, so no augmentation applies\n");
  if (a.freeze_encoder) o.augment.enabled = false;

  const fs::path out(a.out);
  std::error_code ec;
  fs::create_directories(out, ec);
  check(!ec, a.out + ": cannot create (" + ec.message() + ")");
  const fs::path ckpt = out / "checkpoint.safetensors";
  // What a checkpoint must agree on to be resumed.
  const std::map<std::string, std::string> identity = {
      {"task", "classify"}, {"data", a.data},      {"batch", std::to_string(a.batch)},
      {"seed", std::to_string(a.seed)},            {"total_steps", std::to_string(total)},
      {"optimizer", a.optimizer},                  {"augment", a.no_augment || a.freeze_encoder ? "0" : "1"},
      {"elastic", fmt("%g", a.elastic)},          {"hflip", a.hflip ? "1" : "0"},
      {"random_resized_crop", fmt("%g", a.rrc)},
      {"teacher", a.teacher},
      {"freeze_encoder", a.freeze_encoder ? "1" : "0"},
      {"precision", a.precision}};
  VitTrainState state;
  if (a.resume && !fs::exists(ckpt))
    std::fprintf(stderr, "note: %s: no checkpoint yet; starting from step 0\n", ckpt.string().c_str());
  if (a.resume && fs::exists(ckpt)) {
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
    train_classifier(model, state, data, processor, o, {});
    return 0;
  }
  int64_t params = 0;
  for (const TrainParam& p : model.params) params += p.numel();
  const VitConfig& c = model.config;
  if (comm)
    std::printf("data-parallel: %d MPI ranks, %lld images of each batch of %lld per rank\n", comm->size(),
                (long long)(a.batch / comm->size()), (long long)a.batch);
  std::printf("data: %s, %zu samples, %zu classes%s\n", data.source.c_str(), data.size(), data.classes.size(),
              a.val.empty() ? "" : (", validation: " + val.source + ", " + std::to_string(val.size()) + " samples").c_str());
  std::printf("model: %s, %lldx%lld patch %lld, D=%lld, %lld layers, %lld heads, MLP %lld: %lld parameters\n",
              model.architecture.c_str(), (long long)c.image_height, (long long)c.image_width,
              (long long)c.patch_size, (long long)c.hidden_size, (long long)c.num_hidden_layers,
              (long long)c.num_attention_heads, (long long)c.intermediate_size, (long long)params);
  std::printf("processor: %s\n", processor.describe().c_str());
  std::printf("run: %lld steps (%lld per epoch, batch %lld), %s lr %g, warm-up %lld, weight decay %g, clip %g, "
              "label smoothing %g, augmentation %s, %d threads\n",
              (long long)total, (long long)per_epoch, (long long)a.batch, a.optimizer.c_str(), a.lr,
              (long long)a.warmup, a.weight_decay, a.clip_grad, a.label_smoothing, o.augment.enabled ? "on" : "off",
              num_threads());
  std::fflush(stdout);

  TrainLog log(a.out, total, state.step, {"train_acc"});
  const auto t0 = Clock::now();
  Accuracy last_val;
  auto save_checkpoint = [&](int64_t epoch) {
    auto meta = identity;
    meta["epoch"] = std::to_string(epoch);
    save_train_checkpoint(ckpt.string(), model, state, meta);
  };
  const std::function<void(const TrainProgress&)> on_step = [&](const TrainProgress& p) {
    log.step(p.step, p.epoch + 1, p.loss, p.lr, p.grad_norm, p.batch,
             {static_cast<double>(p.correct) / static_cast<double>(p.batch)});
    const bool epoch_end = p.step % per_epoch == 0 || p.step == total;
    const bool every = a.checkpoint_every > 0 && p.step % a.checkpoint_every == 0;
    if (epoch_end && !a.val.empty()) {
      last_val = evaluate(model, val, processor);
      log.validation(p.epoch + 1, p.step, {{"top1", last_val.top1}, {"top5", last_val.top5}, {"loss", last_val.loss}});
    }
    if ((epoch_end || every) && p.step < total) save_checkpoint(p.epoch + 1);
  };
  if (a.freeze_encoder) {
    double encode_seconds = 0;
    train_linear_probe(model, state, data, processor, o, on_step, 0, &encode_seconds);
    std::printf("frozen encoder: %zu images encoded once in %.1f s (%.1f images/s)\n", data.size(), encode_seconds,
                static_cast<double>(data.size()) / std::max(encode_seconds, 1e-9));
  } else {
    train_classifier(model, state, data, processor, o, on_step);
  }
  log.finish();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();

  // Publish: the folder beside --out, verified through the inference path, then moved in.
  const fs::path tmp = out / (".export-" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  save_vit_train_model(model, tmp.string(), processor_json);
  int64_t agree = 0, checked = 0;
  const double diff = verify_export(model, tmp.string(), a.val.empty() ? data : val, &agree, &checked);
  std::printf("export check: %lld of %lld predictions agree through load_model + model_forward, max |logit difference| %.2e\n",
              (long long)agree, (long long)checked, diff);
  if (!(diff < 1e-3)) {
    fs::remove_all(tmp, ec);
    fail(a.out + ": the exported folder does not reproduce the trainer's logits (max difference " + fmt("%.3g", diff) +
         "); not publishing it (the checkpoint is kept)");
  }
  std::ostringstream card;
  const double mib = static_cast<double>(fs::file_size(tmp / "model.safetensors")) / (1024.0 * 1024.0);
  card << "# " << fs::path(a.out).filename().string() << ": a " << model.architecture << " trained by Tessera\n\n"
       << "Trained by `tessera train --task classify`; "
       << (model.layout == "timm" ? "a timm folder (`config.json` with its `pretrained_cfg`, `model.safetensors` "
                                    "under timm's names), as it was read."
           : model.layout == "torchvision"
               ? "a torchvision VisionTransformer folder (`config.json`, `model.safetensors` under torchvision's "
                 "names), as it was read."
               : "a Hugging Face folder (`config.json`, `model.safetensors`, `preprocessor_config.json`) that "
                 "Tessera and transformers load as is.")
       << "\n\n"
       << "| | |\n|---|---|\n"
       << "| architecture | " << c.image_height << "x" << c.image_width << " input, patch " << c.patch_size
       << ", hidden " << c.hidden_size << ", " << c.num_hidden_layers << " layers, " << c.num_attention_heads
       << " heads, MLP " << c.intermediate_size << " |\n"
       << "| parameters | " << params << " (float32, " << fmt("%.2f", mib) << " MiB) |\n"
       << "| labels | " << data.classes.size() << ": `" << data.classes.front() << "` … `" << data.classes.back() << "` |\n"
       << "| pre-processing | " << processor.describe() << " |\n"
       << "| training data | " << data.source << " (" << data.size() << " samples) |\n"
       << "| augmentation | "
       << (!o.augment.enabled ? std::string(a.freeze_encoder ? "none (--freeze-encoder: a linear probe on cached features)" : "none")
                        : (o.augment.rrc_min_scale > 0 ? "random resized crop (area " + fmt("%g", o.augment.rrc_min_scale) +
                                                                  "-1, aspect 3/4-4/3) instead of the affine warp; "
                                                            : std::string()) +
                          "affine (±" + fmt("%g", o.augment.rotate_degrees) + "°, ±" + fmt("%g", 100 * o.augment.scale) +
                              "% scale, shear ±" + fmt("%g", o.augment.shear) + ", ±" + fmt("%g", 100 * o.augment.translate) +
                              "% shift)" + (o.augment.hflip ? ", horizontal flip" : "") + ", brightness/contrast ±" + fmt("%g", 100 * o.augment.contrast) + "%, blur p=" +
                              fmt("%g", o.augment.blur_probability) +
                              (o.augment.elastic > 0 ? ", elastic distortion " + fmt("%g", o.augment.elastic) : ""))
       << " |\n"
       << "| optimisation | " << a.optimizer << ", lr " << a.lr << " (warm-up " << a.warmup << " steps, cosine), weight decay "
       << a.weight_decay << ", clip " << a.clip_grad << ", label smoothing " << a.label_smoothing << ", batch " << a.batch
       << ", " << total << " steps (" << o.epochs << " epochs), seed " << a.seed << " |\n";
  if (model.teacher)
    card << "| distillation | DeiT's hard distillation: ½·CE(class head, label) + ½·CE(distillation head, "
         << (a.teacher.empty() ? std::string("the true label: no teacher given") : "the argmax of the teacher " + a.teacher)
         << ") |\n";
  if (!a.val.empty())
    card << "| **validation** | **top-1 " << fmt("%.2f", 100 * last_val.top1) << "%**, top-5 " << fmt("%.2f", 100 * last_val.top5)
         << "% on " << val.source << " (" << val.size() << " samples, never trained on) |\n";
  card << "| training time | " << fmt("%.0f", seconds) << " s on " << num_threads() << " threads of " << cpu_name()
       << (a.resume ? " (this last part of a resumed run)" : "") << " |\n\n"
       << "`log.csv` holds every step, `val.csv` every validation, `curves.png` draws both.\n\n"
       << "Command:\n\n```sh\n" << a.command_line << "\n```\n";
  const std::string text = card.str();
  write_file_atomic((tmp / "README.md").string(), text.data(), text.size());
  publish_files(tmp, out);
  fs::remove(ckpt, ec);
  std::printf("wrote %s (%.0f s of training%s)\n", a.out.c_str(), seconds,
              a.val.empty() ? "" : (", validation top-1 " + fmt("%.2f", 100 * last_val.top1) + "%").c_str());
  return 0;
}

}  // namespace

void add_train(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("train", "Train or fine-tune a model (classify | detect | segment) into a model folder");
  static TrainArgs a;
  cmd->add_option("--task", a.task, "classify, detect or segment")->check(CLI::IsMember({"classify", "detect", "segment"}));
  cmd->add_option("--data", a.data,
                  "Training data. classify: an ImageFolder, or digits[:train|test] (OpenCV's digits.png); "
                  "detect: a COCO instances JSON; segment: a folder with images/ and masks/")
      ->required();
  cmd->add_option("--val", a.val, "Validation data (same kinds as --data), evaluated after every epoch");
  cmd->add_option("--out", a.out, "Model folder to write (also its log.csv, curves.png and checkpoint)")->required();
  cmd->add_option("--init", a.init, "Fine-tune this model folder");
  cmd->add_option("--teacher", a.teacher,
                  "classify, a DeiT with teacher (--init): the classifier folder whose labels its distillation head "
                  "learns (DeiT's hard distillation); without it, the true labels");
  cmd->add_option("--arch", a.arch, "Train from scratch from a preset (classify: vit-ti16, vit-s16, vit-b16, vit-digits; detect: yolos-ti, "
                  "yolos-digits, detr-digits; segment: segmenter-ti, segmenter-digits)");
  cmd->add_option("--image-size", a.image_size,
                  "Input size of an --arch model; with --init, fine-tune at this size (classify: the position "
                  "table resized once, the processor retargeted; segment --init SEGMENTER: the position table "
                  "resized, the linear decoder kept, whole images resized to it unless --crops)")->check(CLI::Range(1, 16384));
  cmd->add_option("--patch-size", a.patch_size, "Patch size of an --arch model")->check(CLI::Range(1, 1024));
  cmd->add_option("--hidden-size", a.hidden_size, "Width D of an --arch model")->check(CLI::Range(1, 65536));
  cmd->add_option("--layers", a.layers, "Transformer blocks of an --arch model")->check(CLI::Range(1, 1024));
  cmd->add_option("--heads", a.heads, "Attention heads of an --arch model")->check(CLI::Range(1, 1024));
  cmd->add_option("--mlp", a.mlp, "MLP width of an --arch model")->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--epochs", a.epochs, "Passes over the data")->check(CLI::Range(1, 1000000));
  cmd->add_option("--max-steps", a.max_steps, "Stop after this many optimiser steps")->check(CLI::Range(1, 1000000000));
  cmd->add_option("--batch", a.batch, "Batch size (the last partial batch of an epoch is dropped)")->check(CLI::Range(1, 65536));
  cmd->add_option("--optimizer", a.optimizer, "adamw or sgd")->check(CLI::IsMember({"adamw", "sgd"}));
  cmd->add_option("--lr", a.lr, "Peak learning rate (warm-up, then cosine)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--min-lr", a.min_lr, "Learning rate at the end of the cosine")->check(CLI::NonNegativeNumber);
  cmd->add_option("--weight-decay", a.weight_decay, "Weight decay (matrices only)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--momentum", a.momentum, "SGD momentum")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--warmup", a.warmup, "Linear warm-up steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--clip-grad", a.clip_grad, "Clip the global gradient norm to this (0: no clipping)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--label-smoothing", a.label_smoothing, "Label smoothing (classify)")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--sub-batches", a.sub_batches,
                  "classify: split each batch into this many equal sub-batches run side by side, their gradients "
                  "summed in order (0: automatic, 2 for small models; 1: off); the results never depend on "
                  "--threads")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--layer-decay", a.layer_decay, "Layer-wise lr decay for fine-tuning (1: off)")->check(CLI::Range(0.0, 1.0));
  cmd->add_flag("--freeze-encoder", a.freeze_encoder, "Train the head only");
  cmd->add_option("--random-resized-crop", a.rrc,
                  "classify: a random resized crop (area fraction in [S, 1], aspect 3/4 to 4/3, as torchvision's "
                  "RandomResizedCrop) instead of the affine warp, e.g. 0.08 for ImageNet-style fine-tuning; 0: off");
  cmd->add_option("--elastic", a.elastic,
                  "Classify: elastic distortion, the largest displacement as a fraction of the side (e.g. 0.1); 0: off")
      ->check(CLI::Range(0.0, 0.5));
  cmd->add_flag("--crops", a.crops,
                "segment --arch or --init with --image-size: train on --image-size crops at the images' own resolution "
                "(Segmenter's recipe); the model then segments with sliding windows of that size");
  cmd->add_option("--box-loss", a.box_loss,
                  "segment: also teach the encoder's patch tokens the box of the object they lie in (L1 through a "
                  "training-only linear head, this weight; for a DETR head trained on the frozen encoder later); 0: off")
      ->check(CLI::Range(0.0, 1000.0));
  cmd->add_option("--boxes", a.boxes, "segment --box-loss: COCO instances JSON of the images' boxes (default: DATA/annotations.json)");
  cmd->add_option("--queries", a.queries, "detect, a new DETR head: object queries")->check(CLI::Range(1, 10000));
  cmd->add_option("--decoder-layers", a.decoder_layers,
                  "A new DETR head's decoder layers (detect) or mask transformer's blocks (segment)")->check(CLI::Range(1, 64));
  cmd->add_option("--decoder", a.decoder, "segment, a new Segmenter: linear or mask_transformer")
      ->check(CLI::IsMember({"linear", "mask_transformer"}));
  cmd->add_flag("--no-aux-loss", a.no_aux_loss, "detect, a new DETR head: the set loss on the last decoder layer only");
  cmd->add_option("--encoder-window", a.encoder_window,
                  "detect, a new DETR head with --freeze-encoder: the encoder reads windows of this many pixels (its "
                  "own training size, e.g. a Segmenter's crops) over the resized input, their patch rows merged")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--encoder-window-merge", a.encoder_window_merge,
                  "detect, --encoder-window: how a patch's rows from the windows holding it merge: mean, or centre "
                  "(weighted by how central the patch lies in each window)")
      ->check(CLI::IsMember({"mean", "centre"}));
  cmd->add_option("--encoder-window-stride", a.encoder_window_stride,
                  "detect, --encoder-window: pixels between windows (default: half the window)")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--labels-per-query", a.labels_per_query,
                  "detect: the published model's post-processing gives each query's k most probable classes as k "
                  "detections (config.json post_process; validation uses it too)")
      ->check(CLI::Range(1, 10000));
  cmd->add_option("--nms-iou", a.nms_iou,
                  "detect: the published model's post-processing applies class-wise NMS above this IoU (0: none)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--soft-nms-sigma", a.soft_nms_sigma,
                  "detect: the published model's post-processing applies class-wise Gaussian soft-NMS with this "
                  "sigma instead (0: none)")
      ->check(CLI::Range(0.0, 100.0))
      ->excludes("--nms-iou");
  cmd->add_flag("--no-augment", a.no_augment, "Every image through the model's processor and nothing else");
  cmd->add_flag("--hflip", a.hflip,
                "Augmentation flips half the images horizontally (with their boxes or masks); off by default, "
                "as digits and text are not mirror-symmetric");
  cmd->add_flag("--no-shuffle", a.no_shuffle, "Batches in data order");
  cmd->add_flag("--resume", a.resume, "Continue from --out/checkpoint.safetensors (bit-identical to an uninterrupted run)");
  cmd->add_option("--checkpoint-every", a.checkpoint_every, "Steps between checkpoints (default: every epoch)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", a.seed, "Seed of initialisation, shuffling and augmentation");
  cmd->add_option("--digits-png", a.digits_png, "OpenCV's samples/data/digits.png (for --data digits)");
  cmd->add_option("--threads", a.threads, "Threads (default: TESSERA_NUM_THREADS or all cores)");
  cmd->add_option("--precision", a.precision,
                  "fp32, or bf16: the linear layers' GEMMs (forward, dX, dW) on bf16-rounded operands with fp32 "
                  "sums (vdpbf16ps on CPUs with AVX512-BF16); weights, gradients, optimizer state, attention and "
                  "everything else stay fp32")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->callback([&action, cmd] {
    // The command as given, for the model card.
    std::ostringstream line;
    line << "tessera train";
    for (const auto* opt : cmd->get_options()) {
      if (opt->count() == 0 || opt->get_name() == "--help") continue;
      line << " " << opt->get_name();
      if (opt->get_type_size() != 0)
        for (const std::string& v : opt->results()) line << " " << v;
    }
    a.command_line = line.str();
    action = [] {
      apply_threads(a.threads);
      set_training_gemm_type(a.precision == "bf16" ? WeightType::BF16 : WeightType::F32);
      if (a.precision == "bf16") {
        const std::string kernel = linear_kernel_name(WeightType::BF16), fp32 = linear_kernel_name(WeightType::F32);
        std::printf("precision: bf16 GEMMs with fp32 sums (%s kernels)\n", kernel.c_str());
        if (kernel != "avx512bf16")
          std::fprintf(stderr, "note: no bf16 dot product in use here (AVX512-BF16: %s): the %s kernels widen bf16 to "
                               "fp32, so --precision bf16 rounds the operands without being faster than fp32 (%s "
                               "kernels)%s\n",
                       cpu_features_seen().find("avx512bf16") != std::string::npos ? "capped by TESSERA_ISA"
                                                                                  : "not on this CPU",
                       kernel.c_str(), fp32.c_str(), fp32 != "avx2" && fp32 != "generic" ? ", and may be slower" : "");
      }
      check(mpi_launched_size() <= 1 || mpi_built(),
            "train: launched as " + std::to_string(mpi_launched_size()) + " MPI ranks, but this tessera was built "
            "without MPI (install libopenmpi-dev and rebuild; TESSERA_MPI is on by default): every rank would "
            "train alone and write the same files");
      if (a.task == "detect") return train_detect(a);
      if (a.task == "segment") return train_segment(a);
      return train_classify(a);
    };
  });
}

}  // namespace tessera::cli
