#!/usr/bin/env bash
# Remakes docs/gallery/: pictures the tools draw, each written by the tool itself.
#  - the bundled digit classifier's training curves and attention rollouts on test cells;
#  - the bundled digit segmenter's overlays and colour maps on two test scenes;
#  - a detect overlay on a test scene drawn by the RANDOM-WEIGHT YOLOS conformance model (there is
#    no trained detector bundled yet): it shows the drawing (labels, colours), not a prediction.
#    docs/gallery/README.md captions it so.
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
"$tessera" segment --color --overlay --out "$work/segment" \
  assets/images/scenes/scene_000003.png assets/images/scenes/scene_000004.png > /dev/null 2>&1
for n in 3 4; do
  cp "$work/segment/scene_00000${n}_overlay.jpg" "$g/digits_segment_${n}_overlay.jpg"
  cp "$work/segment/scene_00000${n}_color.png" "$g/digits_segment_${n}_color.png"
done
rm -f "$g/random_segmenter_overlay.jpg"
ls -la "$g"
