#pragma once
// Each subcommand lives in its own file and registers itself on the CLI here.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
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

// The options every command that runs a model over images declares the same way (classify,
// detect, segment, features): --model (default: the task's bundled model), the inputs (files,
// folders, @lists, globs), --batch, --threads, --processor and --max-tokens.
struct InputOptions {
  std::string model_dir, processor;
  std::vector<std::string> inputs;
  int64_t batch = 1;
  int threads = 0;
  int64_t max_tokens = 0;
};
struct InputOptionsHelp {
  std::string task;    // "classify", "detect", "segment": --model defaults to its bundled model; "" requires --model
  std::string model;   // what --model takes
  std::string inputs;  // what the positional inputs may be (beyond the common kinds)
  std::string batch;   // --batch's help, or "" for a command without it
  int64_t max_batch = 4096;
};
void add_input_options(CLI::App* cmd, InputOptions& o, const InputOptionsHelp& help);
// Applies --threads and --max-tokens, and fills in the bundled model when --model was not given.
void apply_input_options(InputOptions& o, const InputOptionsHelp& help);

// Expands IMAGE arguments: files as given, folders to their images (recursively, sorted),
// @list.txt to the paths it lists (one per line, relative to the list's folder), and a glob
// ('photos/*.jpg', quoted so the shell leaves it) that names no file to its matches, sorted.
// Missing paths (and globs that match nothing) are kept, so that they are reported per image
// rather than aborting the batch.
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

// The bundled model of a task ("classify", "detect", "segment": assets/models/digits,
// digits-detector, digits-segmenter), for a command run without --model: $TESSERA_MODELS/NAME,
// else assets/models beside the build tree, else share/tessera/models of an install, else the
// source tree's. Says on stderr which one it uses; an Error when none is there.
std::string bundled_model(const std::string& task);

// Applies --threads (0 = default: TESSERA_NUM_THREADS or every core).
void apply_threads(int threads);

// Adds --max-tokens to a subcommand (the token budget of one image, see tessera/limits.hpp);
// apply_max_tokens sets it (0 = TESSERA_MAX_TOKENS or the machine's default).
void add_max_tokens_option(CLI::App* cmd, int64_t& max_tokens);
void apply_max_tokens(int64_t max_tokens);

// A file name as JSON holds it: valid UTF-8 as is; otherwise the invalid bytes replaced by U+FFFD
// (nlohmann's error_handler_t::replace when dumping) and, so nothing is lost, set_name also adds
// KEY_hex with every byte of the name in hex.
bool is_valid_utf8(const std::string& s);
void set_name(nlohmann::json& object, const std::string& key, const std::string& name);
// json.dump(indent) that never throws on invalid UTF-8 (it writes U+FFFD instead).
std::string dump_json(const nlohmann::json& j, int indent = -1);

}  // namespace tessera::cli
