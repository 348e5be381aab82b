#!/usr/bin/env bash
# Remakes docs/gallery/: pictures the tools draw, each written by the tool itself.
#  - the bundled digit classifier's training curves and attention rollouts on test cells;
#  - detect and segment overlays on a test scene drawn by the RANDOM-WEIGHT conformance models
#    (there is no trained detector or segmenter bundled yet): they show the drawing (labels,
#    colours, legend), not a prediction. docs/gallery/README.md captions them so.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/apps/tessera ] || scripts/build.sh
tessera=./build/apps/tessera
g=docs/gallery
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$g"
cp assets/models/digits/curves.png "$g/digits_curves.png"
for d in 3 5 8; do
  "$tessera" classify --top-k 1 --attention "$g/digits_attention_$d.png" "assets/images/cells/digit_${d}_0.png" > /dev/null 2>&1
done
fx=tests/fixtures/conformance
"$tessera" detect --model "$fx/yolos-tiny-rand" --threshold 0.0 --top-k 5 --out "$work/detect" \
  assets/images/scenes/scene_000001.png > /dev/null
cp "$work/detect/scene_000001.png" "$g/random_yolos_detect.png"
"$tessera" segment --model "$fx/segmenter-linear-rand" --overlay --out "$work/segment" \
  assets/images/scenes/scene_000001.png > /dev/null
cp "$work/segment/scene_000001_overlay.jpg" "$g/random_segmenter_overlay.jpg"
ls -la "$g"
