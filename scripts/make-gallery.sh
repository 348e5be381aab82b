#!/usr/bin/env bash
# Remakes docs/gallery/: what the three tools show with the bundled models on test-split scenes
# (handwriting no model trained on), each picture written by the tool itself, plus the training
# curves the trainer drew. docs/gallery/README.md captions them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/apps/tessera ] || scripts/build.sh
tessera=./build/apps/tessera
g=docs/gallery
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$g"
# Three test scenes of the README's evaluation seed, bigger than the quick start's.
"$tessera" data scenes --split test --count 3 --seed 7 --out "$work/scenes" > /dev/null
"$tessera" detect --out "$work/detect" "$work/scenes/images/" > /dev/null
"$tessera" segment --out "$work/segment" --overlay "$work/scenes/images/" > /dev/null
for i in 000000 000001 000002; do
  cp "$work/detect/$i.png" "$g/detect_$i.png"
  cp "$work/segment/${i}_overlay.jpg" "$g/segment_$i.jpg"
done
for m in digits digits-detector digits-segmenter; do
  cp "assets/models/$m/curves.png" "$g/curves_$m.png"
done
ls "$g"
