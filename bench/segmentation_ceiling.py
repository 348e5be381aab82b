#!/usr/bin/python3
"""The best mIoU a Segmenter with the linear decoder could reach on a folder of label maps, for a
given input size and patch size: each image's true one-hot mask is resized to the model input
(area), averaged over each patch (what a perfect patch-level decoder could say), turned back into
logits, upsampled bilinearly to the original size and argmaxed, as `tessera segment` does. The
background class can be down-weighted (a decoder is free to calibrate its logits).

  bench/segmentation_ceiling.py MASKS_DIR [--count 200] [--classes 11]
      [--configs 128/8,128/4,256/8,256/4,native/4]

"native/P" keeps each image at its own size (a model trained on crops, run with sliding windows).
On the digit scenes (200 test scenes, seed 0) this gave: 128/8 0.52, 128/4 0.72, 256/8 0.72,
256/4 0.88, native/8 0.67, native/4 0.85 (best of background weights 1, 0.5, 0.25).
"""
import argparse
import glob
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def ceiling(files, classes, size, patch, bg_weight):
    conf = np.zeros((classes, classes), np.int64)
    for f in files:
        m = np.array(Image.open(f)).astype(np.int64)
        H, W = m.shape
        oh = F.one_hot(torch.tensor(m), classes).permute(2, 0, 1).float()[None]
        if size == "native":
            Hs, Ws = (H + patch - 1) // patch * patch, (W + patch - 1) // patch * patch
            small = F.pad(oh, (0, Ws - W, 0, Hs - H))
        else:
            Hs = Ws = int(size)
            small = F.interpolate(oh, size=(Hs, Ws), mode="area")
        grid = F.avg_pool2d(small, patch)
        grid[:, 0] *= bg_weight
        logits = torch.log(grid + 1e-4)
        if size == "native":
            up = F.interpolate(logits, size=(Hs, Ws), mode="bilinear", align_corners=False)[..., :H, :W]
        else:
            up = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].numpy()
        conf += np.bincount(m.ravel() * classes + pred.ravel(), minlength=classes * classes).reshape(classes, classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter[union > 0] / union[union > 0]
    return iou.mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("masks")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--configs", default="128/8,128/4,256/8,256/4,native/4")
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.masks, "*.png")))[: a.count]
    for cfg in a.configs.split(","):
        size, patch = cfg.split("/")
        best = max(ceiling(files, a.classes, size, int(patch), w) for w in (1.0, 0.5, 0.25))
        print(f"{cfg:>10}  oracle mIoU {best:.3f}")


if __name__ == "__main__":
    main()
