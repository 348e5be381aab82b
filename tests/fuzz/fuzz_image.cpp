// Image decoding (every format OpenCV reads) and pre-processing to a small model input.
#include <span>

#include "fuzz_common.hpp"
#include "tessera/image.hpp"
#include "tessera/preprocess.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  fuzz::expect_ok_or_error([&] {
    const cv::Mat rgb = decode_image_rgb(std::span<const uint8_t>(data, size), "fuzz-input");
    static const PreprocessConfig cfg = parse_preprocess_config(
        R"({"do_resize": true, "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": true,
            "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})", "fuzz");
    preprocess(rgb, cfg);
  });
  return 0;
}
