#!/usr/bin/env python3
"""Regenerates tests/fixtures/kernels/*.safetensors: PyTorch reference outputs for the kernels in
core/include/tessera/kernels.hpp. Run with any PyTorch >= 1.13:  python3 make_kernel_fixtures.py

Interpolation references are PyTorch's own float32 CPU kernels (the exact algorithm Tessera
reproduces). Layer norm, GELU, softmax and attention references are computed by PyTorch in float64
from float32 inputs. Each file's __metadata__ maps a case name to a JSON string of its parameters;
the tensors of case `c` are `c.in` (and `c.gamma`, `c.k` ...) and `c.out`.
"""
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "kernels")


def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer: u64 LE header length, JSON header, raw little-endian data."""
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def interpolate_cases():
    g = torch.Generator().manual_seed(1)
    tensors, meta = {}, {}
    # (in_h, in_w, size or None, scale or None)
    geometries = [
        ("up_size", 7, 7, (12, 9), None),
        ("down_size", 14, 14, (5, 6), None),
        ("scale_small", 4, 4, None, (4.1 / 4, 3.1 / 4)),
        # Hugging Face ViT/DINOv2 interpolate_pos_encoding: scale ((h + 0.1) / sqrt(N), (w + 0.1) / sqrt(N))
        ("scale_hf", 14, 14, None, (20.1 / 14, 15.1 / 14)),
        ("scale_down", 9, 11, None, (0.55, 0.8)),
        ("to_one", 2, 3, (1, 5), None),
        ("from_one", 1, 1, (3, 2), None),
    ]
    for mode in ("bicubic", "bilinear"):
        for align in (False, True):
            for geo, ih, iw, size, scale in geometries:
                name = f"{mode}_{geo}_ac{int(align)}"
                x = torch.randn(3, ih, iw, generator=g)
                if size is not None:
                    y = F.interpolate(x[None], size=size, mode=mode, align_corners=align)[0]
                else:
                    y = F.interpolate(x[None], scale_factor=scale, mode=mode, align_corners=align,
                                      recompute_scale_factor=False)[0]
                tensors[name + ".in"] = x
                tensors[name + ".out"] = y
                meta[name] = json.dumps({"mode": mode, "align_corners": align,
                                         "scale_h": scale[0] if scale else 0.0,
                                         "scale_w": scale[1] if scale else 0.0})
    for geo, ih, iw, oh, ow in [("down", 14, 14, 7, 9), ("up", 7, 7, 12, 9), ("mixed", 16, 16, 24, 10),
                                ("down_big", 37, 37, 16, 16), ("same", 5, 6, 5, 6)]:
        name = f"bicubic_aa_{geo}"
        x = torch.randn(3, ih, iw, generator=g)
        y = F.interpolate(x[None], size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)[0]
        tensors[name + ".in"] = x
        tensors[name + ".out"] = y
        meta[name] = json.dumps({"mode": "bicubic_aa", "align_corners": False, "scale_h": 0.0, "scale_w": 0.0})
    write_safetensors(os.path.join(OUT_DIR, "interpolate.safetensors"), tensors, meta)


def elementwise_cases():
    g = torch.Generator().manual_seed(2)
    tensors, meta = {}, {}
    for name, rows, dim, eps, offset, spread in [("ln_small", 5, 37, 1e-6, 0.0, 1.0),
                                                  ("ln_vit", 4, 768, 1e-12, 0.0, 1.0),
                                                  ("ln_offset", 3, 384, 1e-6, 50.0, 0.05)]:
        x = offset + spread * torch.randn(rows, dim, generator=g)
        gamma = 1 + 0.5 * torch.randn(dim, generator=g)
        beta = 0.5 * torch.randn(dim, generator=g)
        y = F.layer_norm(x.double(), (dim,), gamma.double(), beta.double(), eps)
        tensors.update({name + ".in": x, name + ".gamma": gamma, name + ".beta": beta, name + ".out": y})
        meta[name] = json.dumps({"kind": "layer_norm", "eps": eps})
    x = torch.cat([torch.linspace(-10, 10, 2001), 3 * torch.randn(999, generator=g),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0])])
    tensors["gelu.in"] = x
    tensors["gelu.out"] = F.gelu(x.double())
    meta["gelu"] = json.dumps({"kind": "gelu"})
    x = 4 * torch.randn(6, 197, generator=g)
    x[1] += 80  # large logits: the max must be subtracted
    tensors["softmax.in"] = x
    tensors["softmax.out"] = torch.softmax(x.double(), dim=-1)
    meta["softmax"] = json.dumps({"kind": "softmax"})
    write_safetensors(os.path.join(OUT_DIR, "elementwise.safetensors"), tensors, meta)


def attention_cases():
    g = torch.Generator().manual_seed(3)
    tensors, meta = {}, {}
    for name, b, h, tq, tk, hd in [("attn_self", 1, 2, 32, 32, 64), ("attn_cross", 2, 3, 17, 29, 16),
                                   ("attn_hd80", 1, 1, 33, 50, 80), ("attn_hd12", 2, 2, 5, 1, 12)]:
        q = torch.randn(b, tq, h * hd, generator=g)
        k = torch.randn(b, tk, h * hd, generator=g)
        v = torch.randn(b, tk, h * hd, generator=g)
        scale = 1.0 / math.sqrt(hd)
        qd, kd, vd = (t.double().view(b, -1, h, hd).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1)
        o = (p @ vd).transpose(1, 2).reshape(b, tq, h * hd)
        tensors.update({name + ".q": q, name + ".k": k, name + ".v": v, name + ".out": o})
        meta[name] = json.dumps({"kind": "attention", "batch": b, "heads": h, "q_len": tq, "kv_len": tk,
                                 "head_dim": hd, "scale": scale})
    write_safetensors(os.path.join(OUT_DIR, "attention.safetensors"), tensors, meta)


if __name__ == "__main__":
    os.makedirs(OUT_DIR, exist_ok=True)
    interpolate_cases()
    elementwise_cases()
    attention_cases()
    for f in sorted(os.listdir(OUT_DIR)):
        print(f, os.path.getsize(os.path.join(OUT_DIR, f)), "bytes")
