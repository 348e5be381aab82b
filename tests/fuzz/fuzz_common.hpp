#pragma once
// Shared by the fuzz targets. Each target defines LLVMFuzzerTestOneInput: under the `fuzz` preset
// (clang, -fsanitize=fuzzer,address,undefined) libFuzzer drives it; in every other build
// regress_main.cpp drives it over the committed corpus and regression inputs, as a ctest.
// A target fails only by crashing, hanging, leaking or tripping a sanitizer: a tessera::Error is
// the expected answer to a bad input, any other exception escaping is a bug (it aborts).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>

#include "tessera/error.hpp"

namespace tessera::fuzz {

// A private scratch folder per process (fuzzers run several processes with -jobs).
inline const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    auto p = std::filesystem::temp_directory_path() / ("tessera_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(p);
    return p;
  }();
  return dir;
}

inline std::filesystem::path write_file(const std::string& name, const uint8_t* data, size_t size) {
  const auto path = scratch() / name;
  std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

// Runs f, accepting tessera::Error (a one-line refusal) as the right outcome.
template <class F>
void expect_ok_or_error(F&& f) {
  try {
    f();
  } catch (const tessera::Error& e) {
    const std::string m = e.what();
    if (m.empty() || m.find('\n') != std::string::npos) std::terminate();  // messages are one line
  }
}

}  // namespace tessera::fuzz
