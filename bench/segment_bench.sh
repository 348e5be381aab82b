#!/bin/bash
# Export speed and memory of `tessera segment`:
#  1. a ViT-S/16-sized Segmenter (random weights: D=384, 12 layers, 6 heads, mask transformer with
#     2 layers, 150 classes) on 512x512 JPEGs, images/s at 1 and 2 threads (median of RUNS runs);
#  2. peak RSS (/usr/bin/time -v) of an export of 1,000 and of 10,000 small images with the tiny
#     conformance model: bounded memory means the two peaks are about the same.
# Usage: bench/segment_bench.sh [BUILD_DIR] [WORK_DIR]    (needs /usr/bin/python3 with torch and PIL)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build}
WORK=${2:-/tmp/tessera-segment-bench}
TESSERA=$BUILD/apps/tessera
RUNS=${RUNS:-3}
IMAGES=${IMAGES:-8}
SMALL=${SMALL:-10000}
mkdir -p "$WORK"

/usr/bin/python3 - "$WORK" "$IMAGES" "$SMALL" "$ROOT" <<'PY'
import json, os, sys
work, n_images, n_small, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, os.path.join(root, "tests", "reference"))
import numpy as np
from PIL import Image
from make_segmenter_fixtures import random_sd, segm_config
from make_model_fixtures import save_safetensors, write_json
m = os.path.join(work, "vit-s16-mask-150")
if not os.path.exists(os.path.join(m, "model.safetensors")):
    cfg = segm_config(150, {"image_size": [512, 512], "patch_size": 16, "n_layers": 12, "d_model": 384,
                            "n_heads": 6, "d_ff": 1536, "distilled": False, "layer_norm_eps": 1e-5},
                      {"name": "mask_transformer", "n_layers": 2, "n_heads": 6, "d_model": 384, "d_ff": 1536,
                       "layer_norm_eps": 1e-5})
    os.makedirs(m, exist_ok=True)
    write_json(os.path.join(m, "config.json"), cfg)
    save_safetensors(os.path.join(m, "model.safetensors"), random_sd(cfg, 1))
    write_json(os.path.join(m, "preprocessor_config.json"),
               {"image_processor_type": "ViTImageProcessor", "do_resize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
rng = np.random.default_rng(0)
d = os.path.join(work, "images512")
os.makedirs(d, exist_ok=True)
for i in range(n_images):
    p = os.path.join(d, f"im{i:03d}.jpg")
    if not os.path.exists(p):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).resize((512, 512)).save(p, quality=90)
d = os.path.join(work, "small")
for i in range(n_small):
    p = os.path.join(d, f"{i // 1000:02d}", f"im{i:05d}.png")
    if not os.path.exists(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
PY

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for t in ${THREADS-1 2}; do
  rates=()
  for r in $(seq "$RUNS"); do
    rm -rf "$WORK/out512"
    line=$("$TESSERA" segment --model "$WORK/vit-s16-mask-150" --out "$WORK/out512" --threads "$t" --batch 2 \
           "$WORK/images512" 2>&1 | tail -1)
    rates+=("$(echo "$line" | sed -E 's/.* ([0-9.]+) images\/s.*/\1/')")
  done
  echo "vit-s16 mask-transformer 150 classes, 512x512, threads $t: ${rates[*]} images/s, median $(printf '%s\n' "${rates[@]}" | median)"
done

conf="$ROOT/tests/fixtures/conformance/segmenter-mask-rand"
small_model="$WORK/tiny-mask"
mkdir -p "$small_model"
cp "$conf/config.json" "$conf/model.safetensors" "$small_model/"
echo '{"image_processor_type": "ViTImageProcessor", "do_resize": false, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}' > "$small_model/preprocessor_config.json"
find "$WORK/small" -name '*.png' | sort > "$WORK/listall.txt"
sed -n 1,1000p "$WORK/listall.txt" > "$WORK/list1000.txt"
for list in list1000 listall; do
  rm -rf "$WORK/outsmall"
  n=$(wc -l < "$WORK/$list.txt")
  /usr/bin/time -v "$TESSERA" segment --model "$small_model" --out "$WORK/outsmall" --threads 2 --batch 8 \
      --color --fractions f.csv "@$WORK/$list.txt" 2> "$WORK/time-$list.txt" || true
  rss=$(grep 'Maximum resident' "$WORK/time-$list.txt" | awk '{print $NF}')
  echo "tiny mask model, $n inputs of 64x48 (+ colour maps, fractions): peak RSS $((rss / 1024)) MiB; $(grep 'tessera segment:' "$WORK/time-$list.txt" | tail -1)"
done
