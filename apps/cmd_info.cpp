// tessera info DIR: what a model folder holds.
#include <cstdio>

#include "commands.hpp"
#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"

namespace tessera::cli {

void add_info(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("info", "Describe a model folder: architecture, size, labels");
  static std::string dir;
  static bool all_labels = false;
  static bool cpu = false;
  cmd->add_option("model", dir, "Model folder (config.json + model.safetensors)");
  cmd->add_flag("--labels", all_labels, "List every label");
  cmd->add_flag("--cpu", cpu,
                "Print the CPU features kernel dispatch sees and the kernel each dtype's GEMM "
                "uses (no model needed)");
  cmd->callback([&action] {
    action = [] {
      if (cpu) {
        std::printf("cpu features: %s\n", cpu_features_seen().c_str());
        std::printf("kernel family: %s (CPU's widest: %s; cap with TESSERA_ISA=avx512|avx2|generic)\n",
                    isa_name(isa_family()), isa_name(cpu_isa_family()));
        std::printf("gemm kernels: fp32 %s, bf16 %s, int8 %s\n",
                    linear_kernel_name(WeightType::F32).c_str(),
                    linear_kernel_name(WeightType::BF16).c_str(),
                    linear_kernel_name(WeightType::INT8).c_str());
        if (dir.empty()) return 0;
        std::printf("\n");
      }
      if (dir.empty()) fail("info: give a model folder (or --cpu)");
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
      int64_t in_h = c.image_height, in_w = c.image_width;
      if (m->detection && m->detection->window > 0) {  // the encoder reads windows of the processor's input
        const PreprocessConfig& pc = model_preprocessor(*m).config;
        if (pc.do_resize && pc.resize_rule == ResizeRule::exact) in_h = pc.height, in_w = pc.width;
        std::printf("windows:      the encoder (above: one window) on %lldx%lld windows every %lld pixels of the "
                    "%lldx%lld input, rows merged%s\n",
                    (long long)m->detection->window, (long long)m->detection->window,
                    (long long)m->detection->window_stride, (long long)in_h, (long long)in_w,
                    m->detection->window_centre ? " by a centre-weighted mean" : "");
      }
      if (m->detection) {
        const DetectionPostProcess& post = m->detection->post;
        std::printf("post-process: %lld label%s per query, ", (long long)post.labels_per_query,
                    post.labels_per_query == 1 ? "" : "s");
        if (post.soft_nms_sigma > 0) std::printf("class-wise Gaussian soft-NMS, sigma %g\n", post.soft_nms_sigma);
        else if (post.nms_iou > 0) std::printf("class-wise NMS above IoU %g\n", post.nms_iou);
        else std::printf("no NMS\n");
      }
      std::printf("GFLOPs/image: %.2f at %lldx%lld\n", model_flops(*m, in_h, in_w) / 1e9, (long long)in_h,
                  (long long)in_w);
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
