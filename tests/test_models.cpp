// Model conformance: every model folder under tests/fixtures/{conformance,models} runs each of its
// cases (inputs.safetensors → expected.safetensors, computed by the upstream code or a PyTorch port
// validated against it) and must reproduce every expected output to 1e-4 absolute.
#include <unistd.h>

#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "fixture_dirs.hpp"
#include "tessera/model.hpp"
#include "tessera/parallel.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

constexpr float kTolerance = 1e-4f;  // float32 port vs float32 upstream (see conformance README)

float max_abs_diff(const Tensor& a, const Tensor& b) {
  float m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("every fixture model reproduces its upstream outputs to 1e-4") {
  auto dirs = fixture_model_dirs();
  REQUIRE(dirs.size() >= 15);  // the copied conformance set plus the generated variants
  int cases = 0;
  for (const fs::path& dir : dirs) {
    std::shared_ptr<const Model> model;
    INFO("model " << dir.string());
    REQUIRE_NOTHROW(model = load_model(dir.string()));
    for (const auto& c : fs::directory_iterator(dir / "cases")) {
      INFO("case " << c.path().filename().string());
      Tensor x = SafeTensors::open((c.path() / "inputs.safetensors").string()).get("pixel_values");
      SafeTensors expected = SafeTensors::open((c.path() / "expected.safetensors").string());
      ModelWorkspace ws;
      NamedTensors out = model_forward(*model, x, ws);
      for (const std::string& name : expected.names()) {
        INFO("output " << name);
        Tensor want = expected.get(name);
        // torchvision has no named hidden state; the fixture calls the encoder's output so.
        const Tensor& got = output(out, name == "encoder_output" ? "last_hidden_state" : name);
        REQUIRE(got.shape() == want.shape());
        CHECK(max_abs_diff(got, want) <= kTolerance);
      }
      ++cases;
    }
  }
  INFO(cases << " cases");
  CHECK(cases >= 30);
}

TEST_CASE("results do not depend on the thread count or the batch composition") {
  fs::path dir = fs::path(TESSERA_FIXTURES) / "conformance/vit-tiny-rand";
  auto model = load_model(dir.string());
  Tensor x = SafeTensors::open((dir / "cases/native/inputs.safetensors").string()).get("pixel_values");
  set_num_threads(1);
  ModelWorkspace ws1;
  Tensor one = output(model_forward(*model, x, ws1), "logits");
  set_num_threads(2);
  ModelWorkspace ws2;
  Tensor two = output(model_forward(*model, x, ws2), "logits");
  Tensor single = output(model_forward(*model, x.slice0(1, 2).clone(), ws2), "logits");
  set_num_threads(0);
  REQUIRE(max_abs_diff(one, two) == 0.0f);
  for (int64_t k = 0; k < single.numel(); ++k) CHECK(single[k] == two[single.numel() + k]);
}

namespace {

// Lines of /proc/self/maps and targets of /proc/self/fd that name `path`.
int process_references(const fs::path& path) {
  int n = 0;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) n += line.find(path.string()) != std::string::npos;
  for (const auto& fd : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    n += fs::read_symlink(fd.path(), ec) == path;
  }
  return n;
}

}  // namespace

TEST_CASE("a loaded model keeps nothing of its checkpoint: no mapping, no descriptor, the same outputs after the file changes") {
  // The loaders copy what they keep and pack the rest from the file, so the file's pages never
  // stay in the process's memory. Overwriting the file would change the outputs of a model that
  // still viewed its mapping (and cutting it short would crash one with SIGBUS).
  const fs::path tmp = fs::temp_directory_path() / ("tessera_release_" + std::to_string(::getpid()));
  int checked = 0;
  for (const fs::path& dir : fixture_model_dirs()) {
    for (WeightType type : {WeightType::F32, WeightType::BF16, WeightType::INT8}) {
      INFO("model " << dir.string() << ", weight type " << static_cast<int>(type));
      const fs::path copy = tmp / dir.filename();
      fs::remove_all(copy);
      fs::create_directories(copy);
      fs::copy_file(dir / "config.json", copy / "config.json");
      fs::copy_file(dir / "model.safetensors", copy / "model.safetensors");
      const fs::path file = fs::canonical(copy / "model.safetensors");
      auto reference = load_model(dir.string(), type);
      auto model = load_model(copy.string(), type);
      CHECK(process_references(file) == 0);
      {
        const auto size = fs::file_size(file);
        std::ofstream clobber(file, std::ios::binary | std::ios::trunc);
        clobber << std::string(size, '\x55');
      }
      fs::path inputs;
      for (const auto& c : fs::directory_iterator(dir / "cases")) inputs = c.path() / "inputs.safetensors";
      Tensor x = SafeTensors::open(inputs.string()).get("pixel_values");
      ModelWorkspace ws1, ws2;
      NamedTensors want = model_forward(*reference, x, ws1), got = model_forward(*model, x, ws2);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("output " << want[i].first);
        REQUIRE(got[i].second.shape() == want[i].second.shape());
        CHECK(max_abs_diff(got[i].second, want[i].second) == 0.0f);
      }
      ++checked;
    }
  }
  fs::remove_all(tmp);
  CHECK(checked >= 45);
}

namespace {

// Writes `tensors` as a safetensors file, BF16 (values must already be bf16-exact) or F32.
void write_raw(const fs::path& path, const std::vector<std::pair<std::string, Tensor>>& tensors, bool bf16) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [name, t] : tensors) {
    size_t begin = data.size();
    for (int64_t i = 0; i < t.numel(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, t.data() + i, 4);
      if (bf16) {
        uint16_t hi = static_cast<uint16_t>(bits >> 16);
        data.append(reinterpret_cast<const char*>(&hi), 2);
      } else {
        data.append(reinterpret_cast<const char*>(&bits), 4);
      }
    }
    header[name] = {{"dtype", bf16 ? "BF16" : "F32"}, {"shape", t.shape()}, {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  uint64_t n = h.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h << data;
}

}  // namespace

TEST_CASE("BF16 and sharded checkpoints load as the same model") {
  fs::path src = fs::path(TESSERA_FIXTURES) / "conformance/vit-tiny-rand";
  fs::path tmp = fs::temp_directory_path() / ("tessera_models_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  SafeTensors st = SafeTensors::open((src / "model.safetensors").string());
  // Round every weight to bf16 (truncating the low 16 bits: exactly representable in BF16).
  std::vector<std::pair<std::string, Tensor>> rounded;
  for (const auto& name : st.names()) {
    Tensor t = st.get(name).clone();
    for (float& v : t.span()) {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      bits &= 0xFFFF0000u;
      std::memcpy(&v, &bits, 4);
    }
    rounded.emplace_back(name, t);
  }
  auto make = [&](const std::string& name) {
    fs::path d = tmp / name;
    fs::create_directories(d);
    fs::copy_file(src / "config.json", d / "config.json");
    return d;
  };
  fs::path f32 = make("f32"), bf16 = make("bf16"), sharded = make("sharded");
  write_raw(f32 / "model.safetensors", rounded, false);
  write_raw(bf16 / "model.safetensors", rounded, true);
  // Two shards with an index, as transformers writes large checkpoints.
  std::vector<std::pair<std::string, Tensor>> first(rounded.begin(), rounded.begin() + rounded.size() / 2);
  std::vector<std::pair<std::string, Tensor>> second(rounded.begin() + rounded.size() / 2, rounded.end());
  write_raw(sharded / "model-00001-of-00002.safetensors", first, true);
  write_raw(sharded / "model-00002-of-00002.safetensors", second, false);
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (const auto& [n, t] : first) index["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (const auto& [n, t] : second) index["weight_map"][n] = "model-00002-of-00002.safetensors";
  std::ofstream(sharded / "model.safetensors.index.json") << index.dump();

  Tensor x = SafeTensors::open((src / "cases/native/inputs.safetensors").string()).get("pixel_values");
  auto run = [&](const fs::path& d) {
    ModelWorkspace ws;
    return output(model_forward(*load_model(d.string()), x, ws), "logits").clone();
  };
  Tensor a = run(f32), b = run(bf16), c = run(sharded);
  CHECK(load_model(bf16.string())->weight_dtype == "BF16");
  REQUIRE(a.shape() == b.shape());
  CHECK(max_abs_diff(a, b) == 0.0f);
  CHECK(max_abs_diff(a, c) == 0.0f);
  fs::remove_all(tmp);
}
