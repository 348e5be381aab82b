#pragma once
// Each subcommand lives in its own file and registers itself on the CLI here.
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "tessera/model.hpp"
#include "tessera/preprocess.hpp"

namespace tessera::cli {

// A subcommand's action returns the process exit code.
using Action = std::function<int()>;

void add_classify(CLI::App& app, Action& action);
void add_infer(CLI::App& app, Action& action);
void add_info(CLI::App& app, Action& action);
void add_bench(CLI::App& app, Action& action);
void add_view(CLI::App& app, Action& action);
void add_segment(CLI::App& app, Action& action);
void add_detect(CLI::App& app, Action& action);
void add_train(CLI::App& app, Action& action);
void add_data(CLI::App& app, Action& action);
void add_eval(CLI::App& app, Action& action);
void add_features(CLI::App& app, Action& action);

// Expands IMAGE arguments: files as given, folders to their images (recursively, sorted), and
// @list.txt to the paths it lists (one per line, relative to the list's folder). Missing paths
// are kept, so that they are reported per image rather than aborting the batch.
std::vector<std::string> expand_inputs(const std::vector<std::string>& args);

// --attention OUT.png: OUT itself for a single image, else OUT's stem + "_<index>_<image stem>"
// + OUT's extension, beside OUT (e.g. att.png → att_0_cat.png, att_1_dog.png).
std::string attention_output_path(const std::string& out, size_t index, const std::string& image_path,
                                  size_t total);

// Writes the attention rollout map of image `image` of a recorded batch (the workspace's
// attention, input height x width) over the picture at `image_path`, atomically, to `out_path`.
void write_attention_map(const Model& model, const PreprocessConfig& config, const std::vector<Tensor>& attention,
                         int64_t image, int64_t height, int64_t width, const std::string& image_path,
                         const std::string& out_path);

// Applies --threads (0 = default: TESSERA_NUM_THREADS or every core).
void apply_threads(int threads);

}  // namespace tessera::cli
