#!/usr/bin/env bash
# Data-parallel scaling of tessera train on one machine: the digits ViT (vit-digits: 20x20, patch 4,
# D 64, 6 layers), AdamW, global batch 64, 300 steps on the tutorial training cells, as
#   1 process x 1 thread, 2 MPI ranks x 1 thread, 1 process x 2 threads,
# alternating, ROUNDS rounds; prints each run's training images/s (steps x batch / the log's
# summed step time) and the median per configuration.
#   bench/mpi_scaling.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
T=build/apps/tessera
rounds=${1:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common="train --task classify --data digits:train --arch vit-digits --batch 64 --max-steps 300 --lr 2e-3 --seed 0"
rate() {  # images/s over steps 11..300 from log.csv (its images_per_s column is per step)
  awk -F, 'NR > 11 { n += 64; t += 64 / $6 } END { printf "%.0f", n / t }' "$1/log.csv"
}
declare -A all
for r in $(seq "$rounds"); do
  for cfg in 1x1 2x1 1x2; do
    out="$tmp/$cfg-$r"
    case $cfg in
      1x1) $T $common --threads 1 --out "$out" >/dev/null 2>&1 ;;
      2x1) mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 $T $common --threads 1 --out "$out" >/dev/null 2>&1 ;;
      1x2) $T $common --threads 2 --out "$out" >/dev/null 2>&1 ;;
    esac
    v=$(rate "$out")
    all[$cfg]="${all[$cfg]:-} $v"
    echo "round $r  $cfg (ranks x threads): $v images/s"
  done
done
for cfg in 1x1 2x1 1x2; do
  med=$(echo ${all[$cfg]} | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "median $cfg: $med images/s"
done
