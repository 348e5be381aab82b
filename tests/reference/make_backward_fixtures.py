#!/usr/bin/env python3
"""Regenerates tests/fixtures/backward/*.safetensors: PyTorch autograd references for the training
kernels in core/include/tessera/backward.hpp and optim.hpp. Run with any PyTorch >= 1.13:
    python3 make_backward_fixtures.py

Inputs are float32 random tensors; the gradients are computed by autograd in float64 from those
float32 values (the optimiser steps run in float32, as torch.optim does). Tensor `c.name` belongs to
case `c`; integer labels are stored as F32 (exact below 2^24); __metadata__ maps a case to its
parameters as JSON.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

from make_kernel_fixtures import write_safetensors

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "backward",
                   "backward.safetensors")


def f64(t):
    return t.to(torch.float64).requires_grad_(True)


def main():
    g = torch.Generator().manual_seed(13)
    rnd = lambda *s: torch.randn(*s, generator=g)
    T, meta = {}, {}

    # linear: y = x Wᵀ + b, loss = Σ dy ⊙ y
    M, N, K = 13, 29, 37
    x, w, b, dy = rnd(M, K), rnd(N, K) * 0.2, rnd(N), rnd(M, N)
    xd, wd, bd = f64(x), f64(w), f64(b)
    (F.linear(xd, wd, bd) * dy.double()).sum().backward()
    T.update({"linear.x": x, "linear.w": w, "linear.b": b, "linear.dy": dy,
              "linear.dx": xd.grad, "linear.dw": wd.grad, "linear.db": bd.grad})
    meta["linear"] = json.dumps({"M": M, "N": N, "K": K})

    # layer norm over the last dim, with an offset mean (as in a residual stream)
    R, D, eps = 11, 48, 1e-6
    x, gamma, beta, dy = rnd(R, D) * 3 + 1.5, 1 + 0.3 * rnd(D), 0.3 * rnd(D), rnd(R, D)
    xd, gd, bd = f64(x), f64(gamma), f64(beta)
    y = F.layer_norm(xd, (D,), gd, bd, eps)
    (y * dy.double()).sum().backward()
    T.update({"layer_norm.x": x, "layer_norm.gamma": gamma, "layer_norm.beta": beta,
              "layer_norm.dy": dy, "layer_norm.y": y.detach(), "layer_norm.dx": xd.grad,
              "layer_norm.dgamma": gd.grad, "layer_norm.dbeta": bd.grad})
    meta["layer_norm"] = json.dumps({"rows": R, "dim": D, "eps": eps})

    # exact-erf GELU and QuickGELU (transformers' QuickGELUActivation: x * sigmoid(1.702 x))
    x, dy = rnd(300) * 3, rnd(300)
    xd = f64(x)
    (F.gelu(xd) * dy.double()).sum().backward()
    T.update({"gelu.x": x, "gelu.dy": dy, "gelu.dx": xd.grad})
    meta["gelu"] = json.dumps({"n": 300})
    xd = f64(x)
    ((xd * torch.sigmoid(1.702 * xd)) * dy.double()).sum().backward()
    T.update({"quick_gelu.x": x, "quick_gelu.dy": dy, "quick_gelu.dx": xd.grad})
    meta["quick_gelu"] = json.dumps({"n": 300})

    # softmax over rows
    x, dy = rnd(7, 19) * 2, rnd(7, 19)
    xd = f64(x)
    y = torch.softmax(xd, dim=-1)
    (y * dy.double()).sum().backward()
    T.update({"softmax.x": x, "softmax.y": y.detach(), "softmax.dy": dy, "softmax.dx": xd.grad})
    meta["softmax"] = json.dumps({"rows": 7, "cols": 19})

    # multi-head attention, q/k/v [B, T, H*hd] (heads side by side in each row, as the fused qkv)
    B, H, Tq, hd = 2, 3, 17, 8
    scale = 1 / math.sqrt(hd)
    q, k, v, dout = rnd(B, Tq, H * hd), rnd(B, Tq, H * hd), rnd(B, Tq, H * hd), rnd(B, Tq, H * hd)
    qd, kd, vd = f64(q), f64(k), f64(v)
    split = lambda t: t.view(B, Tq, H, hd).transpose(1, 2)  # [B, H, T, hd]
    p = torch.softmax(split(qd) @ split(kd).transpose(-1, -2) * scale, dim=-1)
    out = (p @ split(vd)).transpose(1, 2).reshape(B, Tq, H * hd)
    (out * dout.double()).sum().backward()
    T.update({"attention.q": q, "attention.k": k, "attention.v": v, "attention.dout": dout,
              "attention.out": out.detach(), "attention.dq": qd.grad, "attention.dk": kd.grad,
              "attention.dv": vd.grad})
    meta["attention"] = json.dumps({"batch": B, "heads": H, "tokens": Tq, "head_dim": hd,
                                    "scale": scale})

    # mean cross-entropy with label smoothing
    R, C, ls = 9, 7, 0.1
    logits, labels = rnd(R, C) * 2, torch.randint(0, C, (R,), generator=g)
    zd = f64(logits)
    loss = F.cross_entropy(zd, labels, label_smoothing=ls)
    loss.backward()
    T.update({"cross_entropy.logits": logits, "cross_entropy.labels": labels.float(),
              "cross_entropy.loss": loss.detach().reshape(1), "cross_entropy.dlogits": zd.grad})
    meta["cross_entropy"] = json.dumps({"rows": R, "classes": C, "label_smoothing": ls})

    # AdamW, 20 steps in float32 with given gradients
    n, steps = 57, 20
    w0, grads = rnd(n), rnd(steps, n)
    opt_args = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], **opt_args)
    after = []
    for s in range(steps):
        p.grad = grads[s].clone()
        opt.step()
        after.append(p.detach().clone())
    T.update({"adamw.w0": w0, "adamw.grads": grads, "adamw.after": torch.stack(after)})
    meta["adamw"] = json.dumps({"n": n, "steps": steps, "lr": 1e-2, "beta1": 0.9, "beta2": 0.999,
                                "eps": 1e-8, "weight_decay": 0.05})

    # SGD with momentum and weight decay, 5 steps
    steps = 5
    w0, grads = rnd(n), rnd(steps, n)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    after = []
    for s in range(steps):
        p.grad = grads[s].clone()
        opt.step()
        after.append(p.detach().clone())
    T.update({"sgd.w0": w0, "sgd.grads": grads, "sgd.after": torch.stack(after)})
    meta["sgd"] = json.dumps({"n": n, "steps": steps, "lr": 0.1, "momentum": 0.9,
                              "weight_decay": 0.01})

    # clip_grad_norm_ (max_norm 1: clips)
    gr = rnd(300)
    p = torch.nn.Parameter(torch.zeros(300))
    p.grad = gr.clone()
    total = torch.nn.utils.clip_grad_norm_([p], 1.0)
    T.update({"clip.g": gr, "clip.clipped": p.grad.clone(), "clip.total": total.reshape(1)})
    meta["clip"] = json.dumps({"n": 300, "max_norm": 1.0})

    # SwiGLU (transformers' Dinov2SwiGLUFFN: x1, x2 = chunk(2); silu(x1) * x2)
    R, Fh = 5, 24
    x, dy = rnd(R, 2 * Fh) * 2, rnd(R, Fh)
    xd = f64(x)
    x1, x2 = xd.chunk(2, dim=-1)
    ((F.silu(x1) * x2) * dy.double()).sum().backward()
    T.update({"swiglu.x": x, "swiglu.dy": dy, "swiglu.dx": xd.grad})
    meta["swiglu"] = json.dumps({"rows": R, "f": Fh})

    # interpolation backward: position-embedding grids [C, h, w] as HF, timm, YOLOS and Segmenter
    # resample them (float64 autograd of F.interpolate from float32 inputs)
    interp = [
        ("interp_hf_bicubic", 14, 14, dict(scale_factor=(20.1 / 14, 15.1 / 14), mode="bicubic",
                                          align_corners=False, recompute_scale_factor=False)),
        ("interp_bicubic_size", 7, 7, dict(size=(12, 9), mode="bicubic", align_corners=False)),
        ("interp_bilinear_size", 6, 8, dict(size=(11, 5), mode="bilinear", align_corners=False)),
        ("interp_bilinear_ac", 5, 5, dict(size=(9, 7), mode="bilinear", align_corners=True)),
        ("interp_bicubic_aa_down", 14, 14, dict(size=(7, 9), mode="bicubic", align_corners=False,
                                               antialias=True)),
        ("interp_bicubic_aa_up", 7, 7, dict(size=(12, 10), mode="bicubic", align_corners=False,
                                           antialias=True)),
    ]
    for name, ih, iw, kw in interp:
        x = rnd(2, ih, iw)  # 2 channels: the fixture file stays under 100 KB
        xd = f64(x)
        y = F.interpolate(xd[None], **kw)[0]
        dy = rnd(*y.shape)
        (y * dy.double()).sum().backward()
        T.update({name + ".x": x, name + ".dy": dy, name + ".dx": xd.grad})
        params = {"in_h": ih, "in_w": iw, "out_h": y.shape[1], "out_w": y.shape[2], "mode": kw["mode"],
                  "align_corners": kw["align_corners"], "antialias": kw.get("antialias", False),
                  "scale_h": kw["scale_factor"][0] if "scale_factor" in kw else 0.0,
                  "scale_w": kw["scale_factor"][1] if "scale_factor" in kw else 0.0}
        meta[name] = json.dumps(params)

    write_safetensors(OUT, T, meta)
    print(OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
