#pragma once
// Each subcommand lives in its own file and registers itself on the CLI here.
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

namespace tessera::cli {

// A subcommand's action returns the process exit code.
using Action = std::function<int()>;

void add_classify(CLI::App& app, Action& action);
void add_infer(CLI::App& app, Action& action);
void add_info(CLI::App& app, Action& action);
void add_bench(CLI::App& app, Action& action);
void add_segment(CLI::App& app, Action& action);
void add_detect(CLI::App& app, Action& action);
void add_train(CLI::App& app, Action& action);

// Expands IMAGE arguments: files as given, folders to their images (recursively, sorted), and
// @list.txt to the paths it lists (one per line, relative to the list's folder). Missing paths
// are kept, so that they are reported per image rather than aborting the batch.
std::vector<std::string> expand_inputs(const std::vector<std::string>& args);

// Applies --threads (0 = default: TESSERA_NUM_THREADS or every core).
void apply_threads(int threads);

}  // namespace tessera::cli
