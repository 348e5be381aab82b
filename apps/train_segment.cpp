// tessera train --task segment: a Segmenter (linear decoder) trained on a folder of images/ and
// masks/, from a preset (--arch segmenter-ti | segmenter-digits) or a Segmenter folder (--init),
// written as a Segmenter folder that `tessera segment` and `tessera eval` load unchanged.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "commands.hpp"
#include "tessera/datasets.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/metrics.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/safetensors.hpp"
#include "tessera/segmentation.hpp"
#include "tessera/segmenter_train.hpp"
#include "tessera/vit_train.hpp"
#include "mpi.hpp"
#include "train_args.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

// The data's classes: "background" + annotations.json's category names by id when the folder has
// one (tessera data scenes writes it), else "0" … max label found in the masks.
std::vector<std::string> segmentation_classes(const std::string& dir, bool* named = nullptr) {
  if (named) *named = false;
  const fs::path ann = fs::path(dir) / "annotations.json";
  std::error_code ec;
  if (fs::is_regular_file(ann, ec)) {
    std::ifstream in(ann);
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    check(!j.is_discarded(), ann.string() + ": not valid JSON");
    if (j.contains("categories") && j["categories"].is_array() && !j["categories"].empty()) {
      std::map<int64_t, std::string> names;
      for (const auto& c : j["categories"]) {
        check(c.contains("id") && c["id"].is_number_integer() && c["id"].get<int64_t>() > 0 &&
                  c["id"].get<int64_t>() < 255,
              ann.string() + ": a category id must be an integer in 1..254");
        names[c["id"].get<int64_t>()] = c.contains("name") && c["name"].is_string()
                                            ? c["name"].get<std::string>()
                                            : std::to_string(c["id"].get<int64_t>());
      }
      std::vector<std::string> labels(static_cast<size_t>(names.rbegin()->first + 1));
      labels[0] = "background";
      for (size_t i = 1; i < labels.size(); ++i) labels[i] = names.count(i) ? names[i] : std::to_string(i);
      if (named) *named = true;
      return labels;
    }
  }
  int64_t top = 0;
  for (const SegmentationPair& p : load_segmentation_folder(dir)) {
    cv::Mat m = load_label_map(p.mask), wide;
    m.convertTo(wide, CV_32S);
    cv::Mat valid = wide != 255;
    double lo = 0, hi = 0;
    if (cv::countNonZero(valid)) cv::minMaxLoc(wide, &lo, &hi, nullptr, nullptr, valid);
    top = std::max(top, static_cast<int64_t>(hi));
  }
  std::vector<std::string> labels;
  for (int64_t i = 0; i <= std::max<int64_t>(top, 1); ++i) labels.push_back(std::to_string(i));
  return labels;
}

// --init: a Segmenter folder (fine-tuned as it is) or a ViT / DeiT classifier (its encoder).
bool segmenter_init_is_vit(const std::string& dir) {
  const std::string file = (fs::path(dir) / "config.json").string();
  const std::string type = folder_model_type(dir);
  check(type == "segmenter" || type == "vit" || type == "deit",
        file + ": --init takes a Segmenter folder or a ViT / DeiT classifier, got model_type \"" + type + "\"");
  return type != "segmenter";
}

// mIoU of the folder `dir` as `tessera eval` computes it, on the model saved in `model_dir`.
double validation_miou(const std::string& model_dir, const std::vector<SegmentationPair>& pairs) {
  const auto model = load_model(model_dir);
  SegmentationConfusion confusion(model->segmentation->num_classes);
  const Preprocessor pre = model_preprocessor(*model);
  ModelWorkspace ws;
  for (const SegmentationPair& pair : pairs) {
    const cv::Mat rgb = load_image_rgb(pair.image);
    const cv::Mat truth = load_label_map(pair.mask);
    confusion.add(truth, segment_pixels(*model, pre.image(rgb), rgb.rows, rgb.cols, ws), pair.mask);
  }
  return confusion.mean_iou();
}

}  // namespace

int train_segment(const TrainArgs& args) {
  apply_threads(args.threads);
  check(!args.data.empty(), "train --task segment: --data FOLDER (images/ and masks/) is required");
  check(!args.out.empty(), "train --task segment: --out DIR is required");
  check(args.init.empty() != args.arch.empty(),
        "train --task segment: give one of --init MODEL_DIR (a Segmenter folder) or --arch PRESET");
  check(args.label_smoothing == 0, "train --task segment: --label-smoothing is not supported for segmentation");
  check(args.teacher.empty(), "train --task segment: --teacher is for classification (a DeiT with teacher)");
  check(args.sub_batches == 0, "train --task segment: --sub-batches is for classification");
  check(args.rrc == 0, "train --task segment: --random-resized-crop is for classification");
  check(args.elastic == 0, "train --task segment: --elastic is for classification");
  check(args.box_loss > 0 || args.boxes.empty(), "train --task segment: --boxes is the data of --box-loss");
  check(args.box_loss == 0 || !args.freeze_encoder,
        "train --task segment: --box-loss trains the encoder's patch tokens; it cannot be frozen (--freeze-encoder)");
  SegmenterTrainModel model;
  std::string processor_json;
  const bool init_vit = !args.init.empty() && segmenter_init_is_vit(args.init);
  check((args.decoder == "linear" && args.decoder_layers == 0) || args.init.empty() || init_vit,
        "train --task segment: --decoder and --decoder-layers shape a new Segmenter (--arch, or --init a ViT "
        "classifier); a Segmenter folder keeps its decoder");
  check(args.labels_per_query == 0 && args.nms_iou < 0 && args.soft_nms_sigma < 0,
        "train --task segment: --labels-per-query, --nms-iou and --soft-nms-sigma are a detector's post-processing");
  check(args.queries == 0 && !args.no_aux_loss && args.encoder_window == 0 && args.encoder_window_stride == 0 &&
            args.encoder_window_merge.empty(),
        "train --task segment: --queries, --no-aux-loss and --encoder-window are for a DETR head");
  // The mask transformer as Segmenter's factory makes it for an encoder of width D.
  auto mask_shape = [&](int64_t d) {
    MaskDecoderShape s;
    if (args.decoder != "mask_transformer") {
      check(args.decoder_layers == 0, "train --task segment: --decoder-layers is for --decoder mask_transformer");
      return s;
    }
    s.layers = args.decoder_layers > 0 ? args.decoder_layers : 2;
    s.d_model = d, s.heads = std::max<int64_t>(1, d / 64), s.d_ff = 4 * d;
    if (d % s.heads != 0) s.heads = 1;
    return s;
  };
  if (init_vit) {
    // Segmenter's recipe: the encoder of a pre-trained ViT classifier, a new decoder.
    const VitTrainModel vit = load_vit_train_model(args.init);
    const int64_t size = args.image_size > 0 ? args.image_size : vit.config.image_height;
    model = segmenter_from_vit(vit, size, segmentation_classes(args.data), args.crops ? size : 0,
                               mask_shape(vit.config.hidden_size));
    processor_json = args.crops ? keep_size_processor_json(size) : square_vit_processor_json(size);
    std::fprintf(stderr, "train segment: the encoder starts from %s (%s), its classifier dropped\n",
                 args.init.c_str(), vit.architecture.c_str());
  } else if (!args.init.empty()) {
    check(!args.crops || args.image_size > 0,
          "train --task segment: --crops with a Segmenter folder needs --image-size (the new window); without "
          "--image-size the folder keeps the way it was trained (its config.json's \"inference\" window)");
    model = load_segmenter_train_model(args.init);
    if (args.image_size > 0) {
      // The same Segmenter at another input: its encoder as a classifier's (the position table
      // resampled to the new grid, as segmenter_from_vit does) and its linear decoder kept, run on
      // the whole image resized to the new size (or, with --crops, on windows of it).
      const std::string config_file = (fs::path(args.init) / "config.json").string();
      check(!model.hf_backbone && model.mask.layers == 0,
            config_file + ": --image-size re-sizes a Segmenter with its own encoder and the linear decoder");
      SegmenterTrainModel sized = segmenter_from_vit(model.vit, args.image_size, model.labels,
                                                     args.crops ? args.image_size : 0);
      for (const TrainParam& p : sized.vit.params) {
        if (p.name.rfind(sized.vit.base, 0) == 0) continue;  // the encoder: segmenter_from_vit's
        const auto src = model.vit.view(std::span<const float>(model.vit.weights), p.name);
        const auto dst = sized.vit.view(std::span<float>(sized.vit.weights), p.name);
        check(src.size() == dst.size(), config_file + ": " + p.name + " has another size");
        std::copy(src.begin(), src.end(), dst.begin());
      }
      std::fprintf(stderr, "train segment: %s re-sized from %lldx%lld to %lldx%lld (%s)\n", args.init.c_str(),
                   (long long)model.vit.config.image_height, (long long)model.vit.config.image_width,
                   (long long)args.image_size, (long long)args.image_size,
                   args.crops ? "crops at the images' own resolution" : "whole images resized");
      model = std::move(sized);
      processor_json = args.crops ? keep_size_processor_json(args.image_size) : square_vit_processor_json(args.image_size);
    }
    // Other classes than the folder's: named categories that differ, or labels beyond its classes.
    bool named = false;
    const std::vector<std::string> classes = segmentation_classes(args.data, &named);
    if ((named && classes != model.labels) || static_cast<int64_t>(classes.size()) > model.num_classes) {
      std::fprintf(stderr, "note: %s's classes are not %s's: a new class head for %zu classes (the rest kept)\n",
                   args.data.c_str(), args.init.c_str(), classes.size());
      replace_segmentation_classes(model, classes, args.seed);
    }
    const fs::path pre = fs::path(args.init) / "preprocessor_config.json";
    if (processor_json.empty())
      processor_json = fs::exists(pre) ? read_text_file(pre.string())
                                       : square_vit_processor_json(model.vit.config.image_height);
  } else {
    int64_t size = args.image_size > 0 ? args.image_size : args.arch == "segmenter-ti" ? 512 : 128;
    VitConfig c = segmenter_train_preset(args.arch, size);
    apply_arch_options(c, args, 4);
    model = make_segmenter_train_model(c, segmentation_classes(args.data), args.seed, args.crops ? size : 0,
                                       mask_shape(c.hidden_size));
    processor_json = args.crops ? keep_size_processor_json(size) : square_vit_processor_json(size);
  }
  model.vit.frozen_encoder = args.freeze_encoder;  // the decoder (and the linear head) only
  // Every label must be a class of the model (or 255): checked for every pair before training.
  std::vector<SegmentationPair> data = load_segmentation_folder(args.data, model.num_classes);
  if (args.box_loss > 0) {
    const std::string boxes = args.boxes.empty() ? (fs::path(args.data) / "annotations.json").string() : args.boxes;
    attach_segmentation_boxes(data, boxes);
    size_t n = 0;
    for (const SegmentationPair& p : data) n += p.boxes.size();
    check(n > 0, boxes + ": no boxes for the images of " + args.data + " (--box-loss needs them)");
    std::fprintf(stderr, "patch-box loss (weight %g): %zu boxes from %s\n", args.box_loss, n, boxes.c_str());
  }
  const PreprocessConfig processor = parse_preprocess_config(processor_json, args.out + "/preprocessor_config.json");
  std::vector<SegmentationPair> val;
  if (!args.val.empty()) val = load_segmentation_folder(args.val, model.num_classes);

  SegmenterTrainOptions o;
  o.epochs = args.epochs > 0 ? args.epochs : args.max_steps > 0 ? 0 : 1;
  o.max_steps = args.max_steps;
  o.batch = args.batch;
  o.shuffle = !args.no_shuffle;
  o.augment = !args.no_augment;
  o.hflip = args.hflip;
  o.seed = args.seed;
  o.warmup_steps = args.warmup;
  o.min_lr = args.min_lr;
  o.step = train_step_options(args);  // --label-smoothing is refused above
  o.box_loss = args.box_loss;
  // Data-parallel (mpirun / srun): this rank's slice of every global batch, gradients averaged.
  Communicator* comm = data_parallel_world(args);
  if (comm) o.step.comm = comm, o.shard = comm->rank(), o.shards = comm->size();
  const bool lead = !comm || comm->rank() == 0;  // rank 0 alone logs, checkpoints and publishes
  const int64_t total = segmenter_total_steps(data.size(), o);
  const int64_t per_epoch = static_cast<int64_t>(data.size()) / o.batch;
  if (args.freeze_encoder && o.augment)
    std::fprintf(stderr, "note: --freeze-encoder with augmentation runs the frozen encoder on every augmented batch; "
                         "with --no-augment it encodes each image once and trains the decoder on the cached features\n");
  if (segmenter_caches_features(model, data.size(), o)) {
    const VitConfig& vc = model.vit.config;
    std::fprintf(stderr, "frozen encoder: each image encoded once, %.1f MiB of cached features\n",
                 static_cast<double>(data.size()) *
                     static_cast<double>((vc.image_height / vc.patch_size) * (vc.image_width / vc.patch_size) *
                                         vc.hidden_size) * 4.0 / (1024.0 * 1024.0));
  } else if (args.freeze_encoder && !o.augment) {
    std::fprintf(stderr, "note: the features of %zu images would not fit the cache (8 GiB): the frozen encoder runs "
                         "on every batch\n", data.size());
  }

  std::error_code ec;
  fs::create_directories(args.out, ec);
  check(!ec, args.out + ": cannot create (" + ec.message() + ")");
  const std::string checkpoint = (fs::path(args.out) / "checkpoint.safetensors").string();
  SegmenterTrainState state;
  // The patch-box head (--box-loss) is training-only but has weights and optimiser moments of its
  // own: they go into the checkpoint beside the model's, so --resume continues it too.
  PatchBoxHead& box = state.box;
  const CheckpointExtras box_tensors = args.box_loss > 0
      ? CheckpointExtras{{"box_head.params", &box.params}, {"box_head.m", &box.m}, {"box_head.v", &box.v}}
      : CheckpointExtras{};
  const std::string box_meta = args.box_loss > 0 ? std::to_string(args.box_loss) : "0";
  if (args.resume && fs::exists(checkpoint)) {
    const SafeTensors peek = SafeTensors::open(checkpoint);
    std::map<std::string, std::string> prior = peek.metadata();
    check(prior.count("box_loss") ? prior["box_loss"] == box_meta : box_meta == "0",
          checkpoint + ": written by a run with another --box-loss; --resume continues the same run");
    std::map<std::string, std::string> meta = load_train_checkpoint(checkpoint, model.vit, state.opt, box_tensors);
    check(meta["seed"] == std::to_string(args.seed) && meta["total"] == std::to_string(total) &&
              meta["freeze_encoder"] == (args.freeze_encoder ? "1" : "0") &&
              checkpoint_identity_value(meta, "precision") == args.precision,
          checkpoint + ": written by a run of another seed, length, --freeze-encoder or --precision; --resume "
                       "continues the same run");
    if (args.box_loss > 0) {
      const VitConfig& vc = model.vit.config;
      check(box.params.size() == static_cast<size_t>(4 * vc.hidden_size + 4) && box.m.size() == box.params.size() &&
                box.v.size() == box.params.size(),
            checkpoint + ": its box_head tensors do not fit this model's width");
      box.dim = vc.hidden_size;
      box.grads.assign(box.params.size(), 0.0f);
    }
    std::fprintf(stderr, "resuming %s at step %lld of %lld\n", checkpoint.c_str(),
                 static_cast<long long>(state.opt.step), static_cast<long long>(total));
  }
  if (!lead) {  // a worker rank: the same steps on its slice, nothing written
    train_segmenter(model, state, data, processor, o);
    return 0;
  }
  if (comm)
    std::fprintf(stderr, "data-parallel: %d MPI ranks, %lld images of each batch of %lld per rank\n", comm->size(),
                 static_cast<long long>(args.batch / comm->size()), static_cast<long long>(args.batch));
  const int64_t every = args.checkpoint_every > 0 ? args.checkpoint_every : per_epoch;
  auto save_checkpoint = [&] {
    if (args.box_loss > 0 && box.m.size() != box.params.size())  // no step yet: fresh moments
      box.m.assign(box.params.size(), 0.0f), box.v.assign(box.params.size(), 0.0f);
    save_train_checkpoint(checkpoint, model.vit, state.opt,
                          {{"seed", std::to_string(args.seed)}, {"total", std::to_string(total)},
                           {"task", "segment"}, {"freeze_encoder", args.freeze_encoder ? "1" : "0"},
                           {"box_loss", box_meta}, {"precision", args.precision}},
                          box_tensors);
  };

  std::fprintf(stderr,
               "train segment: %zu images, %lld classes, %lldx%lld %s, patch %lld, D %lld, %lld layers, "
               "%lld steps of %lld\n",
               data.size(), static_cast<long long>(model.num_classes),
               static_cast<long long>(model.vit.config.image_height),
               static_cast<long long>(model.vit.config.image_width),
               model.window_size > 0 ? "crops at the images' own resolution" : "input (images resized)",
               static_cast<long long>(model.vit.config.patch_size),
               static_cast<long long>(model.vit.config.hidden_size),
               static_cast<long long>(model.vit.config.num_hidden_layers), static_cast<long long>(total),
               static_cast<long long>(o.batch));
  TrainLog log(args.out, total, state.opt.step,
               args.box_loss > 0 ? std::vector<std::string>{"pixel_accuracy", "box_l1"} : std::vector<std::string>{"pixel_accuracy"});
  train_segmenter(model, state, data, processor, o, [&](const SegmenterProgress& p) {
    log.step(p.step, p.epoch, p.loss, p.lr, p.grad_norm, p.batch,
             args.box_loss > 0 ? std::vector<double>{p.pixel_accuracy, p.box_loss} : std::vector<double>{p.pixel_accuracy});
    const bool epoch_end = p.step % per_epoch == 0;
    if (p.step % every == 0 || p.step == total) save_checkpoint();
    if (epoch_end && !val.empty()) {
      save_segmenter_train_model(model, args.out, processor_json);
      log.validation(p.step / per_epoch, p.step, {{"mIoU", validation_miou(args.out, val)}});
    }
  });
  save_segmenter_train_model(model, args.out, processor_json);
  log.finish();
  fs::remove(checkpoint, ec);  // the run is complete: the folder is the model
  std::fprintf(stderr, "wrote %s\n", args.out.c_str());
  return 0;
}

}  // namespace tessera::cli
