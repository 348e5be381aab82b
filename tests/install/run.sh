#!/usr/bin/env bash
# Installs the build into a temporary prefix, builds tests/install against it with
# find_package(tessera), and runs the README's example program on a fixture model.
set -euo pipefail
build=$1 source=$2
# The oneTBB the build used (scripts/tsan.sh builds against its own), so the consumer links the same.
tbb_dir=${3:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S "$source/tests/install" -B "$tmp/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" \
  -DCMAKE_BUILD_TYPE=Release ${tbb_dir:+-DTBB_DIR="$tbb_dir"} >/dev/null
cmake --build "$tmp/consumer" >/dev/null
model=$source/tests/fixtures/conformance/deit-tiny-distilled-rand
out=$("$tmp/consumer/classify_example" "$model" "$model/cases/e2e/images/0_chelsea.png" 2>/dev/null)
echo "$out"
[ "$(echo "$out" | wc -l)" -eq 5 ] || { echo "expected 5 lines"; exit 1; }
# The probabilities are those `tessera classify` prints for the same image.
cli=$("$build/apps/tessera" classify --model "$model" --top-k 5 "$model/cases/e2e/images/0_chelsea.png" 2>/dev/null | tail -n 5 | awk '{print $1, $2}')
[ "$out" = "$cli" ] || { echo "differs from tessera classify:"; echo "$cli"; exit 1; }
echo "installed package OK"
