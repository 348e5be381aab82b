#pragma once
// The fixture model folders every model-level test walks: tests/fixtures/{conformance, models,
// models/timm, conformance/timm}/*/ with a config.json, sorted, minus the names in `skip`.
#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

inline std::vector<std::filesystem::path> fixture_model_dirs(const std::set<std::string>& skip = {}) {
  std::vector<std::filesystem::path> dirs;
  for (const char* root : {"conformance", "models", "models/timm", "conformance/timm"}) {
    const std::filesystem::path r = std::filesystem::path(TESSERA_FIXTURES) / root;
    if (!std::filesystem::exists(r)) continue;
    for (const auto& e : std::filesystem::directory_iterator(r))
      if (std::filesystem::exists(e.path() / "config.json") && !skip.count(e.path().filename().string()))
        dirs.push_back(e.path());
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}
