#!/usr/bin/env python3
"""The PyTorch twin of bench/detr_oracle.cpp: the same DETR head, from the same initial weights, on
the same cached features and targets (written by `build/detr_oracle TRAIN VAL ... dump=DIR`), with
the same optimiser and schedule (AdamW, decay 1e-4 on matrices only, clip 0.1, linear warm-up then
cosine to 1e-5), trained in PyTorch 1.13 with the plain-torch port of transformers' DetrDecoder
(tests/reference/make_detection_fixtures.py's detr_decoder_forward) and DetrLoss (make_set_loss_fixtures.py). Prints the
same per-epoch training terms as the C++ run (class, L1, GIoU of the last layer, matched-class
accuracy), so the two curves can be set side by side: if PyTorch learns much faster on the same
data, Tessera's head training has a bug; if not, the slowness is DETR's.

    /usr/bin/python3 bench/detr_oracle.py DIR [--epochs 12] [--batch 32] [--lr 2e-3] [--threads 2]
"""
import argparse, json, math, os, sys, time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import make_model_fixtures as mm  # noqa: E402
import make_detection_fixtures as md  # noqa: E402
import make_set_loss_fixtures as ms  # noqa: E402

torch.set_grad_enabled(True)  # make_model_fixtures turns autograd off for its inference fixtures


def read_targets(path):
    out, lines = [], open(path).read().split("\n")
    i = 0
    while i < len(lines) and lines[i].strip():
        n = int(lines[i]); i += 1
        rows = [list(map(float, lines[i + j].split())) for j in range(n)]; i += n
        out.append({"class_labels": torch.tensor([int(r[0]) for r in rows], dtype=torch.int64),
                    "boxes": torch.tensor([r[1:] for r in rows], dtype=torch.float32).reshape(-1, 4)})
    return out


def head_forward(cfg, sd, feats, g):
    """The supervised outputs (auxiliary layers first, the model's last) of the DETR head on
    feats [B, N, denc], the encoder's final-norm patch rows."""
    out = md.detr_decoder_forward(cfg, sd, feats, g, g)
    return out.get("auxiliary", []) + [(out["logits"], out["pred_boxes"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(7)
    cfg = json.load(open(os.path.join(a.dir, "init", "config.json")))
    sd = {k: v.float().clone().requires_grad_(not k.startswith(("vit.", "deit.", "dinov2.")))
          for k, v in mm.load_safetensors(os.path.join(a.dir, "init", "model.safetensors")).items()}
    params = {k: v for k, v in sd.items() if v.requires_grad}
    decay = [v for k, v in params.items() if k.endswith("weight") and v.dim() >= 2
             and k != "model.query_position_embeddings.weight"]
    no_decay = [v for k, v in params.items() if not any(v is d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    denc, K = cfg["backbone_config"]["hidden_size"], cfg["num_labels"]
    train = np.fromfile(os.path.join(a.dir, "train.f32"), dtype=np.float32)
    targets = read_targets(os.path.join(a.dir, "train_targets.txt"))
    n = len(targets)
    g = int(round(math.sqrt(train.size // (n * denc))))
    train = torch.from_numpy(train.reshape(n, g * g, denc))
    per_epoch, t0 = n // a.batch, time.time()
    total = per_epoch * a.epochs
    print(f"PyTorch {torch.__version__}: {n} scenes, grid {g}x{g}, {K} labels, {sum(p.numel() for p in params.values())} "
          f"parameters", flush=True)
    step = 0
    for e in range(a.epochs):
        order = torch.randperm(n)
        cls = l1 = giou = 0.0
        matched = correct = 0
        for s in range(per_epoch):
            idx = order[s * a.batch:(s + 1) * a.batch]
            tg = [targets[int(i)] for i in idx]
            lr = (a.lr * (step + 1) / a.warmup if step < a.warmup else
                  1e-5 + (a.lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - a.warmup) / (total - a.warmup)))))
            for grp in opt.param_groups:
                grp["lr"] = lr
            outs = head_forward(cfg, sd, train[idx], g)
            num_boxes = max(1, sum(len(t["boxes"]) for t in tg))
            loss = 0
            for li, (logits, boxes) in enumerate(outs):
                ce, l1_, gi, pairs = ms.layer_loss(logits, boxes, tg, K, cfg.get("eos_coefficient", 0.1), num_boxes)
                loss = loss + ce + 5 * l1_ + 2 * gi
                if li == len(outs) - 1:
                    cls += ce.item(); l1 += l1_.item(); giou += gi.item()
                    for b, (q, t) in enumerate(pairs):
                        matched += len(q)
                        correct += int((logits[b, q].argmax(-1) == tg[b]["class_labels"][t]).sum())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 0.1)
            opt.step()
            step += 1
        print(f"epoch {e + 1:2d}  class {cls / per_epoch:.3f}  l1 {l1 / per_epoch:.3f}  giou {giou / per_epoch:.3f}  "
              f"matched-correct {100.0 * correct / max(1, matched):.1f}%  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
