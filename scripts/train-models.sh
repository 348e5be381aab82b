#!/usr/bin/env bash
# Trains the bundled models (assets/models/*) and remakes the sample inputs (assets/images), all
# from OpenCV's handwritten digits (Debian: opencv-doc), each with the one command its model card
# names, then measures each on the test split in fp32, bf16 and int8 (tessera eval) and writes
# those numbers into its card. Every seed is fixed: the weights come out the same for any thread
# count on the same build; only the times change.
#
#   scripts/train-models.sh [all|samples|classifier|detector|segmenter]
#
# Bundled today: the digit classifier (assets/models/digits, 97.80% on the test cells). The
# detector and segmenter recipes below do NOT reach issue 15's targets yet (from scratch, on a
# shared 2-core machine, the YOLOS run stayed on the set loss's "mean box" plateau: AP50 0.0001;
# the Segmenter runs find the ink (background IoU 0.98) but not which digit: mIoU 0.17), so they train
# into out/candidates/ and are evaluated there, never into assets/models/.
#
# Needs build/apps/tessera (scripts/build.sh). Scenes are drawn into out/data (TESSERA_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/apps/tessera ] || scripts/build.sh
tessera=./build/apps/tessera
threads=${TESSERA_NUM_THREADS:-$(nproc)}
data=${TESSERA_DATA:-out/data}
what=${1:-all}

# json_number FILE KEY: a number from tessera eval's JSON.
json_number() { grep -o "\"$2\": *[-0-9.eE+]*" "$1" | head -1 | sed 's/.*: *//'; }

# accuracy_table MODEL DATA KEY... : a Markdown table of tessera eval in fp32, bf16 and int8.
accuracy_table() {
  local model=$1 evaldata=$2
  shift 2
  local tmp
  tmp=$(mktemp)
  echo "| weights | $(printf '%s | ' "$@")"
  echo "|---|$(printf -- '---|%.0s' "$@")"
  for dtype in fp32 bf16 int8; do
    "$tessera" eval --model "$model" --data "$evaldata" --dtype "$dtype" --threads "$threads" --json "$tmp" > /dev/null
    local row="| $dtype |"
    for key in "$@"; do row="$row $(printf '%.4f' "$(json_number "$tmp" "$key")") |"; done
    echo "$row"
  done
  rm -f "$tmp"
}

samples() {
  "$tessera" data cells --split test --per-class 1 --scale 3 --out assets/images/cells
  rm -rf "$data/samples"
  "$tessera" data scenes --split test --count 6 --seed 100 --out "$data/samples" --threads "$threads"
  mkdir -p assets/images/scenes
  for f in "$data"/samples/images/*.png; do cp "$f" "assets/images/scenes/scene_$(basename "$f")"; done
}

classifier() {
  local out=assets/models/digits
  rm -rf "$out"
  "$tessera" train --task classify --data digits:train --val digits:test --arch vit-digits --layers 6 \
    --epochs 150 --batch 64 --lr 2e-3 --warmup 300 --label-smoothing 0.1 --elastic 0.12 --seed 0 \
    --out "$out" --threads "$threads"
  {
    echo
    echo "## Accuracy on the 2,500 tutorial test cells (\`tessera eval --data digits:test\`)"
    echo
    accuracy_table "$out" digits:test top1 top5
    echo
    echo "Anchors on the same split (issue 15): kNN 91.8%, deskew + HOG + RBF SVM 96.8% (OpenCV's own"
    echo "samples), a PyTorch ViT trained from scratch 95.1%."
    echo
    echo "## Limits"
    echo
    echo "- Ten classes, the digits 0-9, and nothing else: every image gets one of them, including images"
    echo "  of no digit."
    echo "- Trained on 2,500 cells of one sheet (20x20, centred, white on black). Dark-on-light digits must"
    echo "  be inverted first; a photo needs the digit cropped and centred. The test cells come from the"
    echo "  same sheet, so the accuracy above is in-distribution."
  } >> "$out/README.md"
}

scenes() {  # scenes SPLIT COUNT SEED: DIR of the scenes, drawn once
  local dir="$data/$1-$2-seed$3"
  [ -f "$dir/annotations.json" ] || "$tessera" data scenes --split "$1" --count "$2" --seed "$3" --out "$dir" --threads "$threads" >&2
  echo "$dir"
}

detector() {  # a candidate: does not reach the targets yet (see the top of this file)
  local train test out=out/candidates/digits-detector
  train=$(scenes train 6000 1)
  test=$(scenes test 500 0)
  rm -rf "$out"
  "$tessera" train --task detect --data "$train/annotations.json" --out "$out" \
    --arch yolos-digits --image-size 128 --batch 8 --max-steps 3000 --lr 7e-4 --min-lr 1e-5 --warmup 150 \
    --weight-decay 0.05 --clip-grad 1 --checkpoint-every 500 --seed 1 --threads "$threads"
  accuracy_table "$out" "$test/annotations.json" mAP AP50 AP75
}

segmenter() {  # a candidate: does not reach the targets yet (see the top of this file)
  local train test out=out/candidates/digits-segmenter
  train=$(scenes train 6000 1)
  test=$(scenes test 200 0)
  rm -rf "$out"
  # 64x64 crops at the scenes' own resolution, sliding windows at inference; the encoder starts
  # from the bundled digit classifier (12 minutes here: mIoU 0.17, background 0.98).
  "$tessera" train --task segment --data "$train" --init assets/models/digits --crops --image-size 64 \
    --batch 8 --max-steps 3000 --lr 1e-3 --warmup 200 --min-lr 1e-5 --seed 1 \
    --out "$out" --threads "$threads"
  accuracy_table "$out" "$test" mIoU pixel_accuracy
}

case "$what" in
  all) samples; classifier ;;
  samples) samples ;;
  classifier) classifier ;;
  detector) detector ;;
  segmenter) segmenter ;;
  *) echo "usage: scripts/train-models.sh [all|samples|classifier|detector|segmenter]" >&2; exit 2 ;;
esac
