// tessera infer: run a model on a pixel tensor or on images and write every upstream output
// (and the pixel_values it ran on) to a safetensors file. This is how conformance is checked.
#include <cstdio>

#include "commands.hpp"
#include "tessera/error.hpp"
#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/safetensors.hpp"

namespace tessera::cli {

void add_infer(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("infer", "Run a model and write its raw outputs (safetensors)");
  static std::string model_dir, inputs, processor, outputs;
  static std::vector<std::string> images;
  static int threads = 0;
  cmd->add_option("--model", model_dir, "Model folder")->required();
  cmd->add_option("--inputs", inputs, "safetensors file with pixel_values [B,3,H,W]");
  cmd->add_option("images", images, "Images (pre-processed as the model folder says)");
  cmd->add_option("--processor", processor, "preprocessor_config.json to use instead of the folder's");
  cmd->add_option("--outputs", outputs, "Where to write the outputs")->required();
  cmd->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS or all cores)");
  static int64_t max_tokens = 0;
  add_max_tokens_option(cmd, max_tokens);
  cmd->callback([&action] {
    action = [] {
      apply_threads(threads);
      apply_max_tokens(max_tokens);
      if (inputs.empty() == images.empty())
        fail("infer needs either --inputs FILE or images, not both or neither");
      auto model = load_model(model_dir);
      Tensor pixels;
      if (!inputs.empty()) {
        pixels = SafeTensors::open(inputs).get("pixel_values").clone();
        if (pixels.ndim() != 4)
          fail(inputs + ": pixel_values must be [B, C, H, W], got " + shape_str(pixels.shape()));
      } else {
        Preprocessor pre = processor.empty() ? model_preprocessor(*model) : Preprocessor::from_file(processor);
        pre.patch_size = model->encoder.config.patch_size;
        pixels = pre.batch(expand_inputs(images));
      }
      ModelWorkspace ws;
      NamedTensors out = model_forward(*model, pixels, ws);
      out.insert(out.begin(), {"pixel_values", pixels});
      save_safetensors(outputs, out, {{"format", "pt"}, {"producer", "tessera infer"}});
      for (const auto& [name, t] : out) std::printf("%s %s\n", name.c_str(), shape_str(t.shape()).c_str());
      return 0;
    };
  });
}

}  // namespace tessera::cli
