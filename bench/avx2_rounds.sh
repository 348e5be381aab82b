#!/bin/bash
# The AVX2 family's numbers on any x86-64 CPU (issue 18): the portable build (no -march=native,
# so nothing outside the kernels' own target attributes uses AVX-512) with dispatch capped at
# avx2. Each round: the GEMM rates and the AVX2 FMA peak, then ViT-B/16 at batch 1 and 8 in
# fp32, bf16 and int8, the dtypes' order rotated per round; on a CPU with AVX-VNNI, int8 twice:
# with vpdpbusd (the default) and without (TESSERA_AVXVNNI=off, "int8-novnni"). Prints one JSON
# line per process.
#   cmake --preset portable && cmake --build build-portable -j2 --target tessera
#   bench/avx2_rounds.sh [ROUNDS] [THREADS]
set -euo pipefail
tessera=${TESSERA:-build-portable/apps/tessera}
rounds=${1:-3}
threads=${2:-2}
dtypes=(fp32 bf16 int8)
grep -qw avx_vnni /proc/cpuinfo && dtypes+=(int8-novnni)
n=${#dtypes[@]}
for ((r = 0; r < rounds; ++r)); do
  for vnni in on off; do
    [ "$vnni" = off ] && [ "$n" = 3 ] && continue
    TESSERA_AVXVNNI=$vnni "$tessera" bench --gemm --isa avx2 --threads "$threads" --iterations 5 --json |
      python3 -c 'import json,sys; j=json.load(sys.stdin); print(json.dumps({"round": '"$r"', "avxvnni": "'"$vnni"'", "isa": j["isa"], "peak": j["fma_peak_gflops"], **{d["dtype"] + "-" + d["kernel"]: d["gflops"] for d in j["dtypes"]}}))'
  done
  for batch in 1 8; do
    for ((i = 0; i < n; ++i)); do
      d=${dtypes[$(((i + r) % n))]}
      vnni=on
      [ "$d" = int8-novnni ] && d=int8 vnni=off
      its=$([ "$batch" = 1 ] && echo 10 || echo 3)
      TESSERA_AVXVNNI=$vnni "$tessera" bench --arch vit-b16 --isa avx2 --threads "$threads" --batch "$batch" \
        --dtype "$d" --iterations "$its" --json |
        python3 -c 'import json,sys; j=json.load(sys.stdin); print(json.dumps({"round": '"$r"', "batch": j["batch"], "dtype": j["dtype"], "kernel": j["kernel"], "isa": j["isa"], "ms": j["ms_per_image_median"]}))'
    done
  done
done
