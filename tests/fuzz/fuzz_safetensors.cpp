// The safetensors reader: a single file, or (input starting with '{') a sharded index, whose shard
// names resolve next to it (earlier inputs leave a model.safetensors there).
#include "fuzz_common.hpp"
#include "tessera/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  const bool as_index = size > 0 && data[0] == '{';
  const auto path = fuzz::write_file(as_index ? "st/model.safetensors.index.json" : "st/model.safetensors", data, size);
  fuzz::expect_ok_or_error([&] {
    const SafeTensors st = SafeTensors::open(path.string());
    int64_t read = 0;
    for (const std::string& name : st.names()) {
      if (++read > 64) break;
      const Tensor t = st.get(name);
      volatile float sink = t.numel() ? t[0] : 0.0f;
      (void)sink;
    }
  });
  return 0;
}
