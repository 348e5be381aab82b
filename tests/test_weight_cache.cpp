// The packed-weight cache (load_model, WeightArena::replay/save): a load from the cache gives a
// model with the very same outputs as packing, for every fixture model and weight type, without
// copying a page of the mapping (which would split its huge pages); a stale,
// damaged, foreign or mismatched cache file is ignored and rewritten; an unwritable cache costs
// nothing but its status.
#include <unistd.h>

#include <catch2/catch.hpp>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>

#include "fixture_dirs.hpp"
#include "tessera/gemm.hpp"
#include "tessera/model.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

Tensor first_input(const fs::path& dir) {
  fs::path inputs;
  for (const auto& c : fs::directory_iterator(dir / "cases")) inputs = c.path() / "inputs.safetensors";
  return SafeTensors::open(inputs.string()).get("pixel_values");
}

// Every output of a and b, bit for bit.
void require_same_outputs(const Model& a, const Model& b, const Tensor& x) {
  ModelWorkspace wa, wb;
  NamedTensors want = model_forward(a, x, wa), got = model_forward(b, x, wb);
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("output " << want[i].first);
    REQUIRE(got[i].second.shape() == want[i].second.shape());
    REQUIRE(std::memcmp(got[i].second.data(), want[i].second.data(),
                        sizeof(float) * static_cast<size_t>(want[i].second.numel())) == 0);
  }
}

// Sets environment variables for one test and puts the old values back.
struct EnvGuard {
  std::vector<std::pair<std::string, std::optional<std::string>>> saved;
  void set(const std::string& name, const std::string& value) {
    const char* old = std::getenv(name.c_str());
    saved.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~EnvGuard() {
    for (auto it = saved.rbegin(); it != saved.rend(); ++it) {
      if (it->second) ::setenv(it->first.c_str(), it->second->c_str(), 1);
      else ::unsetenv(it->first.c_str());
    }
  }
};

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

// A copy of a fixture model folder (config.json, model.safetensors, cases/).
fs::path copy_model(const fs::path& dir, const fs::path& to) {
  fs::create_directories(to);
  fs::copy_file(dir / "config.json", to / "config.json");
  fs::copy_file(dir / "model.safetensors", to / "model.safetensors");
  return to;
}

// kB of the mappings of `file` in this process that were written and so copied on write
// (smaps' "Anonymous"; "Private_Dirty" also counts file pages not yet written back); -1 when
// the file is not mapped.
long copied_kb(const std::string& file) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in_file = false, found = false;
  long kb = 0;
  while (std::getline(smaps, line)) {
    const bool header = !line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
                        line.find('-') != std::string::npos && line.find(':') > line.find(' ');
    if (header) {
      in_file = line.size() >= file.size() && line.compare(line.size() - file.size(), file.size(), file) == 0;
      found = found || in_file;
    } else if (in_file && line.rfind("Anonymous:", 0) == 0) {
      kb += std::stol(line.substr(10));
    }
  }
  return found ? kb : -1;
}

const char* name(WeightType t) {
  return t == WeightType::BF16 ? "bf16" : t == WeightType::INT8 ? "int8" : "fp32";
}

}  // namespace

TEST_CASE("WeightArena replays the pieces it saved, and only for the same key and sizes") {
  TempDir tmp("tessera_arena_cache");
  const std::string file = (tmp.path / "a.tpack").string();
  std::vector<float> first(100), second(37);
  for (size_t i = 0; i < first.size(); ++i) first[i] = 0.5f * static_cast<float>(i);
  for (size_t i = 0; i < second.size(); ++i) second[i] = -1.0f - static_cast<float>(i);
  {
    WeightArena arena;
    auto a = arena.floats(first.size()), b = arena.floats(second.size());
    std::memcpy(a.get(), first.data(), first.size() * 4);
    std::memcpy(b.get(), second.data(), second.size() * 4);
    arena.save(file, "key one");
  }
  {  // the same key and sizes: the saved contents, without packing
    WeightArena arena;
    REQUIRE(arena.replay(file, "key one"));
    REQUIRE(arena.replaying());
    auto a = arena.floats(first.size()), b = arena.floats(second.size());
    CHECK(std::memcmp(a.get(), first.data(), first.size() * 4) == 0);
    CHECK(std::memcmp(b.get(), second.data(), second.size() * 4) == 0);
    CHECK(copied_kb(file) == 0);
    a[0] = 42.0f;  // pieces stay writable (copy-on-write) ...
    CHECK(copied_kb(file) > 0);
    CHECK_NOTHROW(arena.finish_replay());
  }
  {  // ... and the file did not change
    WeightArena arena;
    REQUIRE(arena.replay(file, "key one"));
    CHECK(arena.floats(first.size())[0] == 0.0f);
  }
  {  // a piece its caller fills: its own memory, not the mapping's; the cached copy is skipped
    WeightArena arena;
    REQUIRE(arena.replay(file, "key one"));
    auto a = arena.writable_floats(first.size());
    std::fill(a.get(), a.get() + first.size(), 7.0f);
    auto b = arena.floats(second.size());  // still the second cached piece
    CHECK(std::memcmp(b.get(), second.data(), second.size() * 4) == 0);
    CHECK(reinterpret_cast<const char*>(b.get()) - reinterpret_cast<const char*>(a.get()) !=
          static_cast<std::ptrdiff_t>(first.size() * 4));
    CHECK(copied_kb(file) == 0);
    CHECK_NOTHROW(arena.finish_replay());
    CHECK_THROWS_AS(arena.writable_floats(1), WeightArena::CacheMismatch);  // one too many
  }
  {  // not replaying, writable pieces are saved like the others
    WeightArena arena;
    auto a = arena.writable_floats(first.size()), b = arena.floats(second.size());
    std::memcpy(a.get(), first.data(), first.size() * 4);
    std::memcpy(b.get(), second.data(), second.size() * 4);
    arena.save(file + ".2", "key one");
    WeightArena again;
    REQUIRE(again.replay(file + ".2", "key one"));
    CHECK(std::memcmp(again.floats(first.size()).get(), first.data(), first.size() * 4) == 0);
    CHECK(std::memcmp(again.floats(second.size()).get(), second.data(), second.size() * 4) == 0);
  }
  {  // another key: not used
    WeightArena arena;
    CHECK_FALSE(arena.replay(file, "key two"));
    CHECK_FALSE(arena.replaying());
  }
  {  // other sizes, more pieces, fewer pieces: CacheMismatch
    WeightArena arena;
    REQUIRE(arena.replay(file, "key one"));
    arena.floats(first.size());
    CHECK_THROWS_AS(arena.floats(second.size() + 100), WeightArena::CacheMismatch);
    WeightArena more;
    REQUIRE(more.replay(file, "key one"));
    more.floats(first.size());
    more.floats(second.size());
    CHECK_THROWS_AS(more.floats(1), WeightArena::CacheMismatch);
    WeightArena fewer;
    REQUIRE(fewer.replay(file, "key one"));
    fewer.floats(first.size());
    CHECK_THROWS_AS(fewer.finish_replay(), WeightArena::CacheMismatch);
  }
  {  // a cut-short file: an error naming it; a file that is not a cache: ignored
    fs::resize_file(file, fs::file_size(file) - 64);
    WeightArena arena;
    CHECK_THROWS_WITH(arena.replay(file, "key one"), Catch::Contains(file) && Catch::Contains("damaged"));
    std::ofstream(file, std::ios::trunc) << "not a cache file, but long enough to have a header";
    CHECK_FALSE(arena.replay(file, "key one"));
    CHECK_FALSE(arena.replay((tmp.path / "missing.tpack").string(), "key one"));
  }
  {  // save: an unwritable place is an Error naming it
    WeightArena arena;
    arena.floats(10);
    CHECK_THROWS_WITH(arena.save((tmp.path / "no" / "such" / "dir.tpack").string(), "k"),
                      Catch::Contains("no/such/dir.tpack"));
  }
}

TEST_CASE("a model loaded from the packed-weight cache gives the same outputs as packing, for every fixture model and weight type") {
  TempDir tmp("tessera_model_cache");
  EnvGuard env;
  env.set("TESSERA_CACHE_DIR", (tmp.path / "cache").string());
  env.set("TESSERA_CACHE_MIN_MB", "0");
  int checked = 0;
  for (const fs::path& dir : fixture_model_dirs()) {
    const Tensor x = first_input(dir);
    for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
      INFO("model " << dir.string() << ", " << name(type));
      auto packed = load_model(dir.string(), type);
      CHECK(packed->weights_cache == "written");
      REQUIRE(fs::exists(packed->weights_cache_file));
      auto cached = load_model(dir.string(), type);
      CHECK(cached->weights_cache == "hit");
      CHECK(cached->weights_cache_file == packed->weights_cache_file);
      require_same_outputs(*packed, *cached, x);
      // Nothing was written through the mapping (the small tensors have memory of their own),
      // so none of its pages was copied and its 2 MiB pages stay whole.
      CHECK(copied_kb(cached->weights_cache_file) == 0);
      ++checked;
    }
  }
  CHECK(checked >= 45);
}

TEST_CASE("stale, damaged, foreign and mismatched cache files are ignored and rewritten") {
  TempDir tmp("tessera_cache_cases");
  EnvGuard env;
  env.set("TESSERA_CACHE_DIR", (tmp.path / "cache").string());
  env.set("TESSERA_CACHE_MIN_MB", "0");
  const fs::path fixture = fs::path(TESSERA_FIXTURES) / "conformance" / "vit-tiny-rand";
  const fs::path dir = copy_model(fixture, tmp.path / "model");
  const Tensor x = first_input(fixture);
  auto reference = load_model(fixture.string());  // cached under the fixture's own path
  auto model = load_model(dir.string());
  REQUIRE(model->weights_cache == "written");
  const std::string file = model->weights_cache_file;
  CHECK(load_model(dir.string())->weights_cache == "hit");
  CHECK(load_model(dir.string(), WeightType::BF16)->weights_cache == "written");  // one per type

  SECTION("the checkpoint changed (modification time)") {
    fs::last_write_time(dir / "model.safetensors",
                        fs::last_write_time(dir / "model.safetensors") + std::chrono::seconds(5));
    auto reloaded = load_model(dir.string());
    CHECK(reloaded->weights_cache == "written");
    require_same_outputs(*reference, *reloaded, x);
    CHECK(load_model(dir.string())->weights_cache == "hit");
  }
  SECTION("the config changed") {
    std::ofstream(dir / "config.json", std::ios::app) << "\n";
    CHECK(load_model(dir.string())->weights_cache == "written");
  }
  SECTION("the cache file was cut short") {
    fs::resize_file(file, fs::file_size(file) / 2);
    auto reloaded = load_model(dir.string());
    CHECK(reloaded->weights_cache == "written");
    require_same_outputs(*reference, *reloaded, x);
  }
  SECTION("the cache file is something else") {
    std::ofstream(file, std::ios::trunc) << std::string(1000, 'x');
    CHECK(load_model(dir.string())->weights_cache == "written");
  }
  SECTION("the cache file has the right key but other pieces (another build's loaders)") {
    std::string key;
    {
      std::ifstream in(file, std::ios::binary);
      char head[24];
      in.read(head, 24);
      uint64_t len;
      std::memcpy(&len, head + 16, 8);
      key.resize(len);
      in.read(key.data(), static_cast<std::streamsize>(len));
    }
    WeightArena other;
    other.floats(1000);
    other.save(file, key);
    auto reloaded = load_model(dir.string());
    CHECK(reloaded->weights_cache == "written");
    require_same_outputs(*reference, *reloaded, x);
    CHECK(load_model(dir.string())->weights_cache == "hit");
  }
  SECTION("a model keeps working when its cache file is deleted or replaced") {
    auto cached = load_model(dir.string());
    REQUIRE(cached->weights_cache == "hit");
    fs::remove(file);
    require_same_outputs(*reference, *cached, x);
    CHECK(load_model(dir.string())->weights_cache == "written");
    require_same_outputs(*reference, *cached, x);
  }
}

TEST_CASE("the cache is off, skipped for small models, or unwritable without failing a load") {
  TempDir tmp("tessera_cache_policy");
  const fs::path fixture = fs::path(TESSERA_FIXTURES) / "conformance" / "vit-tiny-rand";
  EnvGuard env;
  env.set("TESSERA_CACHE_DIR", "off");
  CHECK(load_model(fixture.string())->weights_cache == "off");
  env.set("TESSERA_CACHE_DIR", (tmp.path / "cache").string());
  env.set("TESSERA_CACHE_MIN_MB", "32");  // the fixture is far smaller
  CHECK(load_model(fixture.string())->weights_cache == "small");
  CHECK_FALSE(fs::exists(tmp.path / "cache"));
  std::ofstream(tmp.path / "a file") << "x";
  env.set("TESSERA_CACHE_DIR", (tmp.path / "a file" / "cache").string());  // cannot be a folder
  env.set("TESSERA_CACHE_MIN_MB", "0");
  auto model = load_model(fixture.string());
  CHECK(model->weights_cache.rfind("not written: ", 0) == 0);
  CHECK(model->parameter_count > 0);
}
