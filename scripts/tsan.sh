#!/usr/bin/env bash
# ThreadSanitizer run of the parallel code, with oneTBB itself built under TSan.
#
#   scripts/tsan.sh            # the parallel tests (see `tests` below)
#   scripts/tsan.sh --all      # the whole suite
#   scripts/tsan.sh -R REGEX   # any ctest selection
#
# Debian's libtbb is not built with -fsanitize=thread, so TSan cannot see the synchronisation inside
# it and reports every task hand-off as a race. This script builds the same oneTBB that Debian 12
# ships (source package onetbb 2021.8.0-2+deb12u1: upstream tarball + Debian's patches, checked
# against pinned SHA-256 sums) with TBB_SANITIZE=thread into build-tsan-deps/ (once; ~10 minutes on
# 2 cores), builds Tessera's `tsan` preset against it and runs ctest with halt_on_error, so the
# first report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
deps=$root/build-tsan-deps
tbb_version=2021.8.0
debian_rev=2+deb12u1
pool=http://deb.debian.org/debian/pool/main/o/onetbb
orig=onetbb_${tbb_version}.orig.tar.xz
debian=onetbb_${tbb_version}-${debian_rev}.debian.tar.xz
orig_sha256=7e9111b8bb59c8800bf6d0b06afe7b0891937443d2dae1ee1101c8e2ede6a7ef
debian_sha256=b83a270205b38cdf66972fa1467c3e29493b88b92ecacf4f3672e87d67199df5
jobs=$(nproc)

if [ ! -f "$deps/install/lib/cmake/TBB/TBBConfig.cmake" ]; then
  mkdir -p "$deps/src"
  cd "$deps/src"
  for f in "$orig" "$debian"; do
    if [ ! -f "$f" ]; then curl -sSf -o "$f.part" "$pool/$f"; mv "$f.part" "$f"; fi
  done
  echo "$orig_sha256  $orig" | sha256sum -c --quiet
  echo "$debian_sha256  $debian" | sha256sum -c --quiet
  rm -rf "oneTBB-$tbb_version"
  tar xf "$orig"
  cd "oneTBB-$tbb_version"
  tar xf "../$debian"
  while read -r patch; do
    case "$patch" in ''|'#'*) continue ;; esac
    patch -s -p1 < "debian/patches/$patch"
  done < debian/patches/series
  # TBB_SANITIZE=thread adds -fsanitize=thread to every oneTBB target (and to its users through
  # the exported targets). tbbmalloc is left out: Tessera does not link it, and a sanitizer's
  # allocator must not be replaced.
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTBB_SANITIZE=thread \
    -DTBB_TEST=OFF -DTBB_EXAMPLES=OFF -DTBBMALLOC_BUILD=OFF -DTBB_STRICT=OFF \
    -DCMAKE_INSTALL_PREFIX="$deps/install" > "$deps/tbb-configure.log"
  cmake --build build -j "$jobs" > "$deps/tbb-build.log"
  cmake --install build > "$deps/tbb-install.log"
  cd "$root"
fi

cmake --preset tsan -DTBB_DIR="$deps/install/lib/cmake/TBB" > /dev/null
cmake --build --preset tsan -j "$jobs"
tbb_lib=$(ls "$deps"/install/lib/libtbb.so.* | head -1)
ldd build-tsan/tests/test_kernels | grep -q "$deps/install/lib/libtbb" || {
  echo "tsan.sh: build-tsan/tests/test_kernels does not load the TSan oneTBB ($tbb_lib)" >&2; exit 1; }

# The parallel code: the thread helper and GEMM task split (kernels, gemm), attention and the
# models (models, concurrency: 8 callers sharing models), the segment pipeline (segmentation), the
# training data pipeline and gradient slices (vit_train, backward, trainers).
tests='^(test_kernels|test_gemm|test_concurrency|test_models|test_segmentation|test_backward|test_vit_train|test_classify_trainer|test_segmenter_train|test_detect_trainer)$'
args=(-R "$tests")
if [ "${1:-}" = "--all" ]; then args=(); shift; fi
# OpenCV's own parallel loops run serially (tests/tsan/opencv_serial.cpp says why).
g++ -O1 -fPIC -shared $(pkg-config --cflags opencv4) tests/tsan/opencv_serial.cpp \
  $(pkg-config --libs-only-L opencv4) -lopencv_core -o build-tsan/opencv_serial.so
export LD_PRELOAD="$root/build-tsan/opencv_serial.so${LD_PRELOAD:+:$LD_PRELOAD}"
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$root/tests/tsan.supp ${TSAN_OPTIONS:-}"
ctest --test-dir build-tsan --output-on-failure -j 1 "${args[@]}" "$@"
