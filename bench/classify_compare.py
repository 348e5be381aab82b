#!/usr/bin/env python3
"""End to end: `tessera classify` vs the same job in PyTorch (PIL decode + torchvision's
ImageClassification transforms + forward + softmax/top-5), on the same torchvision ViT weights,
same images, batch size and thread count; alternating runs, medians of the per-image wall time.

    /usr/bin/python3 bench/classify_compare.py [--arch vit-b16] [--images 16] [--batches 1 8] [--threads 1 2]

Uses bench/compare.py's model folder (torchvision layout, random weights: the labels it prints are
meaningless; only the time counts). The per-image time includes decoding, pre-processing and the
model, and (amortised over --images) process start and model load.
"""
import argparse, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

ROOT = compare.ROOT
PHOTO = os.path.join(ROOT, "tests/fixtures/conformance/processors/vit-default/images")


def torch_worker(args):
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    m = compare.build_torch_model(args.arch, 224)
    tf = ImageClassification(crop_size=224, resize_size=256, interpolation=InterpolationMode.BILINEAR)
    paths = args.paths
    with torch.inference_mode():
        for i in range(0, len(paths), args.batch):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + args.batch]])
            torch.softmax(m(x), dim=1).topk(5)
    print((time.perf_counter() - t0) * 1000 / len(paths))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit-b16", choices=sorted(compare.ARCHS))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tessera-bench"))
    ap.add_argument("--tessera", default=os.path.join(ROOT, "build", "apps", "tessera"))
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        args.threads = args.threads[0]
        return torch_worker(args)
    model_dir = compare.ensure_model(args.cache, args.arch, 224)
    photos = sorted(os.path.join(PHOTO, f) for f in os.listdir(PHOTO))
    paths = [photos[i % len(photos)] for i in range(args.images)]
    print(f"{args.arch}, {args.images} photos, ms per image end to end (median of {args.rounds} alternating rounds)")
    print(f"{'threads':>7} {'batch':>5} {'tessera classify':>17} {'PyTorch':>9} {'PyTorch/Tessera':>16}")
    for threads in args.threads:
        for batch in args.batches:
            t_ms, p_ms = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                subprocess.run([args.tessera, "classify", "--model", model_dir, "--batch", str(batch),
                                "--threads", str(threads), *paths], check=True, capture_output=True)
                t_ms.append((time.perf_counter() - t0) * 1000 / len(paths))
                env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                           OMP_WAIT_POLICY="PASSIVE")
                env.pop("OPENBLAS_CORETYPE", None)
                env.pop("OPENBLAS_L2_SIZE", None)
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-worker", "--arch", args.arch,
                                      "--batch", str(batch), "--threads", str(threads), "--", *paths],
                                     check=True, capture_output=True, text=True, env=env)
                p_ms.append(float(out.stdout.strip().splitlines()[-1]))
            tm, pm = statistics.median(t_ms), statistics.median(p_ms)
            print(f"{threads:>7} {batch:>5} {tm:>17.1f} {pm:>9.1f} {pm / tm:>15.2f}x", flush=True)


if __name__ == "__main__":
    main()
