// --task detect and --task segment before their training passes land (train_detect.cpp,
// train_segment.cpp replace this file): a clear error, not a pretend run.
#include "tessera/error.hpp"
#include "train_args.hpp"

namespace tessera::cli {
int train_detect(const TrainArgs&) { fail("train --task detect: the YOLOS training pass is not in this build yet"); }
int train_segment(const TrainArgs&) { fail("train --task segment: the Segmenter training pass is not in this build yet"); }
}  // namespace tessera::cli
