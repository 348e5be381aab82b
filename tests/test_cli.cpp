// The tessera CLI end to end: conformance through `tessera infer`, classify on a batch with a bad
// image, and one-line errors with the right exit code for every kind of bad input.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

struct Run {
  int code;
  std::string out, err;
};

fs::path scratch() {
  fs::path p = fs::temp_directory_path() / ("tessera_cli_" + std::to_string(::getpid()));
  fs::create_directories(p);
  return p;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Run run_cli(const std::string& args) {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  fs::path dir = scratch();
  std::string cmd = std::string(cli) + " " + args + " >" + (dir / "out").string() + " 2>" + (dir / "err").string();
  int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir / "out"), slurp(dir / "err")};
}

// run_cli with one more environment variable ("NAME=value") set for the command.
Run run_cli_env(const std::string& assignment, const std::string& args) {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  fs::path dir = scratch();
  std::string cmd = "env " + assignment + " " + std::string(cli) + " " + args + " >" + (dir / "out").string() +
                    " 2>" + (dir / "err").string();
  int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir / "out"), slurp(dir / "err")};
}

std::string fixture(const std::string& rel) { return (fs::path(TESSERA_FIXTURES) / rel).string(); }

int lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// Copies a model folder so a test can break it.
fs::path copy_model(const std::string& rel, const std::string& name) {
  fs::path dst = scratch() / name;
  fs::remove_all(dst);
  fs::create_directories(dst);
  for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(fixture(rel) / fs::path(f), dst / f);
  return dst;
}

// Every tensor of `expected` is in `got` with the same shape, within 1e-4 absolute.
void check_outputs(const fs::path& got_path, const fs::path& expected_path) {
  SafeTensors got = SafeTensors::open(got_path.string()), want = SafeTensors::open(expected_path.string());
  for (const auto& name : want.names()) {
    INFO("output " << name);
    Tensor a = got.get(name), b = want.get(name);
    REQUIRE(a.shape() == b.shape());
    float m = 0;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
    CHECK(m <= 1e-4f);
  }
}

}  // namespace

TEST_CASE("tessera infer reproduces the conformance outputs (1e-4)") {
  for (const char* model : {"conformance/vit-tiny-rand", "conformance/deit-tiny-distilled-rand",
                            "conformance/timm/vit_small_patch16_224-gap-fcnorm"}) {
    fs::path cases = fs::path(fixture(model)) / "cases";
    for (const auto& c : fs::directory_iterator(cases)) {
      INFO(model << " " << c.path().filename());
      fs::path out = scratch() / "out.safetensors";
      Run r = run_cli("infer --model " + fixture(model) + " --inputs " +
                      (c.path() / "inputs.safetensors").string() + " --outputs " + out.string());
      REQUIRE(r.code == 0);
      check_outputs(out, c.path() / "expected.safetensors");
    }
  }
}

TEST_CASE("tessera infer on photos goes through the folder's processor (e2e cases, 1e-4)") {
  for (const char* model : {"conformance/vit-tiny-rand", "conformance/deit-tiny-distilled-rand",
                            "conformance/timm/vit_small_patch16_224-gap-fcnorm"}) {
    INFO(model);
    fs::path e2e = fs::path(fixture(model)) / "cases/e2e";
    std::string images;
    std::vector<fs::path> files;
    for (const auto& f : fs::directory_iterator(e2e / "images")) files.push_back(f.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) images += " " + f.string();
    fs::path out = scratch() / "e2e.safetensors";
    std::string processor;
    if (fs::exists(e2e / "preprocessor_config.json")) {
      processor = " --processor ";
      processor += (e2e / "preprocessor_config.json").string();
    }
    Run r = run_cli("infer --model " + fixture(model) + processor + images + " --outputs " + out.string());
    INFO(r.err);
    REQUIRE(r.code == 0);
    check_outputs(out, e2e / "expected.safetensors");
  }
}

TEST_CASE("tessera classify answers for good images, reports the bad one, exits 1") {
  fs::path dir = scratch() / "batch";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::path photos = fs::path(fixture("conformance/vit-tiny-rand/cases/e2e/images"));
  fs::copy_file(photos / "0_chelsea.png", dir / "a.png");
  fs::copy_file(photos / "1_coffee.png", dir / "c.png");
  { std::ofstream(dir / "b.png") << "this is not a PNG"; }
  Run r = run_cli("classify --model " + fixture("conformance/vit-tiny-rand") + " --top-k 3 --batch 2 --json " + dir.string());
  CHECK(r.code == 1);
  auto j = nlohmann::json::parse(r.out);
  REQUIRE(j.size() == 3);
  CHECK(j[0]["predictions"].size() == 3);
  CHECK(j[1].contains("error"));
  CHECK(j[1]["error"].get<std::string>().find("b.png") != std::string::npos);
  CHECK(j[2]["predictions"].size() == 3);
  double sum = 0;
  for (auto& p : j[0]["predictions"]) sum += p["probability"].get<double>();
  CHECK(sum <= 1.0 + 1e-6);
  CHECK(r.err.find("b.png") != std::string::npos);

  // The same good image gives the same answer alone as in a batch.
  Run alone = run_cli("classify --model " + fixture("conformance/vit-tiny-rand") + " --top-k 3 --json " + (dir / "c.png").string());
  REQUIRE(alone.code == 0);
  CHECK(nlohmann::json::parse(alone.out)[0]["predictions"] == j[2]["predictions"]);
}

TEST_CASE("tessera bench --arch yolos-ti / segmenter-s: one JSON object with the issue's keys") {
  // Small inputs keep this quick; timing is not checked here (that is what bench is for).
  struct Case {
    std::string arch, args, dtype;
    int64_t batch, threads, height, width;
    std::string timed;  // what the timed run goes through
  };
  const Case cases[] = {
      {"yolos-ti", "--height 64 --width 96 --batch 2 --threads 1", "int8", 2, 1, 64, 96, "pred_boxes"},
      {"segmenter-s", "--image-size 48 --threads 2", "bf16", 1, 2, 48, 48, "class masks 150x3x3"},
      {"segmenter-s", "--height 40 --width 56 --threads 1", "fp32", 1, 1, 40, 56, "class masks 150x3x4"},
  };
  for (const Case& c : cases) {
    INFO(c.arch << " " << c.args << " --dtype " << c.dtype);
    Run r = run_cli("bench --arch " + c.arch + " " + c.args + " --dtype " + c.dtype + " --iterations 1 --json");
    INFO(r.err);
    REQUIRE(r.code == 0);
    auto j = nlohmann::json::parse(r.out);
    REQUIRE(j.is_object());
    for (const char* key : {"ms_per_image_median", "images_per_second", "gflops", "load_ms", "peak_rss_mb",
                            "batch", "threads", "dtype"})
      CHECK(j.contains(key));
    CHECK(j["model"] == c.arch);
    CHECK(j["batch"] == c.batch);
    CHECK(j["threads"] == c.threads);
    CHECK(j["dtype"] == c.dtype);
    CHECK(j["image_size"] == nlohmann::json::array({c.height, c.width}));
    const double ms = j["ms_per_image_median"], gflops = j["gflops"], per_image = j["gflop_per_image"];
    CHECK(ms > 0);
    CHECK(gflops > 0);
    CHECK(double(j["images_per_second"]) == Approx(1000.0 / ms));
    CHECK(gflops == Approx(per_image * 1000.0 / ms));  // the rate comes from the model's FLOP count
    CHECK(double(j["load_ms"]) > 0);
    CHECK(double(j["peak_rss_mb"]) > 10);  // the weights alone are tens of MB
    CHECK(std::string(j["timed"]).find(c.timed) != std::string::npos);
  }
  // The help says which input each random arch gets by default and what is timed.
  Run help = run_cli("bench --help");
  CHECK(help.code == 0);
  for (const char* s : {"yolos-ti", "512x688", "segmenter-s", "upsampling"})
    CHECK(help.out.find(s) != std::string::npos);
}

TEST_CASE("tessera bench --model: load time with the packed-weight cache written, then used") {
  const fs::path cache = scratch() / "weights-cache";
  ::setenv("TESSERA_CACHE_DIR", cache.string().c_str(), 1);
  ::setenv("TESSERA_CACHE_MIN_MB", "0", 1);
  const std::string args = "bench --model " + fixture("conformance/vit-tiny-rand") + " --iterations 1 --json";
  Run first = run_cli(args), second = run_cli(args);
  ::setenv("TESSERA_CACHE_DIR", "off", 1);
  ::unsetenv("TESSERA_CACHE_MIN_MB");
  Run off = run_cli(args);
  for (const Run* r : {&first, &second, &off}) {
    INFO(r->err);
    REQUIRE(r->code == 0);
  }
  auto a = nlohmann::json::parse(first.out), b = nlohmann::json::parse(second.out),
       c = nlohmann::json::parse(off.out);
  CHECK(a["weights_cache"] == "written");
  CHECK(b["weights_cache"] == "hit");
  CHECK(c["weights_cache"] == "off");
  for (const auto* j : {&a, &b, &c}) {
    CHECK(double((*j)["load_ms"]) > 0);
    CHECK(double((*j)["first_forward_ms"]) > 0);
  }
  fs::remove_all(cache);
}

TEST_CASE("tessera bench --gemm: every dtype's rate on the ViT-B shapes, or the one asked for") {
  Run all = run_cli("bench --gemm --threads 1 --iterations 1 --json");
  INFO(all.err);
  REQUIRE(all.code == 0);
  auto j = nlohmann::json::parse(all.out);
  REQUIRE(j["dtypes"].size() == 3);
  const char* names[] = {"fp32", "bf16", "int8"};
  for (int i = 0; i < 3; ++i) {
    const auto& d = j["dtypes"][i];
    CHECK(d["dtype"] == names[i]);
    CHECK(d["threads"] == 1);
    CHECK(double(d["gflops"]) > 0);
    REQUIRE(d["gemm"].size() == 4);  // qkv, attn out, fc1, fc2
    CHECK(d["gemm"][3]["K"] == 3072);
  }
  CHECK(j["fma_peak_threads"] == 1);
  CHECK(double(j["fma_peak_gflops"]) > 0);
  Run one = run_cli("bench --gemm --dtype bf16 --threads 1 --iterations 1 --json");
  REQUIRE(one.code == 0);
  auto b = nlohmann::json::parse(one.out);
  CHECK(b["dtype"] == "bf16");
  CHECK(!b.contains("dtypes"));
  CHECK(b.contains("fma_peak_gflops"));
  Run text = run_cli("bench --gemm --threads 1 --iterations 1");
  REQUIRE(text.code == 0);
  CHECK(text.out.find("GEMM rate: fp32") != std::string::npos);
  CHECK(text.out.find("registers only, 1 thread)") != std::string::npos);
  CHECK(text.out.find("kernel family ") != std::string::npos);
}

TEST_CASE("bench --isa and TESSERA_ISA cap the kernel family; info --cpu names it") {
  Run capped = run_cli("bench --gemm --dtype int8 --isa generic --threads 1 --iterations 1 --json");
  INFO(capped.err);
  REQUIRE(capped.code == 0);
  auto j = nlohmann::json::parse(capped.out);
  CHECK(j["isa"] == "generic");
  CHECK(j["kernel"] == "generic");
  Run bad = run_cli("bench --gemm --isa sse2 --threads 1 --iterations 1");
  CHECK(bad.code != 0);
  CHECK(lines(bad.err) == 1);
  CHECK(bad.err.find("expected avx512, avx2 or generic") != std::string::npos);
  Run env = run_cli_env("TESSERA_ISA=avx3", "info --cpu");
  CHECK(env.code != 0);
  CHECK(lines(env.err) == 1);
  CHECK(env.err.find("TESSERA_ISA") != std::string::npos);
  Run cpu = run_cli_env("TESSERA_ISA=generic", "info --cpu");
  REQUIRE(cpu.code == 0);
  CHECK(cpu.out.find("kernel family: generic") != std::string::npos);
  CHECK(cpu.out.find("gemm kernels: fp32 generic, bf16 generic, int8 generic") != std::string::npos);
}

TEST_CASE("bad inputs give one line naming the file, and a non-zero exit") {
  const std::string vit = fixture("conformance/vit-tiny-rand");

  SECTION("missing image") {
    Run r = run_cli("classify --model " + vit + " /nonexistent/cat.png");
    CHECK(r.code == 1);
    CHECK(r.err.find("/nonexistent/cat.png") != std::string::npos);
  }
  SECTION("missing model folder") {
    Run r = run_cli("info /nonexistent/model");
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("/nonexistent/model") != std::string::npos);
  }
  SECTION("truncated safetensors") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "truncated");
    fs::resize_file(m / "model.safetensors", fs::file_size(m / "model.safetensors") / 2);
    Run r = run_cli("info " + m.string());
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("model.safetensors") != std::string::npos);
  }
  SECTION("safetensors header that lies") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "lying");
    std::fstream f(m / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    uint64_t n = 1ull << 40;
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.close();
    Run r = run_cli("info " + m.string());
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("model.safetensors") != std::string::npos);
  }
  SECTION("config whose shapes do not match the weights") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "mismatch");
    auto cfg = nlohmann::json::parse(slurp(m / "config.json"));
    cfg["intermediate_size"] = 100;
    std::ofstream(m / "config.json") << cfg.dump();
    Run r = run_cli("info " + m.string());
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("intermediate.dense.weight") != std::string::npos);
    CHECK(r.err.find("[100, 64]") != std::string::npos);
  }
  SECTION("unknown architecture") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "unknown");
    auto cfg = nlohmann::json::parse(slurp(m / "config.json"));
    cfg["model_type"] = "swin";
    cfg["architectures"] = {"SwinForImageClassification"};
    std::ofstream(m / "config.json") << cfg.dump();
    Run r = run_cli("info " + m.string());
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("swin") != std::string::npos);
  }
  SECTION("corrupt config.json") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "badjson");
    std::ofstream(m / "config.json") << "{\"model_type\": ";
    Run r = run_cli("info " + m.string());
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("config.json") != std::string::npos);
  }
  SECTION("unknown random-weight arch") {
    Run r = run_cli("bench --arch yolos-xl");
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.find("yolos-xl") != std::string::npos);
    CHECK(r.err.find("segmenter-s") != std::string::npos);  // the known ones are listed
  }
  SECTION("wrong command line") {
    Run r = run_cli("classify --top-k 3");
    CHECK(r.code == 2);
  }
}
