#!/usr/bin/env bash
# The digit detector's recipe (issue 15): a YolosForObjectDetection trained from scratch by
# `tessera train --task detect` on 6,000 generated digit scenes (train split of OpenCV's digits,
# seed 1), evaluated on 500 test scenes (test split, seed 0) that no model saw. As it stands this
# recipe does NOT reach the targets (AP50 0.0001 after 49 min here, against >= 0.90: the run stays
# on the set loss's "mean box" plateau; see the candidate's card in assets/models/digits-detector),
# so nothing is bundled yet. Every seed is fixed and the gradients are summed in a fixed order, so the weights come out
# the same for any --threads on the same build; only the time in the model card changes.
#
# Needs build/apps/tessera (scripts/build.sh) and OpenCV's digits.png (Debian: opencv-doc).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/apps/tessera ] || scripts/build.sh
data="${TESSERA_SCENES:-build/scenes}"
threads="${TESSERA_NUM_THREADS:-2}"
[ -f "$data/train6000/annotations.json" ] || ./build/apps/tessera data scenes --split train --count 6000 --seed 1 --out "$data/train6000"
[ -f "$data/test500/annotations.json" ] || ./build/apps/tessera data scenes --split test --count 500 --seed 0 --out "$data/test500"
./build/apps/tessera train --task detect --data "$data/train6000/annotations.json" --out build/digits-detector \
  --arch yolos-digits --image-size 128 --batch 8 --max-steps 3000 --lr 7e-4 --min-lr 1e-5 --warmup 150 \
  --weight-decay 0.05 --clip-grad 1 --checkpoint-every 500 --seed 1 --threads "$threads"
for dtype in fp32 bf16 int8; do
  ./build/apps/tessera eval --model build/digits-detector --data "$data/test500/annotations.json" --dtype "$dtype" \
    --json "build/digits-detector/eval-$dtype.json" --threads "$threads"
done
