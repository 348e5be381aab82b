// config.json / preprocessor_config.json / timm pretrained_cfg: the first byte picks which file the
// rest is; the model folder around it is a small valid ViT (tests/fixtures/conformance/vit-tiny-rand).
#include "fuzz_common.hpp"
#include "tessera/model.hpp"
#include "tessera/preprocess.hpp"

#ifndef TESSERA_FIXTURES
#error "TESSERA_FIXTURES must name tests/fixtures"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 3) {
    case 0: fuzz::expect_ok_or_error([&] { parse_preprocess_config(text, "preprocessor_config.json"); }); break;
    case 1: fuzz::expect_ok_or_error([&] { from_timm_pretrained_cfg(text, "config.json"); }); break;
    default: {
      namespace fs = std::filesystem;
      const fs::path dir = fuzz::scratch() / "model";
      fs::create_directories(dir);
      const fs::path weights = dir / "model.safetensors";
      std::error_code ec;
      if (!fs::exists(weights, ec))
        fs::copy_file(fs::path(TESSERA_FIXTURES) / "conformance/vit-tiny-rand/model.safetensors", weights, ec);
      fuzz::write_file("model/config.json", data + 1, size - 1);
      fuzz::expect_ok_or_error([&] { load_model(dir.string()); });
    }
  }
  return 0;
}
