// tessera classify: top-k labels for each image. A bad image is reported and skipped; the others
// still get their answer, and the exit code says that something failed.
#include <chrono>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "tessera/error.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/pipeline.hpp"

namespace tessera::cli {

void add_classify(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("classify", "Classify images: top-k labels with probabilities");
  static InputOptions in;
  static const InputOptionsHelp help{"classify", "Model folder (default: the bundled digit classifier, assets/models/digits)",
                                     "", "Images per forward pass (same-shape images share it; results do not depend on it)"};
  static std::string attention_out;
  static int64_t k = 5;
  static bool as_json = false;
  add_input_options(cmd, in, help);
  cmd->add_option("--top-k", k, "How many labels per image")->check(CLI::Range(1, 100000));
  cmd->add_flag("--json", as_json, "Print JSON instead of text (file names that are not UTF-8: see README, Reliability)");
  cmd->add_option("--attention", attention_out,
                  "Also write the attention rollout from the class token over each image to OUT.png "
                  "(several images: OUT_<index>_<stem>.png)");
  cmd->callback([&action] {
    action = [] {
      apply_input_options(in, help);
      const std::string& model_dir = in.model_dir;
      const std::string& processor = in.processor;
      const int64_t batch = in.batch;
      auto model = load_model(model_dir);
      if (model->classifier.num_labels == 0)
        fail(model_dir + ": " + model->architecture + " has no classification head (try tessera infer)");
      Preprocessor pre = processor.empty() ? model_preprocessor(*model) : Preprocessor::from_file(processor);
      pre.patch_size = model->encoder.config.patch_size;
      std::vector<std::string> paths = expand_inputs(in.inputs);
      if (paths.empty()) fail("no images found in the given inputs");
      nlohmann::json results = nlohmann::json::array();
      int failed = 0;
      ModelWorkspace ws;
      ws.vit.record_attention = !attention_out.empty();
      for (size_t start = 0; start < paths.size(); start += batch) {
        const size_t end = std::min(paths.size(), start + static_cast<size_t>(batch));
        // Decode and pre-process the batch in parallel; keep each failure with its reason.
        std::vector<Tensor> pixels(end - start);
        std::vector<std::string> errors(end - start);
        parallel_for(0, end - start, 1, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            try {
              pixels[i] = pre.load(paths[start + i]);
            } catch (const std::exception& e) {
              errors[i] = e.what();
            }
          }
        });
        // Images of one shape run together (a processor without a crop keeps aspect ratios).
        std::map<Shape, std::vector<size_t>> groups;
        for (size_t i = 0; i < pixels.size(); ++i)
          if (errors[i].empty()) groups[pixels[i].shape()].push_back(i);
        std::vector<std::vector<Prediction>> answers(pixels.size());
        std::vector<std::string> attention_paths(pixels.size());
        for (const auto& [shape, members] : groups) {
          const int64_t n = static_cast<int64_t>(members.size());
          Tensor x({n, shape[0], shape[1], shape[2]});
          for (int64_t j = 0; j < n; ++j)
            std::copy(pixels[members[j]].data(), pixels[members[j]].data() + pixels[members[j]].numel(),
                      x.data() + j * pixels[members[j]].numel());
          NamedTensors out = model_forward(*model, x, ws);
          auto top = top_k(output(out, "logits"), model->labels, k);
          for (int64_t j = 0; j < n; ++j) answers[members[j]] = top[j];
          for (int64_t j = 0; j < n && !attention_out.empty(); ++j) {
            const size_t i = start + members[j];
            const std::string att = attention_output_path(attention_out, i, paths[i], paths.size());
            try {
              write_attention_map(*model, pre.config, ws.vit.attention, j, shape[1], shape[2], paths[i], att);
              attention_paths[members[j]] = att;
            } catch (const Error& e) {
              ++failed;
              std::fprintf(stderr, "tessera: error: %s\n", e.what());
            }
          }
        }
        for (size_t i = 0; i < pixels.size(); ++i) {
          const std::string& path = paths[start + i];
          if (!errors[i].empty()) {
            ++failed;
            std::fprintf(stderr, "tessera: error: %s\n", errors[i].c_str());
            if (as_json) {
              nlohmann::json r = {{"error", errors[i]}};
              set_name(r, "image", path);
              results.push_back(r);
            }
            continue;
          }
          if (as_json) {
            nlohmann::json preds = nlohmann::json::array();
            for (const auto& p : answers[i])
              preds.push_back({{"label", p.name}, {"id", p.label}, {"probability", p.probability}});
            nlohmann::json r = {{"predictions", preds}};
            set_name(r, "image", path);
            results.push_back(r);
            if (!attention_paths[i].empty()) results.back()["attention"] = attention_paths[i];
          } else {
            std::printf("%s\n", path.c_str());
            for (const auto& p : answers[i])
              std::printf("  %7.4f  %s (%lld)\n", p.probability, p.name.c_str(), (long long)p.label);
            if (!attention_paths[i].empty()) std::printf("  attention map: %s\n", attention_paths[i].c_str());
          }
        }
        std::fflush(stdout);
      }
      if (as_json) std::printf("%s\n", dump_json(results, 2).c_str());
      if (failed) std::fprintf(stderr, "tessera: %d of %zu images failed\n", failed, paths.size());
      return failed ? 1 : 0;
    };
  });
}

}  // namespace tessera::cli
