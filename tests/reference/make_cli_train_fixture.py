#!/usr/bin/env python3
"""Regenerates tests/fixtures/train/cli-step/: the reference for one `tessera train` step through
the command line (tests/test_train_cli.cpp). Run with any PyTorch >= 1.13 and Pillow:
    python3 make_cli_train_fixture.py

preprocessor_config.json  a ViTImageProcessor config (size 24, rescale 1/255, mean = std = 0.5)
         for the fixture ViT models/vit-p4-h48-noqkvbias-rand (24x24, patch 4, classes airplane,
         automobile, bird, cat); the test puts them together in one folder;
images/  an ImageFolder of 6 random 24x24 RGB PNGs over the four classes;
expected.safetensors  grad.<name> for every weight: the gradient of the mean cross-entropy of
         that batch, through the transformers 4.40 ViTForImageClassification port of
         make_model_fixtures.py (float64 from the float32 weights), with the images processed as
         ViTImageProcessor does (no resize at 24x24, x/255, (x - 0.5)/0.5).
`tessera train --init <that folder> --data images --optimizer sgd --lr 1 --warmup 0 --weight-decay 0
--clip-grad 0 --max-steps 1 --no-shuffle --no-augment --batch 6` must leave w - grad.
"""
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import make_model_fixtures as mm

torch.set_grad_enabled(True)

FIXTURES = os.path.join(mm.REPO, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "train", "cli-step")
SOURCE = os.path.join(FIXTURES, "models", "vit-p4-h48-noqkvbias-rand")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True,
               "size": {"height": 24, "width": 24}, "resample": 2, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
              open(os.path.join(OUT, "preprocessor_config.json"), "w"), indent=2)
    cfg = json.load(open(os.path.join(SOURCE, "config.json")))
    classes = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
    gen = torch.Generator().manual_seed(1401)
    samples = []  # (path, label) in ImageFolder order: classes sorted, files sorted
    for label, name in enumerate(sorted(classes)):
        os.makedirs(os.path.join(OUT, "images", name))
        for k in range(2 if label < 2 else 1):
            rgb = torch.randint(0, 256, (24, 24, 3), generator=gen, dtype=torch.uint8).numpy()
            path = os.path.join(OUT, "images", name, "img%d.png" % k)
            Image.fromarray(rgb).save(path)
            samples.append((path, classes.index(name)))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float64))
                          .permute(2, 0, 1) / 255.0 for p, _ in samples])
    pixels = (pixels - 0.5) / 0.5
    labels = torch.tensor([l for _, l in samples])
    sd32 = mm.load_safetensors(os.path.join(SOURCE, "model.safetensors"))
    sd = {k: v.double().requires_grad_(True) for k, v in sd32.items()}
    logits = mm.hf_forward(cfg, sd, pixels)["logits"]
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    for k, v in sorted(sd.items()):
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        if k.endswith("attention.attention.key.bias"):
            g = torch.zeros_like(v)
        tensors["grad." + k] = g
    path = os.path.join(OUT, "expected.safetensors")
    mm.save_safetensors(path, tensors, {"model": "models/vit-p4-h48-noqkvbias-rand", "batch": str(len(samples))})
    print(path, os.path.getsize(path), "bytes, loss", float(loss))


if __name__ == "__main__":
    main()
