// tessera train: trains a small ViT on OpenCV's handwritten digits and writes it as a Hugging Face
// ViTForImageClassification folder. The folder is written beside --out, then loaded back through
// the normal inference path (load_model, the folder's own processor, model_forward) and checked
// against the trainer's own forward before it replaces --out: a published folder is a verified one.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <unistd.h>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "commands.hpp"
#include "tessera/error.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/train.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

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

// Argmax of each row of logits [N, K].
std::vector<int64_t> argmax_rows(const Tensor& logits) {
  const int64_t N = logits.dim(0), K = logits.dim(1);
  std::vector<int64_t> out(N);
  for (int64_t i = 0; i < N; ++i) {
    const float* row = logits.data() + i * K;
    out[i] = std::max_element(row, row + K) - row;
  }
  return out;
}

}  // namespace

void add_train(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("train", "Train a small ViT (OpenCV's handwritten digits) into a model folder");
  static std::string data = "digits", digits_png = "/usr/share/doc/opencv-doc/examples/data/digits.png";
  static std::string out_dir, samples_dir;
  static TrainVitConfig cfg;
  static TrainOptions opt;
  static uint64_t split_seed = 0;
  static int threads = 0;
  static bool no_augment = false;
  cmd->add_option("--data", data, "Data set (only 'digits': OpenCV's digits.png, 5000 20x20 cells)")
      ->check(CLI::IsMember({"digits"}));
  cmd->add_option("--digits-png", digits_png, "Path to OpenCV's samples/data/digits.png");
  cmd->add_option("--out", out_dir, "Model folder to write (replaced if it exists)")->required();
  cmd->add_option("--epochs", opt.epochs, "Passes over the training split")->check(CLI::Range(1, 100000));
  cmd->add_option("--batch", opt.batch_size, "Minibatch size")->check(CLI::Range(1, 4096));
  cmd->add_option("--lr", opt.learning_rate, "Peak learning rate (AdamW; warmup, then cosine)");
  cmd->add_option("--weight-decay", opt.weight_decay, "AdamW weight decay (matrices only)");
  cmd->add_option("--warmup", opt.warmup_epochs, "Warmup epochs");
  cmd->add_option("--seed", opt.seed, "Seed of initialisation, shuffling and augmentation");
  cmd->add_option("--split-seed", split_seed, "Seed of the stratified 90/10 train/hold-out split");
  cmd->add_option("--image-size", cfg.image_size, "Model input size (digit cells are 20x20)");
  cmd->add_option("--patch-size", cfg.patch_size, "Patch size");
  cmd->add_option("--hidden-size", cfg.hidden_size, "Width D");
  cmd->add_option("--layers", cfg.num_hidden_layers, "Transformer blocks");
  cmd->add_option("--heads", cfg.num_attention_heads, "Attention heads");
  cmd->add_option("--mlp", cfg.intermediate_size, "MLP width (intermediate_size)");
  cmd->add_flag("--no-augment", no_augment, "Train on the cells as they are");
  cmd->add_option("--samples", samples_dir,
                  "Also write the first hold-out cell of each class, 3x enlarged, as DIR/digit_<label>.png");
  cmd->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS or all cores)");
  cmd->callback([&action] {
    action = [] {
      apply_threads(threads);
      opt.augment = !no_augment;
      cfg.num_labels = 10;
      cfg.validate();
      const std::vector<std::string> labels = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
      std::ostringstream command;
      command << "tessera train --data " << data << " --out " << out_dir << " --epochs " << opt.epochs
              << " --batch " << opt.batch_size << " --lr " << opt.learning_rate << " --weight-decay "
              << opt.weight_decay << " --warmup " << opt.warmup_epochs << " --seed " << opt.seed
              << " --split-seed " << split_seed << " --image-size " << cfg.image_size << " --patch-size "
              << cfg.patch_size << " --hidden-size " << cfg.hidden_size << " --layers " << cfg.num_hidden_layers
              << " --heads " << cfg.num_attention_heads << " --mlp " << cfg.intermediate_size
              << (no_augment ? " --no-augment" : "");

      const LabeledImages all = load_opencv_digits(digits_png);
      const auto [train, test] = split_stratified(all, 0.1, split_seed);
      const PreprocessConfig pre =
          parse_preprocess_config(hf_vit_preprocessor_json(cfg), "generated preprocessor_config.json");
      VitTrainer trainer(cfg, opt, pre);
      std::printf("data: %s, %zu training / %zu hold-out cells (stratified, split seed %llu)\n",
                  digits_png.c_str(), train.size(), test.size(), (unsigned long long)split_seed);
      std::printf("model: ViT %lldx%lld patch %lld, D=%lld, %lld layers, %lld heads, MLP %lld: %lld parameters\n",
                  (long long)cfg.image_size, (long long)cfg.image_size, (long long)cfg.patch_size,
                  (long long)cfg.hidden_size, (long long)cfg.num_hidden_layers, (long long)cfg.num_attention_heads,
                  (long long)cfg.intermediate_size, (long long)param_count(cfg));
      std::printf("processor: %s\nthreads: %d\n", pre.describe().c_str(), num_threads());
      std::fflush(stdout);

      using clock = std::chrono::steady_clock;
      const auto t0 = clock::now();
      double holdout = 0;
      for (int64_t e = 0; e < opt.epochs; ++e) {
        const auto te = clock::now();
        const EpochStats s = trainer.train_epoch(train, e);
        holdout = trainer.accuracy(test);
        std::printf("epoch %3lld/%lld  loss %.4f  train acc %.4f  hold-out acc %.4f  lr %.2e  %.1f s\n",
                    (long long)e + 1, (long long)opt.epochs, s.loss, s.accuracy, holdout, s.learning_rate,
                    std::chrono::duration<double>(clock::now() - te).count());
        std::fflush(stdout);
      }
      const double train_seconds = std::chrono::duration<double>(clock::now() - t0).count();

      // Write the folder beside --out, then verify it through the inference path.
      const fs::path out(out_dir);
      const fs::path tmp = fs::path(out.string() + ".tmp-" + std::to_string(::getpid()));
      fs::remove_all(tmp);
      fs::create_directories(tmp);
      try {
        write_hf_vit(tmp.string(), cfg, trainer.parameters(), labels);
        double loaded_accuracy = 0, max_diff = 0;
        int64_t disagree = 0;
        {
          auto model = load_model(tmp.string());
          const Preprocessor folder_pre = model_preprocessor(*model);
          const Tensor trainer_logits = trainer.logits(test.images);
          const int64_t N = static_cast<int64_t>(test.size()), K = cfg.num_labels, chunk = 250;
          Tensor logits({N, K});
          ModelWorkspace ws;
          for (int64_t lo = 0; lo < N; lo += chunk) {
            const int64_t n = std::min(chunk, N - lo);
            std::vector<Tensor> pixels(n);
            for (int64_t i = 0; i < n; ++i) {
              cv::Mat rgb;
              cv::cvtColor(test.images[lo + i], rgb, cv::COLOR_GRAY2RGB);
              pixels[i] = folder_pre.image(rgb);
            }
            Tensor x({n, pixels[0].dim(0), pixels[0].dim(1), pixels[0].dim(2)});
            for (int64_t i = 0; i < n; ++i)
              std::copy(pixels[i].data(), pixels[i].data() + pixels[i].numel(), x.data() + i * pixels[i].numel());
            const Tensor z = output(model_forward(*model, x, ws), "logits");
            std::copy(z.data(), z.data() + n * K, logits.data() + lo * K);
          }
          const auto loaded_pred = argmax_rows(logits), trainer_pred = argmax_rows(trainer_logits);
          int64_t correct = 0;
          for (int64_t i = 0; i < N; ++i) {
            correct += loaded_pred[i] == test.labels[i];
            disagree += loaded_pred[i] != trainer_pred[i];
          }
          for (int64_t i = 0; i < N * K; ++i)
            max_diff = std::max(max_diff, static_cast<double>(std::abs(logits[i] - trainer_logits[i])));
          loaded_accuracy = static_cast<double>(correct) / static_cast<double>(N);
        }
        std::printf("hold-out accuracy: trainer %.4f, through load_model + model_forward %.4f "
                    "(max |logit difference| %.2e, %lld of %zu predictions differ)\n",
                    holdout, loaded_accuracy, max_diff, (long long)disagree, test.size());
        check(max_diff < 1e-3, "the exported folder does not reproduce the trainer's logits (max difference " +
                                   fmt("%.3g", max_diff) + "); not publishing it");

        std::ostringstream card;
        const double mib = static_cast<double>(fs::file_size(tmp / "model.safetensors")) / (1024.0 * 1024.0);
        card << "# Tessera default model: handwritten digits\n\n"
             << "A small Vision Transformer trained from scratch by `tessera train` on OpenCV's handwritten "
                "digits (`samples/data/digits.png`: 5000 cells of 20x20 pixels, white digits on black, 500 per "
                "class). It is a standard Hugging Face `ViTForImageClassification` folder (`config.json`, "
                "`model.safetensors`, `preprocessor_config.json`) that Tessera, and transformers, load as is.\n\n"
             << "| | |\n|---|---|\n"
             << "| architecture | ViT, " << cfg.image_size << "x" << cfg.image_size << " input, patch "
             << cfg.patch_size << " (" << cfg.tokens() << " tokens), hidden " << cfg.hidden_size << ", "
             << cfg.num_hidden_layers << " layers, " << cfg.num_attention_heads << " heads, MLP "
             << cfg.intermediate_size << " |\n"
             << "| parameters | " << param_count(cfg) << " (float32, " << fmt("%.2f", mib) << " MiB) |\n"
             << "| labels | `0` … `9` |\n"
             << "| pre-processing | " << pre.describe() << " (gray images become RGB with R = G = B) |\n"
             << "| data | " << train.size() << " training cells, " << test.size()
             << " hold-out cells (stratified 90/10 split, split seed " << split_seed << "), never trained on |\n"
             << "| augmentation | " << (opt.augment ? "random affine (±2 px, ±12°, ±10% scale, shear), blur, contrast" : "none")
             << " |\n"
             << "| optimiser | AdamW, lr " << opt.learning_rate << " (warmup " << opt.warmup_epochs
             << " epochs, cosine), weight decay " << opt.weight_decay << ", batch " << opt.batch_size << ", "
             << opt.epochs << " epochs, seed " << opt.seed << " |\n"
             << "| **hold-out accuracy** | **" << fmt("%.2f", 100 * holdout) << "%** by the trainer; "
             << fmt("%.2f", 100 * loaded_accuracy)
             << "% through `load_model` + the folder's processor + `model_forward` (max logit difference "
             << fmt("%.1e", max_diff) << ") |\n"
             << "| training time | " << fmt("%.0f", train_seconds) << " s on " << num_threads() << " threads of "
             << cpu_name() << " |\n\n"
             << "Reproduce it (bit for bit, for any thread count) with `scripts/train-default.sh`, which runs:\n\n"
             << "```sh\n" << command.str() << "\n```\n\n"
             << "## Limits\n\n"
             << "- It knows ten classes, the digits 0–9, and nothing else: every image gets one of them. It does "
                "not know ImageNet classes, letters, or \"no digit\".\n"
             << "- It was trained on one data set: 20x20 handwritten digits, centred, white on black. Dark "
                "digits on a light background (ink on paper) must be inverted first; photos need the digit\n"
                "  cropped, roughly centred and filling most of the frame.\n"
             << "- The hold-out cells come from the same sheet as the training cells, so the accuracy above is "
                "an in-distribution number; expect less on other people's handwriting.\n";
        {
          std::ofstream f(tmp / "README.md", std::ios::binary | std::ios::trunc);
          f << card.str();
          f.close();
          check(static_cast<bool>(f), (tmp / "README.md").string() + ": cannot write");
        }
        replace_folder(tmp.string(), out.string());
      } catch (...) {
        std::error_code ec;
        fs::remove_all(tmp, ec);
        throw;
      }
      std::printf("wrote %s (%.0f s of training)\n", out.string().c_str(), train_seconds);

      if (!samples_dir.empty()) {
        fs::create_directories(samples_dir);
        for (int64_t c = 0; c < cfg.num_labels; ++c)
          for (size_t i = 0; i < test.size(); ++i)
            if (test.labels[i] == c) {
              cv::Mat big;
              cv::resize(test.images[i], big, cv::Size(), 3, 3, cv::INTER_NEAREST);
              const std::string path = (fs::path(samples_dir) / ("digit_" + std::to_string(c) + ".png")).string();
              check(cv::imwrite(path, big), path + ": cannot write");
              std::printf("wrote %s (hold-out cell)\n", path.c_str());
              break;
            }
      }
      return 0;
    };
  });
}

}  // namespace tessera::cli
