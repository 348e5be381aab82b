#!/usr/bin/env bash
# Quick start, step 1: install dependencies, build, and classify the bundled sample photos with
# the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
echo
echo "== tessera classify --model assets/models/default assets/images/"
./build/apps/tessera classify --model assets/models/default --top-k 3 assets/images/
