#!/usr/bin/env bash
# Remakes docs/gallery/: pictures the tools draw, each written by the tool itself.
#  - the bundled digit classifier's training curves and attention rollouts on test cells;
#  - the bundled digit segmenter's overlays and colour maps on two test scenes;
#  - the bundled digit detector's boxes (`detect`, its folder's NMS) on the scenes 2 and 4 (the larger ones);
#    docs/gallery/README.md captions what it finds and what it misses.
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
"$tessera" detect --out "$work/detect" assets/images/scenes/scene_000002.png \
  assets/images/scenes/scene_000004.png > /dev/null 2>&1
for n in 2 4; do cp "$work/detect/scene_00000${n}.png" "$g/digits_detect_${n}.png"; done
rm -f "$g/random_yolos_detect.png"
"$tessera" segment --color --overlay --out "$work/segment" \
  assets/images/scenes/scene_000003.png assets/images/scenes/scene_000004.png > /dev/null 2>&1
for n in 3 4; do
  cp "$work/segment/scene_00000${n}_overlay.jpg" "$g/digits_segment_${n}_overlay.jpg"
  cp "$work/segment/scene_00000${n}_color.png" "$g/digits_segment_${n}_color.png"
done
rm -f "$g/random_segmenter_overlay.jpg"
ls -la "$g"
