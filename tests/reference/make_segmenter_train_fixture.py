#!/usr/bin/env python3
"""Segmenter training fixtures: the gradient of one batch's per-pixel cross-entropy through a tiny
random Segmenter with the linear decoder (OUT) and with the mask transformer (OUT/mask), by PyTorch autograd on the Segmenter port that
make_segmenter_fixtures.py validates against the upstream conformance outputs (rstrudel/segmenter
segm/model/{segmenter,vit,decoder,blocks}.py: DecoderLinear, MaskTransformer, VisionTransformer, Block).

    /usr/bin/python3 tests/reference/make_segmenter_train_fixture.py --out tests/fixtures/segmenter_train

Writes OUT/model (config.json + model.safetensors, Segmenter's layout), OUT/batch.safetensors
(pixel_values [B, 3, H, W]; labels [B, H, W] as float, 255 = ignore) and OUT/expected.safetensors
(loss [1], logits [B, n_cls, H, W], and "grad.NAME" for every parameter under Segmenter's names).
The loss is F.cross_entropy(logits, labels, ignore_index=255), as Segmenter trains.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import json  # noqa: E402
from make_model_fixtures import load_safetensors, save_safetensors, write_model  # noqa: E402
from make_segmenter_fixtures import random_sd, segm_config, segmenter_forward  # noqa: E402


def write_case(out, decoder, seed):
    cfg = segm_config(4, {"image_size": [16, 16], "patch_size": 4, "n_layers": 2, "d_model": 16, "n_heads": 2,
                          "d_ff": 32, "distilled": False, "layer_norm_eps": 1e-6}, decoder)
    sd = random_sd(cfg, seed)
    sd = {k: v for k, v in sd.items() if not k.startswith("encoder.head")}  # unused ImageNet head
    # Weights in double for the reference gradient, stored as float32 (the fixture's exact values).
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    params = {k: v.to(torch.float64).clone().requires_grad_(True) for k, v in sd.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((2, 3, 16, 16), generator=gen)
    labels = torch.randint(0, 4, (2, 16, 16), generator=gen)
    labels[torch.rand((2, 16, 16), generator=gen) < 0.2] = 255
    logits = segmenter_forward(cfg, params, x.to(torch.float64))
    loss = F.cross_entropy(logits, labels, ignore_index=255)
    loss.backward()
    os.makedirs(out, exist_ok=True)
    d = write_model(out, "model", cfg, sd)
    save_safetensors(os.path.join(out, "batch.safetensors"),
                     {"pixel_values": x, "labels": labels.to(torch.float32)})
    expected = {"loss": loss.detach().reshape(1), "logits": logits.detach()}
    expected.update({"grad." + k: p.grad for k, p in params.items()})
    save_safetensors(os.path.join(out, "expected.safetensors"), expected)
    print(f"wrote {d} and the batch; loss {loss.item():.6f}")


def existing_model_case(out, folder, seed, size):
    """The gradient of a batch through a Segmenter fixture folder as it is (OUT/batch.safetensors and
    OUT/expected.safetensors; the model stays where it is)."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    sd32 = load_safetensors(os.path.join(folder, "model.safetensors"))
    params = {k: v.to(torch.float64).clone().requires_grad_(True) for k, v in sd32.items()}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, size, size), generator=gen)
    labels = torch.randint(0, cfg["n_cls"], (2, size, size), generator=gen)
    labels[torch.rand((2, size, size), generator=gen) < 0.2] = 255
    logits = segmenter_forward(cfg, params, x.to(torch.float64))
    loss = F.cross_entropy(logits, labels, ignore_index=255)
    loss.backward()
    os.makedirs(out, exist_ok=True)
    save_safetensors(os.path.join(out, "batch.safetensors"), {"pixel_values": x, "labels": labels.to(torch.float32)})
    expected = {"loss": loss.detach().reshape(1), "logits": logits.detach()}
    # 0 where the gradient is 0 in exact arithmetic: an unused tensor (DINOv2's mask_token) and the
    # key bias (softmax ignores a shift shared by a query's scores), whose float64 value is round-off.
    expected.update({"grad." + k: (torch.zeros_like(p) if p.grad is None or k.endswith("attention.key.bias") else p.grad)
                     for k, p in params.items()})
    save_safetensors(os.path.join(out, "expected.safetensors"), expected)
    print(f"wrote {out} for {folder}; loss {loss.item():.6f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    torch.set_num_threads(1)
    write_case(args.out, {"name": "linear"}, 31)
    # The mask transformer (segm/model/decoder.py MaskTransformer): d_model 24 != the encoder's 16,
    # 2 blocks of 3 heads.
    write_case(os.path.join(args.out, "mask"), {"name": "mask_transformer", "n_layers": 2, "n_heads": 3,
                                               "d_model": 24, "d_ff": 48, "layer_norm_eps": 1e-5}, 41)
    # A Hugging Face DINOv2 backbone (transformers' names under encoder.; LayerScale, mask_token)
    # with the mask transformer: the inference fixture models/segmenter-dinov2-mask-rand at 42x42.
    existing_model_case(os.path.join(args.out, "dinov2-mask"),
                        os.path.join(os.path.dirname(os.path.abspath(args.out)), "models", "segmenter-dinov2-mask-rand"),
                        51, 42)


if __name__ == "__main__":
    main()
