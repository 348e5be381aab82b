#!/usr/bin/env bash
# --freeze-encoder throughput (issue 14): a linear probe on a DINOv2-S-sized encoder (random
# weights: hidden 384, 12 layers, 6 heads, patch 14, 224x224; no checkpoint can be downloaded
# here, and speed does not depend on the values) over 1,000 images, each encoded once and cached.
# Prints the run's output; the images/s of the encoding pass is 1,000 / its seconds.
#   bench/frozen_probe.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
T=build/apps/tessera
/usr/bin/python3 - "$tmp" <<'PY'
import os, sys
sys.path.insert(0, "tests/reference")
import make_model_fixtures as mm
out = sys.argv[1]
cfg = mm.hf_config("dinov2", "Dinov2ForImageClassification", num_labels=2, hidden_size=384, num_attention_heads=6,
                   num_hidden_layers=12, patch_size=14, image_size=224)
d = mm.write_model(out, "dinov2-s-random", cfg, mm.random_state_dict(mm.hf_shapes(cfg), 1))
mm.write_json(os.path.join(d, "preprocessor_config.json"), {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True})
PY
# 1,000 photos-like images: digit scenes, split into two classes by parity.
$T data scenes --split train --count 1000 --seed 3 --out "$tmp/scenes" >/dev/null
mkdir -p "$tmp/folder/even" "$tmp/folder/odd"
i=0
for f in "$tmp"/scenes/images/*.png; do
  if [ $((i % 2)) -eq 0 ]; then mv "$f" "$tmp/folder/even/"; else mv "$f" "$tmp/folder/odd/"; fi
  i=$((i + 1))
done
start=$(date +%s.%N)
$T train --task classify --data "$tmp/folder" --init "$tmp/dinov2-s-random" --freeze-encoder --epochs 10 --batch 50 \
  --lr 1e-3 --threads "$threads" --out "$tmp/probe"
end=$(date +%s.%N)
echo "whole run (1,000 images encoded once, 10 epochs of the probe, the export check): $(echo "$end - $start" | bc) s"
