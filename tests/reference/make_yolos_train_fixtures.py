#!/usr/bin/env python3
"""Regenerates tests/fixtures/train/yolos-*.safetensors: one YOLOS training step's reference for
vision/include/tessera/yolos_train.hpp. Run: /usr/bin/python3 tests/reference/make_yolos_train_fixtures.py

The model is tests/fixtures/conformance/yolos-tiny-rand (transformers' own random YOLOS), run in
float64 through make_detection_fixtures.py's port of transformers 4.40.2 YolosForObjectDetection
(validated there against the upstream outputs); the loss is make_set_loss_fixtures.py's port of
YolosLoss (= DetrLoss: Hungarian matching with scipy's linear_sum_assignment, weighted
cross-entropy with eos_coefficient 0.1, L1 and GIoU over the matched boxes; total 1·CE + 5·L1 + 2·GIoU),
and autograd gives every weight's gradient. Matching depends only on the logits and boxes, so an
implementation whose outputs agree to 1e-6 matches identically. Stored: pixel_values, targets
(target_labels.i as F32, target_boxes.i), logits, pred_boxes, loss, grad.<checkpoint name>.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_model_fixtures as mm  # noqa: E402
import make_detection_fixtures as md  # noqa: E402
import make_set_loss_fixtures as ms  # noqa: E402

torch.set_grad_enabled(True)

FIXTURES = os.path.join(mm.REPO, "tests", "fixtures")
OUT_DIR = os.path.join(FIXTURES, "train")

CASES = [
    # (output name, batch, seed, targets per image, input size (H, W), which gradients to keep)
    ("yolos-tiny-step", 2, 1501, [3, 1], (56, 88), "all"),
    # another size: the position grid is resized from 3x5 to 4x4 patches (bicubic), and its
    # gradient goes back through that; an image without targets (every query no-object).
    ("yolos-tiny-64x64-step", 3, 1502, [2, 0, 4], (64, 64), "1d+pos"),
]
# use_mid_position_embeddings (as yolos-small / base): models/yolos-mid-rand at 64x48 (its 3x5
# grid and both mid tables resampled to 4x3).
MID_CASES = [("yolos-mid-64x48-step", 2, 1503, [2, 3], (64, 48), "1d+pos")]


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    for folder, cases in (("conformance/yolos-tiny-rand", CASES), ("models/yolos-mid-rand", MID_CASES)):
        run(folder, cases)


def run(folder, cases):
    d = os.path.join(FIXTURES, folder)
    cfg = mm.json.load(open(os.path.join(d, "config.json")))
    cfg.setdefault("eos_coefficient", 0.1)  # YolosConfig's defaults where the folder has none
    cfg.setdefault("bbox_loss_coefficient", 5)
    cfg.setdefault("giou_loss_coefficient", 2)
    num_labels = len(cfg["id2label"])
    for name, batch, seed, counts, hw, keep in cases:
        sd = {k: v.double().requires_grad_(True)
              for k, v in mm.load_safetensors(os.path.join(d, "model.safetensors")).items()}
        pixels = mm.random_pixels(seed, batch, *hw)
        g = torch.Generator().manual_seed(seed + 1)
        targets = []
        for n in counts:
            cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
            wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
            targets.append({"class_labels": torch.randint(0, num_labels, (n,), generator=g),
                            "boxes": torch.cat([cxcy, wh], dim=1).double()})
        out = md.yolos_forward(cfg, sd, pixels.double())
        logits, boxes = out["logits"], out["pred_boxes"]
        num_boxes = max(float(sum(counts)), 1.0)
        torch.set_default_dtype(torch.float64)  # layer_loss's class weights in the logits' dtype
        ce, l1, giou, pairs = ms.layer_loss(logits, boxes, targets, num_labels, cfg["eos_coefficient"], num_boxes)
        torch.set_default_dtype(torch.float32)
        loss = 1 * ce + cfg["bbox_loss_coefficient"] * l1 + cfg["giou_loss_coefficient"] * giou
        loss.backward()
        tensors = {"pixel_values": pixels, "logits": logits.detach().float(), "pred_boxes": boxes.detach().float(),
                   "loss": loss.detach().reshape(1), "terms": torch.tensor([ce.item(), l1.item(), giou.item()])}
        for i, t in enumerate(targets):
            if len(t["boxes"]):
                tensors[f"target_labels.{i}"] = t["class_labels"].float()
                tensors[f"target_boxes.{i}"] = t["boxes"].float()
        for k, v in sorted(sd.items()):
            if keep == "all" or v.dim() == 1 or k.endswith("position_embeddings") or k.endswith("_token") \
                    or k.endswith("_tokens") or k.endswith("layers.2.weight") \
                    or k.endswith("mid_position_embeddings"):
                tensors["grad." + k] = md.mm.torch.zeros_like(v) if v.grad is None or \
                    k.endswith("attention.attention.key.bias") else v.grad.float()
        path = os.path.join(OUT_DIR, name + ".safetensors")
        mm.save_safetensors(path, tensors, {"model": folder, "loss": "YOLOS set loss (1 CE + 5 L1 + 2 GIoU, eos 0.1)",
                                            "gradients": keep})
        print(path, os.path.getsize(path), "bytes, loss", float(loss), "terms", ce.item(), l1.item(), giou.item(),
              "matches", [(p[0].tolist(), p[1].tolist()) for p in pairs])


if __name__ == "__main__":
    main()
