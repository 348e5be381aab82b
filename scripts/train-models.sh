#!/usr/bin/env bash
# Trains the bundled models (assets/models/*) and remakes the sample inputs (assets/images), all
# from OpenCV's handwritten digits (Debian: opencv-doc), each with the one command its model card
# names, then measures each on the test split in fp32, bf16 and int8 (tessera eval) and writes
# those numbers into its card. Every seed is fixed: the weights come out the same for any thread
# count on the same build; only the times change.
#
#   scripts/train-models.sh [all|samples|classifier|detector|segmenter]
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
  "$tessera" train --task classify --data digits:train --val digits:test --arch vit-digits \
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

case "$what" in
  all) samples; classifier ;;
  samples) samples ;;
  classifier) classifier ;;
  *) echo "usage: scripts/train-models.sh [all|samples|classifier|detector|segmenter]" >&2; exit 2 ;;
esac
