#!/usr/bin/env bash
# Quick start, step 1: install the dependencies, build, and run the three tools on the bundled
# models (all trained by Tessera, see assets/models/*/README.md) over the bundled samples
# (assets/images: test-split digit cells and scenes, handwriting no model trained on).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
tessera=./build/apps/tessera
out=out/quickstart
rm -rf "$out"
mkdir -p "$out"

echo
echo "== tessera classify assets/images/cells/        (the bundled digit classifier)"
"$tessera" classify --top-k 3 assets/images/cells/

echo
echo "== tessera detect --out $out/detect --json $out/detect/detections.json assets/images/scenes/"
"$tessera" detect --out "$out/detect" --json "$out/detect/detections.json" assets/images/scenes/

echo
echo "== tessera segment --out $out/segment --color --overlay assets/images/scenes/"
"$tessera" segment --out "$out/segment" --color --overlay assets/images/scenes/

echo
echo "Pictures to look at:"
echo "  $out/detect/    annotated scenes (boxes, digit and score) and detections.json (COCO results)"
echo "  $out/segment/   per scene: <name>.png (label map), <name>_color.png, <name>_overlay.jpg (with a legend)"
