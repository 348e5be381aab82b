#!/usr/bin/env bash
# Reproduces the bundled default model (assets/models/default) and the sample images
# (assets/images/digit_*.png: the first hold-out cell of each class, 3x enlarged) from OpenCV's
# handwritten digits. Every seed is fixed and the minibatch is cut into fixed slices whose
# gradients are summed in order, so the weights come out the same for any --threads (on the same
# build); only the timing in the model card changes.
#
# Needs build/apps/tessera (scripts/build.sh) and OpenCV's digits.png (Debian: opencv-doc).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/apps/tessera ] || scripts/build.sh
exec ./build/apps/tessera train --data digits \
  --digits-png /usr/share/doc/opencv-doc/examples/data/digits.png \
  --out assets/models/default --samples assets/images \
  --image-size 20 --patch-size 4 --hidden-size 64 --layers 4 --heads 4 --mlp 256 \
  --epochs 40 --batch 32 --lr 0.002 --warmup 2 --weight-decay 0.05 --seed 1 --split-seed 0 \
  --threads "${TESSERA_NUM_THREADS:-$(nproc)}"
