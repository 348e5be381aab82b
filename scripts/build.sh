#!/usr/bin/env bash
# Configures and builds the release preset (-march=native) into build/.
set -euo pipefail
cd "$(dirname "$0")/.."
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
[ -f build/CMakeCache.txt ] || cmake --preset release "${launcher[@]}" >/dev/null
cmake --build build -j "$(nproc)"
