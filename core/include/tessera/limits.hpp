#pragma once
// Bounds on what a file handed to Tessera can make it do (README, "Reliability"): every input that
// crosses one is refused with a one-line tessera::Error naming the file, never by allocating what
// the file claims, recursing as deep as it nests, or reading a device forever.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tessera {

// JSON deeper than this is refused before it is parsed (configs nest 3-4 levels; the parser and
// anything that prints a value recurse once per level).
inline constexpr int kMaxJsonDepth = 64;
// config.json, preprocessor_config.json, model.safetensors.index.json, @lists.
inline constexpr std::uintmax_t kMaxConfigBytes = std::uintmax_t(64) << 20;
// Tensors in one .safetensors file (checkpoints hold thousands; 7 MB of header names 10^5).
inline constexpr std::size_t kMaxSafetensorsTensors = 262144;
// A side of a pre-processed image (preprocessor_config.json sizes, timm input_size); the side of
// the largest image decoded (kMaxImagePixels = 2^28 = 16384^2).
inline constexpr int kMaxImageSide = 16384;

// Tokens one image may make a model run (what attention costs grows with their square): the
// --max-tokens option / set_max_tokens(), else TESSERA_MAX_TOKENS, else default_max_tokens():
// 16384 (a 2048x2048 input in 16-pixel patches; every processor Tessera reproduces stays below
// 7000 at its own sizes), fewer on a machine whose memory holds less than 32 x 16384^2 bytes.
std::int64_t default_max_tokens();
std::int64_t max_tokens();
void set_max_tokens(std::int64_t n);  // 0: back to TESSERA_MAX_TOKENS / the default

// Throws unless `text` nests at most `max_depth` arrays/objects: a linear scan that skips strings,
// so a hostile file is refused before the recursive parts of a JSON library see it.
void check_json_depth(std::string_view text, const std::string& file, int max_depth = kMaxJsonDepth);

// The whole of `path`, which must be a regular file (not a directory, FIFO, /dev/zero ...) of at
// most max_bytes; `what` names it in messages ("config", "input list" ...).
std::string read_regular_file(const std::string& path, const std::string& what,
                              std::uintmax_t max_bytes = kMaxConfigBytes);

// `s` fit for a one-line message: control bytes as '?', at most max_chars (then "...").
std::string brief_text(std::string_view s, std::size_t max_chars = 80);

}  // namespace tessera
