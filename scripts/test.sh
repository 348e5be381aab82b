#!/usr/bin/env bash
# Quick start, step 2: build (if needed) and run every test.
#
#   scripts/test.sh          the release build (build/) and its suite
#   scripts/test.sh --asan   the same suite built with AddressSanitizer + UBSan (build-asan/);
#                            .ci/run runs both
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--asan" ]; then
  launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  [ -f build-asan/CMakeCache.txt ] || cmake --preset asan "${launcher[@]}" >/dev/null
  cmake --build build-asan -j "$(nproc)"
  # Any sanitizer report fails the test that produced it.
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
  ctest --test-dir build-asan --output-on-failure -j "$(nproc)"
  exit
fi
scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
