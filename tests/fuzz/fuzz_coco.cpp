// COCO instances JSON (the detection data loader) and its conversion to training targets.
#include "fuzz_common.hpp"
#include "tessera/datasets.hpp"
#include "tessera/metrics.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tessera;
  const auto path = fuzz::write_file("coco/annotations.json", data, size);
  fuzz::expect_ok_or_error([&] {
    const CocoDataset coco = load_coco_instances(path.string());
    size_t n = 0;
    for (const CocoImage& im : coco.images) {
      if (++n > 64) break;
      coco_detection_target(coco, im.id);
    }
  });
  return 0;
}
