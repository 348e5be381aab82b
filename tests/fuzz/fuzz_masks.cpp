// Segmentation masks (the segmentation data loader): the input is the mask PNG of a one-image
// folder whose image is a valid 16x12 picture.
#include <opencv2/imgcodecs.hpp>

#include "fuzz_common.hpp"
#include "tessera/datasets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  namespace fs = std::filesystem;
  const fs::path dir = fuzz::scratch() / "seg";
  std::error_code ec;
  if (!fs::exists(dir / "images" / "a.png", ec)) {
    fs::create_directories(dir / "images");
    cv::imwrite((dir / "images" / "a.png").string(), cv::Mat(12, 16, CV_8UC3, cv::Scalar(10, 20, 30)));
  }
  fuzz::write_file("seg/masks/a.png", data, size);
  fuzz::expect_ok_or_error([&] { load_segmentation_folder(dir.string(), 11); });
  return 0;
}
