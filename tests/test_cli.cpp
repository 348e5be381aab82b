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
#include <map>
#include <random>
#include <sstream>
#include <chrono>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/videoio.hpp>

#include "cli_util.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

using Run = test::CliRun;
using test::slurp;

// This program's scratch folder (kept between calls: tests make sub-folders in it).
fs::path scratch() {
  const fs::path p = fs::temp_directory_path() / ("tessera_cli_" + std::to_string(::getpid()));
  fs::create_directories(p);
  return p;
}

Run run_cli(const std::string& args) { return test::run_cli(args); }

// run_cli with one more environment variable ("NAME=value") set for the command.
Run run_cli_env(const std::string& assignment, const std::string& args) { return test::run_cli(args, "env " + assignment); }

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

// ------------------------------------------------------------------------- hostile inputs (issue 17)

namespace {

// A folder of its own for one hostile case.
fs::path fresh(const std::string& name) {
  fs::path p = scratch() / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace

TEST_CASE("hostile model folders: one line naming the file, exit 1, no crash") {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  auto refused = [](const fs::path& m, std::initializer_list<std::string> parts, const std::string& cmd = "info ") {
    Run r = run_cli(cmd + m.string());
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(lines(r.err) == 1);
    for (const auto& part : parts) CHECK(r.err.find(part) != std::string::npos);
  };
  SECTION("config.json nested 100,000 levels deep") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "deepcfg");
    std::ofstream(m / "config.json") << R"({"model_type":"vit","hidden_size":)" << deep << "}";
    refused(m, {"config.json: JSON nests"});
  }
  SECTION("config.json with a number out of range, or of the wrong type") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "bignum");
    auto cfg = nlohmann::json::parse(slurp(m / "config.json"));
    std::string text = cfg.dump();
    text.insert(1, "\"x\":1e999,");
    std::ofstream(m / "config.json") << text;
    refused(m, {"config.json: invalid JSON", "1e999"});
    cfg["hidden_size"] = 1e300;
    std::ofstream(m / "config.json") << cfg.dump();
    refused(m, {"config.json: \"hidden_size\" must be an integer"});
  }
  SECTION("config.json that is a link to /dev/zero") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "devzero");
    fs::remove(m / "config.json");
    fs::create_symlink("/dev/zero", m / "config.json");
    refused(m, {"config.json: is not a regular file"});
  }
  SECTION("preprocessor_config.json nested 100,000 levels deep") {
    fs::path m = copy_model("conformance/vit-tiny-rand", "deeppre");
    std::ofstream(m / "preprocessor_config.json") << R"({"image_processor_type":"ViTImageProcessor","size":)" << deep << "}";
    refused(m, {"preprocessor_config.json: JSON nests"},
            "classify " + fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png") + " --model ");
  }
  SECTION("timm: a register token of the wrong rank, input_size of strings") {
    const fs::path src = fs::path(TESSERA_FIXTURES) / "conformance/timm/vit_small_patch16_224-gap-fcnorm";
    fs::path m = fresh("timm_bad");
    fs::copy_file(src / "config.json", m / "config.json");
    SafeTensors st = SafeTensors::open((src / "model.safetensors").string());
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& name : st.names()) tensors.emplace_back(name, st.get(name).clone());
    tensors.emplace_back("reg_token", Tensor({64}));
    save_safetensors((m / "model.safetensors").string(), tensors);
    refused(m, {"model.safetensors: tensor 'reg_token' must have 3 dimensions, got shape [64]"});
    tensors.pop_back();
    save_safetensors((m / "model.safetensors").string(), tensors);
    auto cfg = nlohmann::json::parse(slurp(src / "config.json"));
    cfg["model_args"].erase("img_size");
    cfg["pretrained_cfg"]["input_size"] = {"3", "a", "b"};
    std::ofstream(m / "config.json") << cfg.dump();
    refused(m, {"config.json (pretrained_cfg): \"input_size\" must be [3, height, width]"});
  }
}

TEST_CASE("hostile inputs: NUL lines, non-UTF-8 names, output collisions, token budget") {
  const std::string vit = fixture("conformance/vit-tiny-rand");
  const fs::path chelsea = fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png");
  SECTION("an @list line of NUL bytes is one failed input; the others are answered") {
    fs::path d = fresh("nul_list");
    {
      std::ofstream list(d / "list.txt", std::ios::binary);
      list << chelsea.string() << "\n" << std::string(16, '\0') << "\n" << chelsea.string() << "\n";
    }
    Run r = run_cli("classify --json --model " + vit + " @" + (d / "list.txt").string());
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(r.err.find("NUL byte") != std::string::npos);
    auto j = nlohmann::json::parse(r.out);
    REQUIRE(j.size() == 3);
    CHECK(j[0].contains("predictions"));
    CHECK(j[1].contains("error"));
    CHECK(j[2]["predictions"] == j[0]["predictions"]);
    fs::path out = d / "seg";
    Run s = run_cli("segment --model " + fixture("conformance/segmenter-linear-rand") + " --out " + out.string() + " @" +
                    (d / "list.txt").string());
    INFO(s.err);
    CHECK(s.code == 1);
    CHECK(s.err.find("NUL byte") != std::string::npos);
  }
  SECTION("a non-UTF-8 file name: classify --json and segment --fractions write it, escaped and in hex") {
    fs::path d = fresh("latin1");
    const std::string name = "caf\xe9.png";  // Latin-1, not UTF-8
    fs::copy_file(chelsea, d / name);
    fs::copy_file(chelsea, d / "plain.png");
    Run r = run_cli("classify --json --model " + vit + " " + d.string());
    INFO(r.err);
    CHECK(r.code == 0);
    auto j = nlohmann::json::parse(r.out);
    REQUIRE(j.size() == 2);
    CHECK(j[0]["image"] == (d / "caf\xef\xbf\xbd.png").string());  // U+FFFD
    CHECK(j[0]["image_hex"].get<std::string>().find("636166e92e706e67") != std::string::npos);  // "caf\xe9.png"
    CHECK(j[0]["predictions"] == j[1]["predictions"]);
    CHECK_FALSE(j[1].contains("image_hex"));
    fs::path out = d / "seg";
    Run s = run_cli("segment --model " + fixture("conformance/segmenter-linear-rand") + " --out " + out.string() +
                    " --fractions f.jsonl " + (d / name).string() + " " + (d / "plain.png").string());
    INFO(s.err);
    CHECK(s.code == 0);
    std::istringstream fractions(slurp(out / "f.jsonl"));
    int rows = 0;
    for (std::string line; std::getline(fractions, line); ++rows) CHECK(nlohmann::json::parse(line).contains("fractions"));
    CHECK(rows == 2);
    CHECK_FALSE(fs::exists(out / "f.jsonl.partial"));
  }
  SECTION("detect --out: two inputs that map to one output name are reported, not overwritten") {
    fs::path d = fresh("collide");
    fs::create_directories(d / "a");
    fs::create_directories(d / "b");
    fs::copy_file(chelsea, d / "a/plain.png");
    fs::copy_file(fixture("conformance/vit-tiny-rand/cases/e2e/images/1_coffee.png"), d / "b/plain.png");
    // An absolute and a relative path: both mirror to plain.png.
    const fs::path rel_b = fs::relative(d / "b/plain.png", fs::current_path());
    Run r = run_cli("detect --model " + fixture("conformance/yolos-tiny-rand") + " --out " + (d / "out").string() + " " +
                    (d / "a/plain.png").string() + " " + rel_b.string());
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(r.err.find("its output plain.png is already taken by " + (d / "a/plain.png").string()) != std::string::npos);
    // The first one's overlay is the one kept: the size of a/plain.png (the coffee photo differs).
    cv::Mat kept = cv::imread((d / "out/plain.png").string());
    CHECK(kept.size() == cv::imread(chelsea.string()).size());
  }
  SECTION("detect on a square 4000x4000 image with the YOLOS processor fails fast with the size and how to resize") {
    fs::path d = fresh("square");
    fs::path m = copy_model("conformance/yolos-tiny-rand", "yolos_square");
    fs::copy_file(fixture("conformance/yolos-tiny-rand/cases/e2e/preprocessor_config.json"), m / "preprocessor_config.json");
    cv::imwrite((d / "square.png").string(), cv::Mat(4000, 4000, CV_8UC3, cv::Scalar(20, 40, 60)));
    const auto t0 = std::chrono::steady_clock::now();
    Run r = run_cli("detect --model " + m.string() + " " + (d / "square.png").string());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(r.err.find("square.png: a 4000x4000 (WxH) model input makes 62500 tokens") != std::string::npos);
    CHECK(r.err.find("resize it to at most") != std::string::npos);
    CHECK(seconds < 60);  // it used to run ~5 minutes
    Run small = run_cli("detect --max-tokens 20 --model " + m.string() + " " + chelsea.string());
    CHECK(small.code == 1);
    CHECK(small.err.find("more than the limit of 20") != std::string::npos);
    CHECK(run_cli("detect --max-tokens 100000 --model " + m.string() + " " + chelsea.string()).code == 0);
  }
  SECTION("segment --window 100000 is refused before any window is allocated") {
    Run r = run_cli("segment --model " + fixture("conformance/segmenter-linear-rand") + " --out " + fresh("win").string() +
                    " --sliding-window --window 100000 " + chelsea.string());
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(r.err.find("tessera: error:") == r.err.rfind("tessera: error:"));  // one error, on one line
    CHECK(r.err.substr(r.err.find("tessera: error:")).find('\n') == r.err.size() - r.err.find("tessera: error:") - 1);
    CHECK(r.err.find("--window 100000: a 100000x100000 (WxH) model input makes 156250000 tokens") != std::string::npos);
  }
}

TEST_CASE("tessera detect: --batch and --threads change nothing; a video gives an annotated video and JSON Lines") {
  const fs::path dir = scratch() / "detect_video";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string model = fixture("conformance/detr-vit-rand");
  const cv::Mat photo = cv::imread(fixture("preprocess/photos/chelsea.png"));
  REQUIRE(!photo.empty());
  std::string images;
  for (int i = 0; i < 4; ++i) {
    cv::Mat img;
    cv::resize(photo, img, cv::Size(96 + 16 * (i % 2), 64));  // two sizes: batches hold both
    const fs::path p = dir / ("img" + std::to_string(i) + ".png");
    cv::imwrite(p.string(), img);
    images += " " + p.string();
  }
  Run a = run_cli("detect --model " + model + " --threshold 0.3 --batch 1 --threads 1 --json " + (dir / "a.json").string() + images);
  Run b = run_cli("detect --model " + model + " --threshold 0.3 --batch 3 --threads 2 --json " + (dir / "b.json").string() + images);
  REQUIRE(a.code == 0);
  REQUIRE(b.code == 0);
  CHECK(slurp(dir / "a.json") == slurp(dir / "b.json"));
  CHECK(a.out == b.out);

  // A 6-frame video (MJPEG in AVI), written with OpenCV.
  const fs::path clip = dir / "clip.avi";
  {
    cv::VideoWriter w(clip.string(), cv::CAP_OPENCV_MJPEG, cv::VideoWriter::fourcc('M', 'J', 'P', 'G'), 10, cv::Size(96, 64));
    REQUIRE(w.isOpened());
    for (int f = 0; f < 6; ++f) {
      cv::Mat img;
      cv::resize(photo(cv::Rect(10 * f, 0, 300, 200)), img, cv::Size(96, 64));
      w.write(img);
    }
  }
  std::ofstream(dir / "broken.mp4") << "not a video";
  Run v = run_cli("detect --model " + model + " --threshold 0.3 --out " + (dir / "out").string() + " " + clip.string() + " " +
                  (dir / "broken.mp4").string() + " " + (dir / "img0.png").string());
  INFO(v.out << v.err);
  CHECK(v.code == 1);  // the broken video is reported; the others are done
  CHECK(v.err.find("broken.mp4") != std::string::npos);
  CHECK(fs::exists(dir / "out" / "img0.png"));
  cv::VideoCapture annotated((dir / "out" / "clip.avi").string());
  REQUIRE(annotated.isOpened());
  int frames = 0;
  cv::Mat frame;
  while (annotated.read(frame)) {
    CHECK(frame.size() == cv::Size(96, 64));
    ++frames;
  }
  CHECK(frames == 6);
  CHECK(annotated.get(cv::CAP_PROP_FPS) == Approx(10));
  std::ifstream lines(dir / "out" / "clip.jsonl");
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    CHECK(j["frame"] == n);
    CHECK(j.contains("detections"));
    ++n;
  }
  CHECK(n == 6);
}

TEST_CASE("tessera segment survives kill -9 at random moments: --resume ends byte-identical") {
  // Rounds of: start `segment --resume`, kill it with SIGKILL after a random delay, start it
  // again, until a run completes. The final tree must equal an uninterrupted run's, file for file
  // and byte for byte, with no temporary file left (outputs are fsynced, renamed, folder fsynced).
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  const fs::path dir = scratch() / "kill_resume";
  fs::remove_all(dir);
  fs::create_directories(dir / "in");
  const cv::Mat photo = cv::imread(fixture("preprocess/photos/chelsea.png"));
  REQUIRE(!photo.empty());
  for (int i = 0; i < 24; ++i) {
    cv::Mat img;
    cv::resize(photo(cv::Rect(i * 5, i * 3, 200, 150)), img, cv::Size(64 + 8 * (i % 3), 48 + 8 * (i % 2)));
    cv::imwrite((dir / "in" / ("img" + std::to_string(100 + i) + ".png")).string(), img);
  }
  const std::string model = fixture("conformance/segmenter-mask-rand");
  const std::string args = " segment --model " + model + " --color --threads 1 --batch 1 " + (dir / "in").string();
  REQUIRE(run_cli(args.substr(1) + " --out " + (dir / "ref").string()).code == 0);
  auto listing = [](const fs::path& root) {
    std::map<std::string, std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(root))
      if (e.is_regular_file()) files[e.path().lexically_relative(root).string()] = slurp(e.path());
    return files;
  };
  const auto reference = listing(dir / "ref");
  REQUIRE(reference.size() == 48);  // a label map and a colour map per image
  std::mt19937 rng(20261206);
  std::uniform_int_distribution<int> delay_ms(10, 200);
  int kills = 0;
  const char* rounds_env = std::getenv("TESSERA_KILL_ROUNDS");  // 20 in CI; more by hand
  const int rounds = rounds_env ? std::max(1, std::atoi(rounds_env)) : 20;
  for (int round = 0; round < rounds; ++round) {
    const fs::path out = dir / ("run" + std::to_string(round));
    for (int attempt = 0;; ++attempt) {
      // After 8 kills a run is left to finish.
      const std::string kill = attempt < 8 ? "timeout -s KILL " + std::to_string(delay_ms(rng) / 1000.0) + " " : "";
      const int status = std::system((kill + cli + args + " --resume --out " + out.string() + " >/dev/null 2>&1").c_str());
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) break;
      REQUIRE(WIFEXITED(status));
      REQUIRE(WEXITSTATUS(status) == 137);  // killed by timeout's SIGKILL, nothing else
      ++kills;
    }
    INFO("round " << round);
    CHECK(listing(out) == reference);
  }
  CHECK(kills >= rounds);  // the runs were really interrupted, many times
  std::printf("kill-resume: %d rounds, %d runs killed, every final tree byte-identical\n", rounds, kills);
  fs::remove_all(dir);
}

TEST_CASE("classify without --model uses the bundled classifier, and says which", "[cli]") {
  const fs::path root = scratch() / "bundled";
  fs::remove_all(root);
  fs::create_directories(root / "digits");
  for (const auto& e : fs::directory_iterator(fixture("conformance/vit-tiny-rand")))
    if (e.is_regular_file()) fs::copy_file(e.path(), root / "digits" / e.path().filename());
  const std::string image = fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png");
  const Run r = run_cli_env("TESSERA_MODELS=" + root.string(), "classify --top-k 2 " + image);
  INFO(r.err);
  CHECK(r.code == 0);
  CHECK(r.err.find("using the bundled classification model " + (root / "digits").string()) != std::string::npos);
  // The same answer as naming the folder.
  const Run named = run_cli("classify --top-k 2 --model " + (root / "digits").string() + " " + image);
  CHECK(named.out == r.out);
  fs::remove_all(root);
}

TEST_CASE("inputs: a quoted glob expands to its matches (sorted), one that matches nothing is reported", "[cli]") {
  const fs::path dir = scratch() / "glob";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string src = fixture("conformance/vit-tiny-rand/cases/e2e/images/");
  fs::copy_file(src + "0_chelsea.png", dir / "b.png");
  fs::copy_file(src + "1_coffee.png", dir / "a.png");
  const std::string vit = fixture("conformance/vit-tiny-rand");
  const Run globbed = run_cli("classify --top-k 2 --model " + vit + " '" + (dir / "*.png").string() + "'");
  const Run listed = run_cli("classify --top-k 2 --model " + vit + " " + (dir / "a.png").string() + " " +
                             (dir / "b.png").string());
  CHECK(globbed.code == 0);
  CHECK(globbed.out == listed.out);
  const Run none = run_cli("classify --model " + vit + " '" + (dir / "*.jpg").string() + "' " + (dir / "a.png").string());
  CHECK(none.code == 1);  // one input failed, the other answered
  CHECK(none.err.find("*.jpg") != std::string::npos);
  // features takes the same input options (here --processor and --threads).
  std::ofstream(dir / "processor.json") << R"({"image_processor_type": "ViTImageProcessor", "do_resize": true,
    "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": true, "rescale_factor": 0.00392156862745098,
    "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})";
  const Run f = run_cli("features --model " + vit + " --processor " + (dir / "processor.json").string() + " --threads 1 --out " +
                        (dir / "f.safetensors").string() + " '" + (dir / "*.png").string() + "'");
  INFO(f.err);
  CHECK(f.code == 0);
  CHECK(fs::exists(dir / "f.safetensors"));
  // --batch: both images (one size after the processor) in one forward pass, the same features.
  const Run fb = run_cli("features --model " + vit + " --processor " + (dir / "processor.json").string() +
                         " --batch 2 --threads 2 --out " + (dir / "fb.safetensors").string() + " '" +
                         (dir / "*.png").string() + "'");
  CHECK(fb.code == 0);
  CHECK(slurp(dir / "fb.safetensors") == slurp(dir / "f.safetensors"));
  fs::remove_all(dir);
}
