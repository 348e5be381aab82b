#pragma once
// What the tests that run the tessera command line share: reading a file whole, a scratch folder
// per test program, and running "$TESSERA_CLI ARGS" with its exit code, stdout and stderr.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "tessera/safetensors.hpp"

namespace tessera::test {

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// TMP/tessera_<prefix>_<pid>/<name>, empty.
inline std::filesystem::path scratch_dir(const std::string& prefix, const std::string& name) {
  const auto p = std::filesystem::temp_directory_path() / ("tessera_" + prefix + "_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

struct CliRun {
  int code;  // the exit status, -1 if the command did not exit normally
  std::string out, err;
};

// Runs `env` (e.g. "TESSERA_ISA=avx2", or a prefix such as "timeout 120") then the CLI with `args`
// through the shell.
inline CliRun run_cli(const std::string& args, const std::string& env = "") {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  static std::atomic<int> counter{0};
  const auto dir = scratch_dir("run", std::to_string(counter++));
  const std::string cmd = (env.empty() ? "" : env + " ") + cli + " " + args + " >" + (dir / "out").string() + " 2>" +
                          (dir / "err").string();
  const int status = std::system(cmd.c_str());
  CliRun r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir / "out"), slurp(dir / "err")};
  std::filesystem::remove_all(dir);
  return r;
}

// --freeze-encoder's promise, between a model folder and the one trained from it: every tensor
// whose name starts with `encoder_prefix` is bit-identical (checked here); returns how many of
// those there were and how many of the others changed.
struct FrozenCount {
  int same = 0, changed = 0;
};
inline FrozenCount check_frozen(const std::filesystem::path& before, const std::filesystem::path& after,
                                const std::string& encoder_prefix) {
  const SafeTensors a = SafeTensors::open((before / "model.safetensors").string());
  const SafeTensors b = SafeTensors::open((after / "model.safetensors").string());
  FrozenCount n;
  for (const std::string& name : a.names()) {
    const Tensor x = a.read(name), y = b.read(name);
    const bool equal = std::equal(x.data(), x.data() + x.numel(), y.data());
    if (name.rfind(encoder_prefix, 0) == 0) {
      INFO(name);
      CHECK(equal);
      ++n.same;
    } else {
      n.changed += !equal;
    }
  }
  return n;
}

}  // namespace tessera::test
