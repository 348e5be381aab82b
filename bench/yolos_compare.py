#!/usr/bin/env python3
"""Detections/s of a YOLOS-Ti-sized detector: Tessera vs PyTorch eager on the same weights, same
input size, same thread count, run alternately in fresh processes; prints medians.

    /usr/bin/python3 bench/yolos_compare.py [--height 512 --width 688] [--threads 2] [--rounds 5]

The model has hustvl/yolos-tiny's shape (hidden 192, 12 layers, 3 heads, MLP 768, patch 16, 100
detection tokens, a position grid for 800x1333, 91 labels) with random weights (seeded), written
once as a Hugging Face YolosForObjectDetection folder under --cache. PyTorch runs the plain-torch
port of transformers 4.40.2 YolosForObjectDetection in tests/reference/make_detection_fixtures.py
(validated there against the conformance examples); like transformers it resizes the position
embeddings on every forward. Tessera runs `tessera bench --model DIR --height H --width W`. Every
image yields its 100 slots, so detections/s here means images/s. Before timing, both run once on the
same pixels and their logits / boxes are compared.
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))

CONFIG = {"architectures": ["YolosForObjectDetection"], "model_type": "yolos", "hidden_size": 192,
          "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768, "hidden_act": "gelu",
          "layer_norm_eps": 1e-12, "image_size": [800, 1333], "patch_size": 16, "num_channels": 3,
          "qkv_bias": True, "num_detection_tokens": 100, "use_mid_position_embeddings": False,
          "id2label": {str(i): f"class_{i}" for i in range(91)}}


def ensure_model(cache):
    import make_detection_fixtures as md, make_model_fixtures as mm
    d = os.path.join(cache, "yolos-ti-rand")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        sd = mm.random_state_dict(md.yolos_shapes(CONFIG, 91), seed=7)
        mm.write_model(cache, "yolos-ti-rand", CONFIG, sd)
    return d


def torch_worker(a):
    import torch
    import make_detection_fixtures as md, make_model_fixtures as mm
    torch.set_num_threads(a.threads)
    sd = mm.load_safetensors(os.path.join(a.model, "model.safetensors"))
    x = torch.randn(1, 3, a.height, a.width, generator=torch.Generator().manual_seed(3))
    times = []
    with torch.no_grad():
        for i in range(a.iterations + 2):
            t = time.perf_counter()
            md.yolos_forward(CONFIG, sd, x)
            if i >= 2:
                times.append((time.perf_counter() - t) * 1000)
    print(json.dumps({"ms_per_image_median": statistics.median(times)}))


def agree(tessera, d, h, w):
    """Both on the same pixels once: max |diff| of logits and pred_boxes."""
    import torch
    import make_detection_fixtures as md, make_model_fixtures as mm
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(5))
    px, out = os.path.join(d, "px.safetensors"), os.path.join(d, "out.safetensors")
    mm.save_safetensors(px, {"pixel_values": x})
    subprocess.run([tessera, "infer", "--model", d, "--inputs", px, "--outputs", out], check=True,
                   stdout=subprocess.DEVNULL)
    got = mm.load_safetensors(out)
    want = md.yolos_forward(CONFIG, mm.load_safetensors(os.path.join(d, "model.safetensors")), x)
    return {k: (got[k] - want[k]).abs().max().item() for k in ("logits", "pred_boxes")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=688)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--cache", default=os.path.join(ROOT, "build", "bench-models"))
    ap.add_argument("--tessera", default=os.path.join(ROOT, "build", "apps", "tessera"))
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        return torch_worker(a)
    d = ensure_model(a.cache)
    diffs = agree(a.tessera, d, a.height, a.width)
    print(f"model {d}: {a.height}x{a.width}, {a.threads} threads; Tessera vs PyTorch max |diff| " +
          ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), OMP_WAIT_POLICY="PASSIVE")
    # As bench/compare.py: some machines pin OpenBLAS to an older core type; let it pick its own kernel.
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    res = {"tessera": [], "pytorch": []}
    for r in range(a.rounds):
        t = subprocess.run([a.tessera, "bench", "--model", d, "--height", str(a.height), "--width", str(a.width),
                            "--threads", str(a.threads), "--iterations", str(a.iterations), "--json"],
                           check=True, capture_output=True, text=True, env=env)
        res["tessera"].append(json.loads(t.stdout)["ms_per_image_median"])
        p = subprocess.run([sys.executable, __file__, "--torch-worker", "--model", d, "--height", str(a.height),
                            "--width", str(a.width), "--threads", str(a.threads), "--iterations",
                            str(a.iterations)], check=True, capture_output=True, text=True, env=env)
        res["pytorch"].append(json.loads(p.stdout.strip().splitlines()[-1])["ms_per_image_median"])
        print(f"  round {r + 1}: tessera {res['tessera'][-1]:.1f} ms, pytorch {res['pytorch'][-1]:.1f} ms", flush=True)
    for k, v in res.items():
        ms = statistics.median(v)
        print(f"{k:8s} {ms:8.1f} ms/image  {1000 / ms:6.2f} detections/s (= images/s, 100 slots each; "
              f"median of {len(v)} rounds x {a.iterations})")
    print(f"ratio (pytorch / tessera time): {statistics.median(res['pytorch']) / statistics.median(res['tessera']):.2f}x")


if __name__ == "__main__":
    main()
