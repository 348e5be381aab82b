#!/usr/bin/env bash
# Fuzzes every target in tests/fuzz with libFuzzer (the fuzz preset: clang, ASan + UBSan) for
# SECONDS each (default 60), JOBS processes at a time (default 1), and prints each target's
# executions. New inputs go to build-fuzz/corpus/<target>; crashes, hangs and out-of-memory inputs to
# build-fuzz/artifacts/ (fix the bug, then keep the input in tests/fuzz/regressions/<target>/).
#   scripts/fuzz.sh [SECONDS] [JOBS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
jobs=${2:-1}
shift $(( $# > 2 ? 2 : $# ))
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
[ -f build-fuzz/CMakeCache.txt ] || cmake --preset fuzz "${launcher[@]}" >/dev/null
cmake --build build-fuzz -j"$(nproc)" >/dev/null
mkdir -p build-fuzz/artifacts
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(cd tests/fuzz && ls fuzz_*.cpp | sed 's/^fuzz_//; s/\.cpp$//'))
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t"
  log="build-fuzz/fuzz-$t.log"
  seeds=("tests/fuzz/corpus/$t")
  [ -d "tests/fuzz/regressions/$t" ] && seeds+=("tests/fuzz/regressions/$t")
  # Run inside a per-target folder: with -jobs libFuzzer writes its fuzz-<n>.log files to the
  # working directory.
  run="build-fuzz/run-$t"
  rm -rf "$run" && mkdir -p "$run"
  set +e
  (cd "$run" && TESSERA_CACHE_DIR=off "../tests/fuzz/fuzz_$t" "../corpus/$t" "${seeds[@]/#/../../}" \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 -print_final_stats=1 \
    -jobs="$jobs" -workers="$jobs" -artifact_prefix="../artifacts/$t-") >"$log" 2>&1
  rc=$?
  set -e
  # With -jobs the workers' logs (fuzz-<n>.log) hold the counts, and the main log repeats them:
  # count one or the other, not both.
  if ls "$run"/fuzz-*.log >/dev/null 2>&1; then stats=("$run"/fuzz-*.log); else stats=("$log"); fi
  execs=$(cat "${stats[@]}" | grep "stat::number_of_executed_units" | awk '{s += $2} END {print s + 0}')
  echo "$t: exit $rc, $execs executions in ${seconds}s x $jobs job(s), corpus $(ls "build-fuzz/corpus/$t" | wc -l) inputs (log: $log)"
done
ls build-fuzz/artifacts 2>/dev/null | sed 's/^/artifact: /' || true
