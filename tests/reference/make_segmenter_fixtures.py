#!/usr/bin/env python3
"""Segmenter fixtures: rstrudel/segmenter's forward ported to plain PyTorch, validated on the two
conformance examples that the real Segmenter code produced, then used for cases those examples do not
have (sizes that are not a multiple of the patch size, position-embedding resize, a grid with the
training token count but another shape, a distilled encoder, a decoder narrower than the encoder, a
Hugging Face DINOv2 backbone), and to check tools/convert_segmenter.py end to end.

    /usr/bin/python3 tests/reference/make_segmenter_fixtures.py --check
    /usr/bin/python3 tests/reference/make_segmenter_fixtures.py --out tests/fixtures/models

Needs torch, numpy, yaml. The port follows segm/model/{segmenter,vit,decoder,blocks,utils}.py:
padding() zero-pads bottom/right to a multiple of the patch size; VisionTransformer resizes pos_embed
(resize_pos_embed: F.interpolate bilinear, align_corners=False) only when the token count differs from
pos_embed's; the encoder's class (and distillation) tokens are dropped; DecoderLinear / MaskTransformer
give [B, n_cls, Hp/p, Wp/p]; F.interpolate(size=(Hp, Wp), mode="bilinear"), then unpadding() crops.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_model_fixtures import (REPO, find_conformance, hf_backbone, hf_config, hf_shapes,  # noqa: E402
                                 load_safetensors, random_pixels, random_state_dict, save_safetensors,
                                 write_case, write_json, write_model)

torch.set_num_threads(1)
torch.set_grad_enabled(False)

UPSTREAM = "rstrudel/segmenter (segm/model), ported to plain PyTorch in tests/reference/make_segmenter_fixtures.py"


# ---------------------------------------------------------------------------------------------------- port

def ln(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def block(x, sd, p, heads, eps):
    """segm/model/blocks.py Block: x + attn(norm1 x); x + mlp(norm2 x)."""
    B, N, C = x.shape
    h = ln(x, sd, p + "norm1", eps)
    qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = ln(x, sd, p + "norm2", eps)
    h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
    return x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def resize_pos_embed(posemb, grid_old_shape, grid_new_shape, num_extra_tokens):
    posemb_tok, posemb_grid = posemb[:, :num_extra_tokens], posemb[0, num_extra_tokens:]
    gs_old_h, gs_old_w = grid_old_shape
    gs_h, gs_w = grid_new_shape
    posemb_grid = posemb_grid.reshape(1, gs_old_h, gs_old_w, -1).permute(0, 3, 1, 2)
    posemb_grid = F.interpolate(posemb_grid, size=(gs_h, gs_w), mode="bilinear")
    posemb_grid = posemb_grid.permute(0, 2, 3, 1).reshape(1, gs_h * gs_w, -1)
    return torch.cat([posemb_tok, posemb_grid], dim=1)


def segm_vit(enc, sd, im):
    """VisionTransformer.forward(im, return_features=True)."""
    B, _, H, W = im.shape
    PS = enc["patch_size"]
    distilled = enc.get("distilled", False)
    eps = enc.get("layer_norm_eps", 1e-5)
    x = F.conv2d(im, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=PS)
    x = x.flatten(2).transpose(1, 2)
    toks = [sd["encoder.cls_token"].expand(B, -1, -1)]
    if distilled:
        toks.append(sd["encoder.dist_token"].expand(B, -1, -1))
    x = torch.cat(toks + [x], dim=1)
    pos = sd["encoder.pos_embed"]
    if x.shape[1] != pos.shape[1]:
        grid = (enc["image_size"][0] // PS, enc["image_size"][1] // PS)
        pos = resize_pos_embed(pos, grid, (H // PS, W // PS), 1 + distilled)
    x = x + pos
    for i in range(enc["n_layers"]):
        x = block(x, sd, f"encoder.blocks.{i}.", enc["n_heads"], eps)
    return ln(x, sd, "encoder.norm", eps)


def decoder_forward(dec, n_cls, sd, x, GS):
    if dec["name"] == "linear":
        x = F.linear(x, sd["decoder.head.weight"], sd["decoder.head.bias"])
        B, N, C = x.shape
        return x.reshape(B, GS, N // GS, C).permute(0, 3, 1, 2)   # b (h w) c -> b c h w
    eps = dec.get("layer_norm_eps", 1e-5)
    x = F.linear(x, sd["decoder.proj_dec.weight"], sd["decoder.proj_dec.bias"])
    x = torch.cat((x, sd["decoder.cls_emb"].expand(x.size(0), -1, -1)), 1)
    for i in range(dec["n_layers"]):
        x = block(x, sd, f"decoder.blocks.{i}.", dec["n_heads"], eps)
    x = ln(x, sd, "decoder.decoder_norm", eps)
    patches, cls_seg_feat = x[:, :-n_cls], x[:, -n_cls:]
    patches = patches @ sd["decoder.proj_patch"]
    cls_seg_feat = cls_seg_feat @ sd["decoder.proj_classes"]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
    masks = patches @ cls_seg_feat.transpose(1, 2)
    masks = ln(masks, sd, "decoder.mask_norm", eps)
    B, N, n = masks.shape
    return masks.reshape(B, GS, N // GS, n).permute(0, 3, 1, 2)   # b (h w) n -> b n h w


def segmenter_forward(cfg, sd, im):
    """Segmenter.forward: padding, encoder, drop cls/dist, decoder, upsample, unpadding."""
    enc, dec, n_cls = cfg["encoder"], cfg["decoder"], cfg["n_cls"]
    H_ori, W_ori = im.shape[2], im.shape[3]
    if "backbone_config" in enc:
        bb = enc["backbone_config"]
        PS, extra = bb["patch_size"], 1 + (bb["model_type"] == "deit")
    else:
        PS, extra = enc["patch_size"], 1 + enc.get("distilled", False)
    pad_h = (PS - H_ori % PS) % PS
    pad_w = (PS - W_ori % PS) % PS
    if pad_h or pad_w:
        im = F.pad(im, (0, pad_w, 0, pad_h), value=0)
    H, W = im.shape[2], im.shape[3]
    if "backbone_config" in enc:
        # Hugging Face encoder (transformers' forward, ported in make_model_fixtures.py), keys under encoder.
        x = hf_backbone(bb, sd, "encoder.", im, bb["model_type"], interpolate_pos_encoding=True)
    else:
        x = segm_vit(enc, sd, im)
    x = x[:, extra:]
    masks = decoder_forward(dec, n_cls, sd, x, H // PS)
    masks = F.interpolate(masks, size=(H, W), mode="bilinear")
    return masks[:, :, :H_ori, :W_ori]


def sliding_window_logits(cfg, sd, im, window, stride, batch=2):
    """segm/model/utils.py inference() for one image, flip off, up to merge_windows' averaged logits (before
    its final resize to the original shape and softmax, which Tessera does when making the label map)."""
    h, w = im.shape[2:]
    if min(h, w) < window:                                   # resize(im, window)
        if h < w:
            h_res, w_res = window, (w / h) * window
        else:
            h_res, w_res = (h / w) * window, window
        im = F.interpolate(im, (int(h_res), int(w_res)), mode="bilinear")
    _, _, H, W = im.shape
    ha = [a.item() for a in torch.arange(0, H, stride) if a < H - window] + [H - window]
    wa = [a.item() for a in torch.arange(0, W, stride) if a < W - window] + [W - window]
    anchors = [(a, b) for a in ha for b in wa]
    crops = torch.stack([im[0, :, a:a + window, b:b + window] for a, b in anchors])
    seg = torch.cat([segmenter_forward(cfg, sd, crops[i:i + batch]) for i in range(0, len(crops), batch)])
    logit = torch.zeros((seg.shape[1], H, W))
    count = torch.zeros((1, H, W))
    for m, (a, b) in zip(seg, anchors):
        logit[:, a:a + window, b:b + window] += m
        count[:, a:a + window, b:b + window] += 1
    return (logit / count).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------- models

def segm_shapes(cfg):
    enc, dec, n = cfg["encoder"], cfg["decoder"], cfg["n_cls"]
    s = {}
    if "backbone_config" in enc:
        bb = enc["backbone_config"]
        s.update({"encoder." + k: v for k, v in hf_shapes(bb).items() if not k.startswith("pooler.")})
        D = bb["hidden_size"]
    else:
        D, P = enc["d_model"], enc["patch_size"]
        grid = (enc["image_size"][0] // P) * (enc["image_size"][1] // P)
        extra = 1 + enc.get("distilled", False)
        s["encoder.patch_embed.proj.weight"] = (D, 3, P, P)
        s["encoder.patch_embed.proj.bias"] = (D,)
        s["encoder.cls_token"] = (1, 1, D)
        if enc.get("distilled"):
            s["encoder.dist_token"] = (1, 1, D)
            s["encoder.head_dist.weight"] = (1000, D)
            s["encoder.head_dist.bias"] = (1000,)
        s["encoder.pos_embed"] = (1, extra + grid, D)
        s.update(block_shapes("encoder.blocks", enc["n_layers"], D, enc["d_ff"]))
        s["encoder.norm.weight"] = s["encoder.norm.bias"] = (D,)
        s["encoder.head.weight"] = (1000, D)
        s["encoder.head.bias"] = (1000,)
    if dec["name"] == "linear":
        s["decoder.head.weight"] = (n, D)
        s["decoder.head.bias"] = (n,)
    else:
        dm = dec["d_model"]
        s["decoder.proj_dec.weight"] = (dm, D)
        s["decoder.proj_dec.bias"] = (dm,)
        s["decoder.cls_emb"] = (1, n, dm)
        s.update(block_shapes("decoder.blocks", dec["n_layers"], dm, dec["d_ff"]))
        s["decoder.decoder_norm.weight"] = s["decoder.decoder_norm.bias"] = (dm,)
        s["decoder.proj_patch"] = s["decoder.proj_classes"] = (dm, dm)
        s["decoder.mask_norm.weight"] = s["decoder.mask_norm.bias"] = (n,)
    return s


def block_shapes(prefix, layers, d, f):
    s = {}
    for i in range(layers):
        p = f"{prefix}.{i}."
        s[p + "norm1.weight"] = s[p + "norm1.bias"] = s[p + "norm2.weight"] = s[p + "norm2.bias"] = (d,)
        s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = (3 * d, d), (3 * d,)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = (d, d), (d,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (f, d), (f,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (d, f), (d,)
    return s


def segm_config(n_cls, encoder, decoder):
    return {"architectures": ["Segmenter"], "model_type": "segmenter", "n_cls": n_cls, "encoder": encoder,
            "decoder": decoder, "id2label": {str(i): f"class_{i}" for i in range(n_cls)}}


def random_sd(cfg, seed):
    sd = random_state_dict(segm_shapes(cfg), seed)
    for k in ("decoder.proj_patch", "decoder.proj_classes"):   # (d_model ** -0.5) * randn, as upstream
        if k in sd:
            sd[k] = sd[k] * sd[k].shape[0] ** -0.5 / sd[k].std()
    return sd


def cases(d, cfg, sd, sizes, seed):
    for i, (name, b, h, w, note) in enumerate(sizes):
        x = random_pixels(seed + i, b, h, w)
        write_case(d, name, x, {"logits": segmenter_forward(cfg, sd, x)}, note, UPSTREAM)


def generate(out, conf):
    # The conformance weights at other sizes.
    for name in ("segmenter-linear-rand", "segmenter-mask-rand"):
        src = os.path.join(conf, name)
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        sd = load_safetensors(os.path.join(src, "model.safetensors"))
        d = write_model(out, name.replace("-rand", "-sizes-rand"), cfg, sd)
        cases(d, cfg, sd, [
            ("72x56", 2, 72, 56, "not a multiple of 8: zero padding to 72x56 -> 9x7 grid, pos_embed resized, crop"),
            ("61x77", 1, 61, 77, "padding on both sides: 64x80 -> 8x10 grid, pos_embed resized"),
            ("128x32", 1, 128, 32, "16x4 grid: same token count as 8x8, so Segmenter does not resize pos_embed"),
            ("40x40", 3, 40, 40, "smaller than training: 5x5 grid, batch of 3"),
        ], 101)
        # Sliding windows (outside cases/: not a model_forward output). 50x90 is enlarged to 64x115
        # (short side = window), then 64x64 windows every 40 pixels, averaged.
        x = random_pixels(150, 1, 50, 90)
        sw = os.path.join(d, "sliding")
        save_safetensors(os.path.join(sw, "inputs.safetensors"), {"pixel_values": x})
        save_safetensors(os.path.join(sw, "expected.safetensors"),
                         {"logits": sliding_window_logits(cfg, sd, x, 64, 40)})
        write_json(os.path.join(sw, "meta.json"), {"window_size": 64, "window_stride": 40, "upstream": UPSTREAM})
    # Distilled encoder, rectangular training size, decoder narrower than the encoder.
    cfg = segm_config(7, {"image_size": [48, 64], "patch_size": 8, "n_layers": 2, "d_model": 48, "n_heads": 3,
                          "d_ff": 96, "distilled": True, "layer_norm_eps": 1e-5},
                      {"name": "mask_transformer", "n_layers": 1, "n_heads": 2, "d_model": 32, "d_ff": 64,
                       "layer_norm_eps": 1e-5})
    sd = random_sd(cfg, 11)
    d = write_model(out, "segmenter-mask-distilled-rand", cfg, sd)
    cases(d, cfg, sd, [("native", 2, 48, 64, "training size"),
                       ("50x70", 1, 50, 70, "padding to 56x72, pos_embed resized 6x8 -> 7x9")], 201)
    # Hugging Face DINOv2 backbone (transformers' Dinov2Model names under encoder.) with a linear and a
    # mask-transformer decoder.
    bb = hf_config("dinov2", "Dinov2Model", hidden_size=48, num_attention_heads=3, num_hidden_layers=2,
                   patch_size=7, image_size=42, layer_norm_eps=1e-6)
    for dec, seed in (({"name": "linear"}, 21),
                      ({"name": "mask_transformer", "n_layers": 1, "n_heads": 3, "d_model": 48, "d_ff": 96,
                        "layer_norm_eps": 1e-5}, 22)):
        cfg = segm_config(5, {"backbone_config": bb}, dec)
        sd = random_sd(cfg, seed)
        kind = "linear" if dec["name"] == "linear" else "mask"
        d = write_model(out, f"segmenter-dinov2-{kind}-rand", cfg, sd)
        cases(d, cfg, sd, [("native", 1, 42, 42, "training size"),
                           ("45x30", 2, 45, 30, "padding to 49x35, bicubic pos interpolation to 7x5")], 301)


# ---------------------------------------------------------------------------------------------------- checks

def check(conf, tol=1e-5):
    ok = True
    for name in ("segmenter-linear-rand", "segmenter-mask-rand"):
        d = os.path.join(conf, name)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        sd = load_safetensors(os.path.join(d, "model.safetensors"))
        for case in sorted(os.listdir(os.path.join(d, "cases"))):
            c = os.path.join(d, "cases", case)
            x = load_safetensors(os.path.join(c, "inputs.safetensors"))["pixel_values"]
            want = load_safetensors(os.path.join(c, "expected.safetensors"))["logits"]
            diff = (segmenter_forward(cfg, sd, x) - want).abs().max().item()
            ok &= diff <= tol
            print(f"  port vs {name}/{case}: logits max abs diff {diff:.2e} {'ok' if diff <= tol else 'FAIL'}")
    return ok


def check_converter(conf):
    """An original Segmenter checkpoint (checkpoint.pth {"model": state_dict} + variant.yml) of the mask
    conformance model goes through tools/convert_segmenter.py and must come out as the conformance folder."""
    import yaml
    src = os.path.join(conf, "segmenter-mask-rand")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    sd = load_safetensors(os.path.join(src, "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": sd, "epoch": 1}, os.path.join(tmp, "checkpoint.pth"))
        enc = cfg["encoder"]
        variant = {"net_kwargs": {"backbone": "vit_tiny_patch16_384", "image_size": enc["image_size"],
                                  "patch_size": enc["patch_size"], "n_layers": enc["n_layers"], "d_model": enc["d_model"],
                                  "n_heads": enc["n_heads"], "normalization": "vit", "distilled": False,
                                  "drop_path_rate": 0.1, "dropout": 0.0, "n_cls": cfg["n_cls"],
                                  "decoder": {"name": "mask_transformer", "drop_path_rate": 0.0, "dropout": 0.1,
                                              "n_layers": cfg["decoder"]["n_layers"]}},
                   "dataset_kwargs": {"normalization": "vit", "crop_size": 64, "image_size": 64},
                   "inference_kwargs": {"im_size": 64, "window_size": 64, "window_stride": 48}}
        with open(os.path.join(tmp, "variant.yml"), "w") as f:
            yaml.safe_dump(variant, f)
        out = os.path.join(tmp, "out")
        # Segmenter's factory fixes the mask decoder at n_heads = d_model // 64, d_ff = 4 d_model; the
        # conformance model has 4 heads at d_model 64, so say it explicitly.
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_segmenter.py"),
                        os.path.join(tmp, "checkpoint.pth"), out, "--decoder-heads", "4"], check=True)
        got_sd = load_safetensors(os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json")) as f:
            got = json.load(f)
        with open(os.path.join(out, "preprocessor_config.json")) as f:
            pre = json.load(f)
    ok = set(got_sd) == set(sd) and all(torch.equal(got_sd[k], sd[k]) for k in sd)
    for k in ("n_cls", "model_type", "architectures"):
        ok &= got[k] == cfg[k]
    for k, v in cfg["encoder"].items():
        ok &= got["encoder"].get(k) == v
    for k, v in cfg["decoder"].items():
        ok &= got["decoder"].get(k) == v
    ok &= pre["image_mean"] == [0.5, 0.5, 0.5] and pre["do_resize"] is False
    print(f"  tools/convert_segmenter.py on an original-layout checkpoint: {'ok' if ok else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (tests/fixtures/models)")
    ap.add_argument("--check", action="store_true", help="only validate the port and the converter")
    ap.add_argument("--conformance", help="conformance folder (default: tests/fixtures/conformance)")
    args = ap.parse_args()
    conf = find_conformance(args.conformance)
    if not conf:
        sys.exit("no conformance folder found")
    print(f"checking the Segmenter port against {conf}")
    if not check(conf):
        sys.exit("the port disagrees with the upstream-computed conformance outputs")
    if not check_converter(conf):
        sys.exit("the converter does not reproduce the conformance folder")
    if args.out:
        generate(args.out, conf)


if __name__ == "__main__":
    main()
