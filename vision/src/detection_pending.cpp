// TEMPORARY (branch view): the detectors are being written on branch `det`. Until that branch is
// merged, these definitions let the viewer link and say clearly that detection is missing.
// Delete this file when merging `det` (it defines the same symbols: the link fails loudly if both
// are present, never silently picks one).
#include "tessera/detection.hpp"
#include "tessera/error.hpp"

namespace tessera {

std::vector<Detection> post_process_detections(const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                               const std::vector<std::string>&, const PostProcessOptions&) {
  fail("detection post-processing is not built in this version (branch det not merged)");
}

std::vector<RawDetections> run_detector(const Model& model, const Preprocessor&, const std::vector<cv::Mat>&,
                                        ModelWorkspace&) {
  fail(model.dir + ": detectors are not built in this version (branch det not merged)");
}

}  // namespace tessera
