// --task segment before its training pass lands (train_segment.cpp replaces this file): a clear
// error, not a pretend run. (--task detect: train_detect.cpp.)
#include "tessera/error.hpp"
#include "train_args.hpp"

namespace tessera::cli {
int train_segment(const TrainArgs&) { fail("train --task segment: the Segmenter training pass is not in this build yet"); }
}  // namespace tessera::cli
