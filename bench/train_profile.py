#!/usr/bin/python3
"""Where a `tessera train` step's time goes: runs the command under `perf record` (flat, sampled
self time; the release build has no frame pointers, so call chains are not used) and sums the
samples by the kernel they fall in.

  /usr/bin/python3 bench/train_profile.py [--freq 499] [--data perf.data] -- \\
      build/apps/tessera train --task classify --init DIR --data digits:train --out /tmp/p \\
      --max-steps 40 --batch 64 --no-augment --no-shuffle --threads 1

Buckets are by symbol name (self time, so a GEMM that attention calls counts as GEMM, and the
packing of a backward GEMM's operands as packing). Start-up (dynamic linking, reading the data),
the export and its check are in the profile too: they are the "start-up / other" rows; make the
run long enough (40+ steps) that they stay small. Use --report-only with --data to bucket an
existing perf.data.
"""
import argparse
import re
import subprocess
import sys

# (bucket, regex on the demangled symbol), first match wins.
BUCKETS = [
    ("GEMM micro-kernels (forward, dX, dW, attention's Q·Kᵀ / P·V)", r"micro_kernel|linear_task|gemm_detail::.*(kernel|tile)"),
    ("GEMM operand packing + driver (pack_linear / pack_rows / transpose_to_panel / linear)",
     r"pack_rows|transpose_to_panel|pack_linear|pack_int8|^tessera::linear\b"),
    ("backward transposes (Wᵀ, dYᵀ, Xᵀ for dX/dW; attention's P/dS)", r"\(anonymous namespace\)::transpose\(|gather_head|transpose_keys"),
    ("attention forward (softmax, scale, gather)", r"attention_forward|softmax"),
    ("attention backward (softmax backward, dS, accumulation)", r"attention_backward|head_scores"),
    ("GELU forward + backward (incl. erf, expf)", r"gelu|erf|__expf|expf"),
    ("layer norm forward + backward", r"layer_norm"),
    ("AdamW + gradient clipping", r"adamw|clip_grad|sgd_step|global_norm|grad_norm"),
    ("linear bias gradient / residual adds", r"linear_backward|add_scaled|add_rows|residual"),
    ("memset / memcpy (zeroing grads, copies)", r"memset|memmove|memcpy"),
    ("loss (cross-entropy)", r"cross_entropy|loss"),
    ("patch embedding / im2col", r"patch|im2col|col2im"),
    ("data (decode, resize, normalise, batch)", r"training_batch|classification_batch|preprocess|resize|cv::|png|inflate|zlib|normalize"),
    ("TBB scheduling / threading", r"tbb|parallel_for|RangeBody::RangeBody<.*parallel|sched_yield|futex|__lll|pthread"),
    ("start-up: dynamic linking", r"do_lookup|_dl_|dl_relocate|strcmp|check_match"),
]


def short(sym):
    """A readable name: a parallel body as its kernel's name, no template arguments."""
    s = sym.replace("(anonymous namespace)::", "")
    m = re.match(r"tessera::RangeBody::RangeBody<tessera::([\w:]+)\(", s)
    if m:
        return m.group(1) + " (parallel body)"
    s = re.sub(r"\(.*", "", s)
    return s.replace("tessera::", "").strip()[:60]


def report(data):
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol", "-g", "none",
                          "--stdio", "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), re.split(r"\s{3,}", m.group(4).strip())[0]))
    sums, top = {}, {}
    for pct, dso, kind, sym in rows:
        bucket = "kernel (page faults, scheduling)" if kind == "k" else None
        if bucket is None:
            for name, rx in BUCKETS:
                if re.search(rx, sym):
                    bucket = name
                    break
        bucket = bucket or "other (start-up, export, libstdc++ …)"
        sums[bucket] = sums.get(bucket, 0.0) + pct
        top.setdefault(bucket, []).append((pct, short(sym)))
    total = sum(sums.values())
    print("| where | share of samples | largest symbols |")
    print("|---|---|---|")
    for b, v in sorted(sums.items(), key=lambda kv: -kv[1]):
        syms = "; ".join("%s %.1f%%" % (s, p) for p, s in sorted(top[b], reverse=True)[:2])
        print("| %s | %.1f%% | %s |" % (b, 100 * v / total if total else 0, syms.replace("|", "/")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--freq", type=int, default=499)
    ap.add_argument("--data", default="/tmp/tessera-train.perf.data")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not a.report_only:
        if not cmd:
            ap.error("give the command after --")
        subprocess.run(["perf", "record", "-F", str(a.freq), "-o", a.data, "--"] + cmd, check=True,
                       stdout=sys.stderr)
    report(a.data)


if __name__ == "__main__":
    main()
