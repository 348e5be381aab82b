#!/usr/bin/env python3
"""Regenerates the references for one `tessera train` SGD step (lr 1) through the command line with
a detection and a segmentation head (tests/test_train_cli.cpp), as make_cli_train_fixture.py does for
the classifier:

tests/fixtures/train/cli-detr-step/   4 random 64x64 PNGs, annotations.json (COCO instances,
    categories 0..2 = the labels of models/detr-vit-aux-rand, boxes inside the images) and
    expected.safetensors: grad.<name> of the DETR set loss with auxiliary loss (every decoder layer,
    1 CE + 5 L1 + 2 GIoU, eos 0.1) of that batch through make_detection_fixtures.py's port of HF
    ViTModel + transformers 4.36 DetrDecoder, float64 from the float32 weights, the images as the
    DetrImageProcessor written by `tessera train` makes them (no resize at 64x64, x/255, ImageNet
    mean and std), the targets as the processors make them (normalised centre boxes).
tests/fixtures/train/cli-yolos-step/   the same for conformance/yolos-tiny-rand (transformers' own
    random YOLOS) at its 56x88, through the YolosForObjectDetection port.
tests/fixtures/train/cli-{dinov2,timm}-step/   an ImageFolder (one image per class) for a DINOv2
    classifier (with a preprocessor_config.json) and a timm ViT with register tokens and LayerScale
    (its pretrained_cfg as the processor), and the mean cross-entropy's gradient through the
    transformers / timm ports.
tests/fixtures/train/cli-segmenter-{mask,linear}-step/   4 random 16x16 PNGs with label maps
    (classes 0..3, some 255) and expected.safetensors: grad.<name> of the per-pixel cross-entropy
    (ignore 255) through the Segmenter port with the mask transformer (segmenter_train/mask/model)
    or the linear decoder (segmenter_train/model), the images as ViTImageProcessor with mean = std
    = 0.5 makes them.

    /usr/bin/python3 tests/reference/make_cli_head_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import make_model_fixtures as mm
import make_detection_fixtures as md
import make_set_loss_fixtures as ms
from make_segmenter_fixtures import segmenter_forward

torch.set_grad_enabled(True)
FIXTURES = os.path.join(mm.REPO, "tests", "fixtures")


def pixels_of(paths, mean, std):
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)).permute(2, 0, 1)
                     / 255.0 for p in paths])
    return (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std, dtype=torch.float64)[:, None, None]


def exact(k, g, D=None):
    """0 where the gradient is 0 in exact arithmetic (key biases, the first DETR layer's self-attention q/k)."""
    if g is None or k.endswith("k_proj.bias") or k.endswith("attention.key.bias") or \
            k.startswith("model.decoder.layers.0.self_attn.q_proj") or k.startswith("model.decoder.layers.0.self_attn.k_proj"):
        return torch.zeros_like(g) if g is not None else None
    if k.endswith("attn.qkv.bias") and D:
        g = g.clone()
        g[D:2 * D] = 0
    return g


def detection(kind):
    """kind "detr": models/detr-vit-aux-rand at 64x64 (auxiliary loss: every decoder layer);
    kind "yolos": conformance/yolos-tiny-rand (transformers' own random YOLOS) at its 56x88."""
    src = os.path.join(FIXTURES, *(("models", "detr-vit-aux-rand") if kind == "detr" else ("conformance", "yolos-tiny-rand")))
    out = os.path.join(FIXTURES, "train", f"cli-{kind}-step")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "images"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    H, W = (64, 64) if kind == "detr" else tuple(cfg["image_size"])
    num_labels = cfg.get("num_labels", len(cfg["id2label"]))
    gen = torch.Generator().manual_seed(1501 if kind == "detr" else 1503)
    images, annotations, paths, targets = [], [], [], []
    for i in range(4):
        rgb = torch.randint(0, 256, (H, W, 3), generator=gen, dtype=torch.uint8).numpy()
        name = f"im{i}.png"
        Image.fromarray(rgb).save(os.path.join(out, "images", name))
        paths.append(os.path.join(out, "images", name))
        images.append({"id": i + 1, "file_name": "images/" + name, "width": W, "height": H})
        labels, boxes = [], []
        for k in range([2, 1, 3, 0][i]):
            x, y = int(torch.randint(0, W - 24, (1,), generator=gen)), int(torch.randint(0, H - 24, (1,), generator=gen))
            w, h = int(torch.randint(6, 24, (1,), generator=gen)), int(torch.randint(6, 24, (1,), generator=gen))
            c = int(torch.randint(0, num_labels, (1,), generator=gen))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
            labels.append(c)
            boxes.append([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H])
        targets.append({"class_labels": torch.tensor(labels, dtype=torch.int64),
                        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": cfg["id2label"][str(i)]} for i in range(num_labels)]}
    json.dump(coco, open(os.path.join(out, "annotations.json"), "w"), indent=1)
    x = pixels_of(paths, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(src, "model.safetensors")).items()}
    o = md.vit_detr_forward(cfg, sd, x) if kind == "detr" else md.yolos_forward(cfg, sd, x)
    num_boxes = max(float(len(annotations)), 1.0)
    torch.set_default_dtype(torch.float64)
    loss = 0
    for logits, boxes in o.get("auxiliary", []) + [(o["logits"], o["pred_boxes"])]:
        ce, l1, giou, _ = ms.layer_loss(logits, boxes, targets, num_labels, cfg.get("eos_coefficient", 0.1), num_boxes)
        loss = loss + ce + cfg.get("bbox_loss_coefficient", 5) * l1 + cfg.get("giou_loss_coefficient", 2) * giou
    torch.set_default_dtype(torch.float32)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    for k, v in sorted(sd.items()):
        tensors["grad." + k] = exact(k, v.grad) if v.grad is not None else torch.zeros_like(v)
    mm.save_safetensors(os.path.join(out, "expected.safetensors"), tensors, {"model": os.path.relpath(src, FIXTURES), "batch": "4"})
    print(out, "loss", float(loss))


def segmenter(kind):
    """kind "mask": segmenter_train/mask/model; "linear": segmenter_train/model."""
    src = os.path.join(FIXTURES, "segmenter_train", *(("mask", "model") if kind == "mask" else ("model",)))
    out = os.path.join(FIXTURES, "train", f"cli-segmenter-{kind}-step")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "images"))
    os.makedirs(os.path.join(out, "masks"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    gen = torch.Generator().manual_seed(1502 if kind == "mask" else 1504)
    paths, labels = [], []
    for i in range(4):
        rgb = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8).numpy()
        mask = torch.randint(0, cfg["n_cls"], (16, 16), generator=gen, dtype=torch.uint8)
        mask[torch.rand((16, 16), generator=gen) < 0.15] = 255
        Image.fromarray(rgb).save(os.path.join(out, "images", f"s{i}.png"))
        Image.fromarray(mask.numpy()).save(os.path.join(out, "masks", f"s{i}.png"))
        paths.append(os.path.join(out, "images", f"s{i}.png"))
        labels.append(mask.long())
    x = pixels_of(paths, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(src, "model.safetensors")).items()}
    logits = segmenter_forward(cfg, sd, x)
    loss = F.cross_entropy(logits, torch.stack(labels), ignore_index=255)
    loss.backward()
    D = cfg["encoder"]["d_model"]
    tensors = {"loss": loss.detach().reshape(1)}
    for k, v in sorted(sd.items()):
        g = v.grad
        if k.startswith("encoder.") and k.endswith("attn.qkv.bias"):
            g = exact(k, g, D)
        elif k.startswith("decoder.") and k.endswith("attn.qkv.bias") and kind == "mask":
            g = exact(k, g, cfg["decoder"]["d_model"])
        tensors["grad." + k] = g if g is not None else torch.zeros_like(v)
    mm.save_safetensors(os.path.join(out, "expected.safetensors"), tensors,
                        {"model": os.path.relpath(src, FIXTURES), "batch": "4"})
    print(out, "loss", float(loss))


def classifier(kind):
    """kind "dinov2": models/dinov2-cls-rand (32x32, 6 classes) with a ViTImageProcessor (mean = std
    = 0.5) written beside the images; kind "timm": models/timm/vit_small_patch14_reg4_dinov2-cls
    (42x42, register tokens, LayerScale; its pretrained_cfg: crop_pct 1, ImageNet mean / std, so
    42x42 images pass unresized). One image per class in an ImageFolder; the gradient of the mean
    cross-entropy through the transformers / timm ports."""
    src = os.path.join(FIXTURES, "models", *(("dinov2-cls-rand",) if kind == "dinov2" else
                                             ("timm", "vit_small_patch14_reg4_dinov2-cls")))
    out = os.path.join(FIXTURES, "train", f"cli-{kind}-step")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if kind == "dinov2":
        size, mean, std = cfg["image_size"], [0.5] * 3, [0.5] * 3
        classes = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True,
                   "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std},
                  open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)
    else:
        size, mean, std = cfg["pretrained_cfg"]["input_size"][-1], mm.IMAGENET_MEAN, mm.IMAGENET_STD
        classes = [f"LABEL_{i}" for i in range(cfg["num_classes"])]
    gen = torch.Generator().manual_seed(1505 if kind == "dinov2" else 1506)
    paths, labels = [], []
    for label, name in sorted(enumerate(classes), key=lambda t: t[1]):  # ImageFolder order: names sorted
        os.makedirs(os.path.join(out, "images", name))
        rgb = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
        path = os.path.join(out, "images", name, "img0.png")
        Image.fromarray(rgb).save(path)
        paths.append(path)
        labels.append(label)
    x = pixels_of(paths, mean, std)
    sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(src, "model.safetensors")).items()}
    logits = mm.hf_forward(cfg, sd, x)["logits"] if kind == "dinov2" else mm.timm_forward(cfg, sd, x)["logits"]
    loss = F.cross_entropy(logits, torch.tensor(labels))
    loss.backward()
    D = cfg["hidden_size"] if kind == "dinov2" else cfg["num_features"]
    tensors = {"loss": loss.detach().reshape(1)}
    for k, v in sorted(sd.items()):
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        if k.endswith("attention.attention.key.bias"):
            g = torch.zeros_like(v)
        elif k.endswith("attn.qkv.bias"):
            g = exact(k, g, D)
        tensors["grad." + k] = g
    mm.save_safetensors(os.path.join(out, "expected.safetensors"), tensors,
                        {"model": os.path.relpath(src, FIXTURES), "batch": str(len(paths))})
    print(out, "loss", float(loss))


if __name__ == "__main__":
    classifier("dinov2")
    classifier("timm")
    shutil.rmtree(os.path.join(FIXTURES, "train", "cli-segmenter-step"), ignore_errors=True)  # its old name
    detection("detr")
    detection("yolos")
    segmenter("mask")
    segmenter("linear")
