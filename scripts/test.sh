#!/usr/bin/env bash
# Quick start, step 2: build (if needed) and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
