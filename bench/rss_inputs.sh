#!/usr/bin/env bash
# Resource bounds (issue 17): peak RSS of classify / detect / segment over N inputs (default
# 10,000) against the same command over the first N/10, on the conformance models. The inputs are
# small PNGs of several sizes (an @list repeating them), so every code path that could keep
# something per input (results, workspaces per shape, file names) runs N times. Prints one line
# per command: peak RSS over the first N/10 inputs, over all N, and the ratio (flat: <= 1.10).
#
#   bench/rss_inputs.sh [N] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
THREADS=${2:-2}
CLI=${TESSERA_CLI:-build/apps/tessera}
[ -x "$CLI" ] || { echo "build first (scripts/build.sh)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fx=tests/fixtures/conformance
# Four different images (two sizes each) as the pool the list repeats.
mkdir -p "$work/img"
i=0
for src in "$fx"/vit-tiny-rand/cases/e2e/images/*.png "$fx"/yolos-tiny-rand/cases/e2e/images/*; do
  [ -f "$src" ] || continue
  cp "$src" "$work/img/$i.${src##*.}"
  i=$((i + 1))
  [ $i -ge 4 ] && break
done
pool=("$work"/img/*)
# N distinct names (hard links to the pool), so that outputs named after inputs do not collide.
mkdir -p "$work/in"
for ((k = 0; k < N; k++)); do
  src=${pool[$((k % ${#pool[@]}))]}
  ln "$src" "$work/in/$k.${src##*.}"
done
make_list() {  # make_list COUNT FILE
  : > "$2"
  for ((k = 0; k < $1; k++)); do
    src=${pool[$((k % ${#pool[@]}))]}
    echo "$work/in/$k.${src##*.}" >> "$2"
  done
}
make_list "$N" "$work/all.txt"
make_list "$((N / 10))" "$work/first.txt"

peak() {  # peak LIST ARGS... -> peak RSS in KiB of "$CLI ARGS @LIST"
  local list=$1
  shift
  /usr/bin/time -f '%M' -o "$work/rss" "$CLI" "$@" "@$list" > /dev/null 2> "$work/err" || {
    echo "failed: $CLI $* @$list" >&2
    tail -3 "$work/err" >&2
    exit 1
  }
  cat "$work/rss"
}

printf '%-9s %12s %12s %7s\n' command "first $((N / 10))" "all $N" ratio
run() {  # run NAME ARGS...
  local name=$1
  shift
  local a b
  rm -rf "$work/seg"
  a=$(peak "$work/first.txt" "$@")
  rm -rf "$work/seg"
  b=$(peak "$work/all.txt" "$@")
  printf '%-9s %9.1f MB %9.1f MB %7.3f\n' "$name" "$(echo "$a / 1024" | bc -l)" "$(echo "$b / 1024" | bc -l)" \
    "$(echo "$b / $a" | bc -l)"
}
run classify classify --model "$fx/vit-tiny-rand" --threads "$THREADS" --batch 4
run detect detect --model "$fx/yolos-tiny-rand" --threads "$THREADS" --batch 4 --json "$work/det.json"
run segment segment --model "$fx/segmenter-linear-rand" --threads "$THREADS" --out "$work/seg"
