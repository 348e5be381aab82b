// Preloaded by scripts/tsan.sh into every test process: OpenCV's own parallel loops run serially.
//
// Debian's OpenCV runs its parallel loops (colour conversion while decoding, resize, addWeighted
// under the overlays) on oneTBB through inline TBB code compiled into libopencv_core, which is not
// instrumented. TSan then sees only half of each hand-off, and reports oneTBB's own bookkeeping
// (a worker reading a task_group_context on the caller's stack after the loop has ended; a worker
// joining OpenCV's arena) as racing with whatever the caller does next, Tessera's code included.
// With cv::setNumThreads(1) OpenCV runs each loop on the calling thread and never enters oneTBB,
// so every report left is about threads that Tessera (or oneTBB, instrumented) started.
//
// It also makes OpenCV create its matrix-expression singleton (what cv::Mat::zeros/ones/eye
// return goes through it) on the main thread first. OpenCV creates it lazily with double-checked
// locking on a plain `volatile` pointer, whose unlocked first read is in uninstrumented
// libopencv_core: when a worker creates it (tessera data scenes draws scenes in parallel) and the
// main thread then takes the unlocked path, TSan sees the main thread read an object a worker
// allocated with nothing ordering the two, and reports it from OpenCV's inline header code in
// Tessera's frames. That is OpenCV's lazy initialisation, benign on x86-64; creating the
// singleton up front removes it and nothing else.
//
// Constructors of a preloaded library run after those of the libraries it depends on, so
// OpenCV is initialised when this runs.
#include <opencv2/core.hpp>
#include <opencv2/core/utility.hpp>

namespace {
__attribute__((constructor)) void opencv_serial() {
  cv::setNumThreads(1);
  cv::Mat warm = cv::Mat::zeros(2, 2, CV_8UC1);
  warm = cv::Mat::ones(2, 2, CV_8UC1);
  warm = cv::Mat::eye(2, 2, CV_8UC1);
}
}  // namespace
