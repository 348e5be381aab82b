#!/usr/bin/python3
"""Every performance target of the issue, measured in one run, with the verdict beside each.

    /usr/bin/python3 bench/targets.py [--rounds 3] [--iterations 5] [--json OUT.json]

ViT-B/16 at 224, random weights (the torchvision folder bench/compare.py writes under --cache):

- fp32, 2 threads, batch 1 and 8: Tessera vs ONNX Runtime (>= 1.1x) and PyTorch eager
  (>= 1.4x), from bench/compare.py (same weights, alternating processes, medians);
- the model's GFLOP/s at 2 threads against `tessera bench --gemm`'s fp32 rate at 2 threads
  (>= 85%);
- bf16 (>= 1.8x) and int8 (>= 2.5x) against Tessera's own fp32, 2 threads, batch 1 and 8,
  alternating dtypes in every round;
- 2 threads against 1 at batch 8 (>= 1.85x);
- peak RSS at batch 1 fp32 (<= checkpoint bytes + 150 MB) and model load time (< 100 ms): a
  load that maps the packed-weight cache (written under --cache by a first load), with the
  load that packs from the checkpoint (TESSERA_CACHE_DIR=off) and both first forward passes
  beside it.

Each number is the median over rounds of each process's median; the machine's load average is
printed with the results, since a busy machine makes every ratio meaningless.
"""
import argparse, json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tessera_json(exe, args, env=None):
    out = subprocess.run([exe, "bench", *args, "--json"], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tessera-bench"))
    ap.add_argument("--tessera", default=os.path.join(ROOT, "build", "apps", "tessera"))
    ap.add_argument("--onnxruntime-node", default=os.environ.get("ONNXRUNTIME_NODE"))
    ap.add_argument("--json", metavar="OUT", help="also write every measurement to OUT")
    args = ap.parse_args()
    it = str(args.iterations)
    # Every Tessera process here (compare.py's too) uses this run's packed-weight cache.
    os.environ["TESSERA_CACHE_DIR"] = os.path.join(args.cache, "weights-cache")
    no_cache = dict(os.environ, TESSERA_CACHE_DIR="off")

    # 1. fp32 against PyTorch and ONNX Runtime (bench/compare.py also writes the model folder).
    cmd = [sys.executable, os.path.join(ROOT, "bench", "compare.py"), "--threads", "1", "2", "--batches", "1", "8",
           "--rounds", str(args.rounds), "--iterations", it, "--cache", args.cache, "--tessera", args.tessera,
           "--json"]
    if args.onnxruntime_node:
        cmd += ["--onnxruntime-node", args.onnxruntime_node]
    compare = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    model = os.path.join(args.cache, "vit-b16-224-torchvision")
    weight_mb = os.path.getsize(os.path.join(model, "model.safetensors")) / 1e6

    # 2. The machine's GEMM rate, and the three dtypes alternating, at 2 threads.
    gemm = {t: tessera_json(args.tessera, ["--gemm", "--dtype", "fp32", "--threads", str(t), "--iterations", it])
            for t in (1, 2)}
    runs = {(d, b): [] for d in ("fp32", "bf16", "int8") for b in (1, 8)}
    packing = []  # fp32 loads that pack from the checkpoint
    for d in ("fp32", "bf16", "int8"):  # write the cache (compare.py wrote fp32's already)
        tessera_json(args.tessera, ["--model", model, "--dtype", d, "--iterations", "1"])
    for _ in range(args.rounds):
        packing.append(tessera_json(args.tessera, ["--model", model, "--dtype", "fp32", "--threads", "2",
                                                   "--iterations", "1"], env=no_cache))
        for b in (1, 8):
            for d in ("fp32", "bf16", "int8"):
                runs[(d, b)].append(tessera_json(args.tessera, ["--model", model, "--dtype", d, "--batch", str(b),
                                                                "--threads", "2", "--iterations", it]))
    med = {k: statistics.median(r["ms_per_image_median"] for r in v) for k, v in runs.items()}
    load_ms = statistics.median(r["load_ms"] for r in runs[("fp32", 1)])
    hits = sum(r["weights_cache"] == "hit" for r in runs[("fp32", 1)])
    first_ms = statistics.median(r["first_forward_ms"] for r in runs[("fp32", 1)])
    pack_ms = statistics.median(r["load_ms"] for r in packing)
    pack_first_ms = statistics.median(r["first_forward_ms"] for r in packing)
    rss_mb = statistics.median(r["peak_rss_mb"] for r in runs[("fp32", 1)])
    gflop = runs[("fp32", 1)][0]["gflops"] * runs[("fp32", 1)][0]["ms_per_image_median"] / 1000

    rows = {(r["threads"], r["batch"]): r for r in compare["rows"]}
    checks = []
    for b in (1, 8):
        r = rows[(2, b)]
        checks.append((f"fp32 2 threads batch {b}: vs ONNX Runtime", ">= 1.10x", r["speedup_vs_onnxruntime"],
                       r["speedup_vs_onnxruntime"] >= 1.1,
                       f"{r['tessera_ms']:.1f} vs {r['onnxruntime_ms']:.1f} ms"))
        checks.append((f"fp32 2 threads batch {b}: vs PyTorch eager", ">= 1.40x", r["speedup_vs_pytorch"],
                       r["speedup_vs_pytorch"] >= 1.4, f"{r['tessera_ms']:.1f} vs {r['pytorch_ms']:.1f} ms"))
        share = gflop / (med[("fp32", b)] / 1000) / gemm[2]["gflops"]
        checks.append((f"fp32 2 threads batch {b}: share of the GEMM rate", ">= 85%", share, share >= 0.85,
                       f"{gflop / (med[('fp32', b)] / 1000):.0f} of {gemm[2]['gflops']:.0f} GFLOP/s"))
        for d, target in (("bf16", 1.8), ("int8", 2.5)):
            ratio = med[("fp32", b)] / med[(d, b)]
            checks.append((f"{d} 2 threads batch {b}: vs Tessera fp32", f">= {target:.2f}x", ratio, ratio >= target,
                           f"{med[(d, b)]:.1f} vs {med[('fp32', b)]:.1f} ms"))
    scaling = rows[(1, 8)]["tessera_ms"] / rows[(2, 8)]["tessera_ms"]
    checks.append(("fp32 batch 8: 2 threads vs 1", ">= 1.85x", scaling, scaling >= 1.85,
                   f"{rows[(1, 8)]['tessera_ms']:.1f} vs {rows[(2, 8)]['tessera_ms']:.1f} ms"))
    checks.append(("peak RSS, batch 1 fp32", f"<= {weight_mb + 150:.0f} MB", rss_mb, rss_mb <= weight_mb + 150,
                   f"checkpoint {weight_mb:.0f} MB + 150"))
    checks.append(("model load (packed-weight cache mapped), fp32", "< 100 ms", load_ms, load_ms < 100,
                   f"cache hit in {hits}/{len(runs[('fp32', 1)])}; first forward {first_ms:.0f} ms. "
                   f"Packing from the checkpoint: load {pack_ms:.0f} ms, first forward {pack_first_ms:.0f} ms"))

    load = os.getloadavg()[0]
    print(f"ViT-B/16 224, random weights; fp32 GEMM rate {gemm[1]['gflops']:.0f} (1 thread) / "
          f"{gemm[2]['gflops']:.0f} (2 threads) GFLOP/s; ONNX Runtime {compare['onnxruntime']}; "
          f"load average {load:.2f} at the end")
    print(f"{'target':<46} {'goal':>10} {'measured':>10}  {'met':<4} detail")
    for name, goal, value, ok, detail in checks:
        shown = f"{value:.0%}" if goal.endswith("%") else f"{value:.2f}x" if goal.endswith("x") else f"{value:.0f}"
        print(f"{name:<46} {goal:>10} {shown:>10}  {'yes' if ok else 'NO':<4} {detail}")
    print("\nfp32 against PyTorch and ONNX Runtime (ms per image):")
    for r in compare["rows"]:
        print(f"  {r['threads']} threads batch {r['batch']}: Tessera {r['tessera_ms']:.1f}, PyTorch {r['pytorch_ms']:.1f}, "
              f"ONNX Runtime {r['onnxruntime_ms']:.1f} (load avg {r['load_average_1min']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compare": compare, "gemm": gemm, "dtype_runs": {f"{d}-b{b}": v for (d, b), v in runs.items()},
                       "checks": [dict(zip(("target", "goal", "measured", "met", "detail"), c)) for c in checks],
                       "packing_loads": packing, "load_average_1min_at_end": load}, f, indent=1)


if __name__ == "__main__":
    main()
