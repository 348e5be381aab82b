// tessera data: makes data sets. `data scenes` draws detection / segmentation scenes from OpenCV's
// handwritten digits (see vision/include/tessera/scenes.hpp and the README's "Digit scenes").
#include <cstdio>

#include "commands.hpp"
#include "tessera/scenes.hpp"

namespace tessera::cli {

void add_data(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("data", "Make data sets (digit scenes for detection and segmentation)");
  cmd->require_subcommand(1);
  auto* scenes = cmd->add_subcommand(
      "scenes", "Digit scenes from OpenCV's digits.png: DIR/images/*.png, DIR/masks/*.png, DIR/annotations.json (COCO)");
  static std::string split = "train", out_dir, digits_png = default_digits_png(), photo_dir = default_photo_dir();
  static int64_t count = 0;
  static uint64_t seed = 0;
  static int threads = 0;
  scenes->add_option("--split", split, "train (tutorial training cells) or test (tutorial test cells)")
      ->check(CLI::IsMember({"train", "test"}));
  scenes->add_option("--count", count, "Number of scenes")->required()->check(CLI::Range(int64_t{1}, int64_t{10000000}));
  scenes->add_option("--seed", seed, "Seed: the same seed gives the same scenes");
  scenes->add_option("--out", out_dir, "Output folder")->required();
  scenes->add_option("--digits-png", digits_png, "OpenCV's samples/data/digits.png");
  scenes->add_option("--photos", photo_dir, "Folder with OpenCV's sample photos (background crops)");
  scenes->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS, else every core)");
  scenes->callback([&action] {
    action = [] {
      apply_threads(threads);
      const SceneSplit s = parse_scene_split(split);
      const SceneSource source = load_scene_source(s, digits_png, photo_dir);
      const SceneWriteSummary summary = write_scenes(source, seed, count, out_dir);
      std::printf("wrote %lld %s scenes (%lld digits, seed %llu) to %s: images/, masks/, annotations.json\n",
                  static_cast<long long>(summary.scenes), scene_split_name(s),
                  static_cast<long long>(summary.digits), static_cast<unsigned long long>(seed), out_dir.c_str());
      return 0;
    };
  });
}

}  // namespace tessera::cli
