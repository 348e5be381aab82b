#!/usr/bin/env python3
"""Tessera vs PyTorch eager (and ONNX Runtime, when its native library is present) on the same
ViT weights, batch size and thread count, run alternately in one session; prints medians and ratios
(each ratio is the median over rounds of that round's ratio).

    /usr/bin/python3 bench/compare.py [--arch vit-b16] [--batches 1 8] [--threads 1 2] [--rounds 5]

The model is a torchvision VisionTransformer with random weights (seeded), written once as a
Tessera model folder (config.json + model.safetensors with torchvision's key names) under
--cache; Tessera loads that folder, PyTorch runs the same module. Each measurement is a fresh
process: `tessera bench --model DIR --json` for Tessera, this script's --torch-worker mode for
PyTorch (OPENBLAS_NUM_THREADS=T OMP_WAIT_POLICY=PASSIVE, so its thread pools do not fight), and
bench/ort_worker.js for ONNX Runtime: the same module exported once with torch.onnx.export (opset 14)
to DIR/model.onnx, run by the native libonnxruntime bundled in the npm package onnxruntime-node
(CPU provider, sequential execution, intraOpNumThreads=T). Install it outside the repository, or
in the git-ignored bench/node_modules:

    cd bench && npm install --ignore-scripts onnxruntime-node      # or: --onnxruntime-node DIR

--ignore-scripts skips the package's post-install step, which only fetches the CUDA provider.
"""
import argparse, json, os, statistics, struct, subprocess, sys, time

ARCHS = {  # hidden, layers, heads, mlp, patch
    "vit-ti16": (192, 12, 3, 768, 16),
    "vit-s16": (384, 12, 6, 1536, 16),
    "vit-b16": (768, 12, 12, 3072, 16),
    "vit-l16": (1024, 24, 16, 4096, 16),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_torch_model(arch, image_size):
    import torch, torchvision
    hidden, layers, heads, mlp, patch = ARCHS[arch]
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch, num_layers=layers,
                                             num_heads=heads, hidden_dim=hidden, mlp_dim=mlp, num_classes=1000)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.eval()


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().contiguous().float().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def ensure_model(cache, arch, image_size):
    d = os.path.join(cache, f"{arch}-{image_size}-torchvision")
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    os.makedirs(d, exist_ok=True)
    hidden, layers, heads, mlp, patch = ARCHS[arch]
    m = build_torch_model(arch, image_size)
    write_safetensors(os.path.join(d, "model.safetensors"), m.state_dict())
    cfg = {"architectures": ["torchvision.VisionTransformer"], "image_size": image_size, "patch_size": patch,
           "num_layers": layers, "num_heads": heads, "hidden_dim": hidden, "mlp_dim": mlp, "num_classes": 1000}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return d


def ensure_onnx(model_dir, arch, image_size):
    path = os.path.join(model_dir, "model.onnx")
    if os.path.exists(path):
        return path
    import torch
    m = build_torch_model(arch, image_size)
    tmp = path + ".tmp"
    # With autograd on, nn.MultiheadAttention skips its fused fast path (aten::_native_multi_head_attention),
    # which torch.onnx cannot export; the exported graph is the same math as plain ops.
    with torch.enable_grad():
        torch.onnx.export(m, torch.zeros(1, 3, image_size, image_size), tmp, opset_version=14,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, path)
    return path


def find_onnxruntime_node(arg):
    """The folder that holds node_modules/onnxruntime-node (with its native library), or None."""
    for base in ([arg] if arg else []) + [os.path.join(ROOT, "bench"), os.getcwd()]:
        pkg = os.path.join(base, "node_modules", "onnxruntime-node")
        if os.path.exists(os.path.join(pkg, "bin", "napi-v6", "linux", "x64", "libonnxruntime.so.1")):
            return os.path.join(base, "node_modules")
    return None


def torch_worker(args):
    import torch
    torch.set_num_threads(args.threads)
    m = build_torch_model(args.arch, args.image_size)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    times = []
    with torch.inference_mode():
        for i in range(args.iterations + 2):
            t0 = time.perf_counter()
            m(x)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1000 / args.batch)
    print(json.dumps({"ms_per_image_median": statistics.median(times), "torch": torch.__version__}))


def run_tessera(tessera, model_dir, batch, threads, iterations):
    out = subprocess.run([tessera, "bench", "--model", model_dir, "--batch", str(batch), "--threads", str(threads),
                          "--iterations", str(iterations), "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run_torch(arch, image_size, batch, threads, iterations):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    # Some machines pin OpenBLAS to an older core type, which slows it; let it pick its own kernel.
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-worker", "--arch", arch,
                          "--image-size", str(image_size), "--batch", str(batch), "--threads", str(threads),
                          "--iterations", str(iterations)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ort(node_modules, onnx_path, image_size, batch, threads, iterations):
    env = dict(os.environ, NODE_PATH=node_modules, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(["node", os.path.join(ROOT, "bench", "ort_worker.js"), onnx_path, str(batch),
                          str(threads), str(iterations), str(image_size)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit-b16", choices=sorted(ARCHS))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians over rounds")
    ap.add_argument("--iterations", type=int, default=5, help="timed forward passes per process")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tessera-bench"))
    ap.add_argument("--tessera", default=os.path.join(ROOT, "build", "apps", "tessera"))
    ap.add_argument("--onnxruntime-node", default=os.environ.get("ONNXRUNTIME_NODE"),
                    help="folder holding node_modules/onnxruntime-node (default: bench/, then .)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        args.threads = args.threads[0] if isinstance(args.threads, list) else args.threads
        return torch_worker(args)

    blas = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    if "openblas" not in blas:
        sys.exit(f"PyTorch would use the reference BLAS ({blas}), which is ~15x slower than OpenBLAS and "
                 "makes the comparison meaningless: apt-get install libopenblas0-pthread")
    model_dir = ensure_model(args.cache, args.arch, args.image_size)
    node_modules = None if args.no_ort else find_onnxruntime_node(args.onnxruntime_node)
    if not args.no_ort and node_modules is None:
        sys.exit("onnxruntime-node not found: cd bench && npm install --ignore-scripts onnxruntime-node "
                 "(or pass --onnxruntime-node DIR, or --no-ort)")
    onnx_path = ensure_onnx(model_dir, args.arch, args.image_size) if node_modules else None
    configs = [(t, b) for t in args.threads for b in args.batches]
    runs = {c: {"t": [], "p": [], "o": []} for c in configs}
    gflop = {}
    ort_version = None
    # Rounds outermost: every round runs every configuration and engine once, so a slow phase of
    # the machine (minutes long on a shared VM) lands on all of them alike, 1 and 2 threads too.
    # The engines' order rotates from round to round, so none always runs first.
    engines = ["t", "p", "o"] if node_modules else ["t", "p"]
    for i in range(args.rounds):
        order = engines[i % len(engines):] + engines[:i % len(engines)]
        for threads, batch in configs:
            r = runs[(threads, batch)]
            for e in order:
                if e == "t":
                    t = run_tessera(args.tessera, model_dir, batch, threads, args.iterations)
                    r["t"].append(t["ms_per_image_median"])
                    gflop[(threads, batch)] = t["gflops"] * t["ms_per_image_median"] / 1000
                elif e == "p":
                    r["p"].append(run_torch(args.arch, args.image_size, batch, threads,
                                            args.iterations)["ms_per_image_median"])
                else:
                    o = run_ort(node_modules, onnx_path, args.image_size, batch, threads, args.iterations)
                    r["o"].append(o["ms_per_image_median"])
                    ort_version = o["onnxruntime"]
    rows = []
    for threads, batch in configs:
        r = runs[(threads, batch)]
        tm, pm = statistics.median(r["t"]), statistics.median(r["p"])
        om = statistics.median(r["o"]) if r["o"] else None
        # A ratio per round (the engines ran seconds apart), then the median of those: a slow
        # phase that spans a round cancels, where the ratio of medians can pair one engine's
        # slow round with another's fast one. Both are reported.
        p_rounds = [p / t for p, t in zip(r["p"], r["t"])]
        o_rounds = [o / t for o, t in zip(r["o"], r["t"])]
        rows.append({"threads": threads, "batch": batch, "tessera_ms": tm, "pytorch_ms": pm,
                     "onnxruntime_ms": om,
                     "speedup_vs_pytorch": statistics.median(p_rounds),
                     "speedup_vs_onnxruntime": statistics.median(o_rounds) if o_rounds else None,
                     "speedup_vs_pytorch_of_medians": pm / tm,
                     "speedup_vs_onnxruntime_of_medians": om / tm if om else None,
                     "speedup_vs_pytorch_rounds": p_rounds, "speedup_vs_onnxruntime_rounds": o_rounds,
                     "tessera_gflops": gflop[(threads, batch)] / tm * 1000,
                     "tessera_runs": r["t"], "pytorch_runs": r["p"], "onnxruntime_runs": r["o"]})
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"arch": args.arch, "image_size": args.image_size, "onnxruntime": ort_version,
                          "load_average_1min_at_end": load, "rows": rows}, indent=1))
        return
    import torch
    print(f"{args.arch} at {args.image_size}x{args.image_size}, fp32, ms per image (median of {args.rounds} "
          f"alternating rounds x median of {args.iterations} runs); ratios: median of the per-round ratios; "
          f"PyTorch {torch.__version__} eager, ONNX Runtime {ort_version or '-'}; load average {load:.2f} at the end")
    print(f"{'threads':>7} {'batch':>5} {'Tessera':>9} {'PyTorch':>9} {'ONNX RT':>9} {'PyTorch/Tessera':>16} "
          f"{'ORT/Tessera':>12} {'Tessera GFLOP/s':>16}")
    for r in rows:
        om = f"{r['onnxruntime_ms']:>9.1f}" if r["onnxruntime_ms"] else f"{'-':>9}"
        orat = f"{r['speedup_vs_onnxruntime']:>11.2f}x" if r["speedup_vs_onnxruntime"] else f"{'-':>12}"
        print(f"{r['threads']:>7} {r['batch']:>5} {r['tessera_ms']:>9.1f} {r['pytorch_ms']:>9.1f} {om} "
              f"{r['speedup_vs_pytorch']:>15.2f}x {orat} {r['tessera_gflops']:>16.1f}")


if __name__ == "__main__":
    main()
