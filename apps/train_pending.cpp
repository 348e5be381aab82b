// --task detect before its training pass lands (train_detect.cpp replaces this file): a clear
// error, not a pretend run.
#include "tessera/error.hpp"
#include "train_args.hpp"

namespace tessera::cli {
int train_detect(const TrainArgs&) { fail("train --task detect: the YOLOS training pass is not in this build yet"); }
}  // namespace tessera::cli
