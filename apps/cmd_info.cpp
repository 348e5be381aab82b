// tessera info DIR: what a model folder holds.
#include <cstdio>

#include "commands.hpp"
#include "tessera/model.hpp"

namespace tessera::cli {

void add_info(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("info", "Describe a model folder: architecture, size, labels");
  static std::string dir;
  static bool all_labels = false;
  cmd->add_option("model", dir, "Model folder (config.json + model.safetensors)")->required();
  cmd->add_flag("--labels", all_labels, "List every label");
  cmd->callback([&action] {
    action = [] {
      auto m = load_model(dir);
      const VitConfig& c = m->encoder.config;
      std::printf("model:        %s\n", dir.c_str());
      std::printf("architecture: %s (%s)\n", m->architecture.c_str(), m->model_type.c_str());
      std::printf("parameters:   %lld (%.1f M), stored as %s\n",
                  static_cast<long long>(m->parameter_count), m->parameter_count / 1e6,
                  m->weight_dtype.c_str());
      std::printf("image size:   %lldx%lld, patch %lld, %lld layers, hidden %lld, %lld heads, mlp %lld\n",
                  (long long)c.image_height, (long long)c.image_width, (long long)c.patch_size,
                  (long long)c.num_hidden_layers, (long long)c.hidden_size,
                  (long long)c.num_attention_heads, (long long)c.intermediate_size);
      std::printf("tokens:       %lld prefix (class %s, distillation %lld, registers %lld), %lld detection\n",
                  (long long)c.num_prefix_tokens(), c.class_token ? "yes" : "no",
                  (long long)c.num_distillation_tokens, (long long)c.num_register_tokens,
                  (long long)c.num_detection_tokens);
      std::printf("GFLOPs/image: %.2f at %lldx%lld\n",
                  model_flops(*m, c.image_height, c.image_width) / 1e9, (long long)c.image_height,
                  (long long)c.image_width);
      std::printf("fp32 weights: packed-weight cache %s%s%s\n", m->weights_cache.c_str(),
                  m->weights_cache_file.empty() ? "" : ", ", m->weights_cache_file.c_str());
      std::printf("labels:       %zu", m->labels.size());
      size_t shown = all_labels ? m->labels.size() : std::min<size_t>(m->labels.size(), 5);
      for (size_t i = 0; i < shown; ++i) std::printf("%s %zu=%s", i ? "," : ":", i, m->labels[i].c_str());
      if (shown < m->labels.size()) std::printf(", ... (--labels lists all)");
      std::printf("\n");
      return 0;
    };
  });
}

}  // namespace tessera::cli
