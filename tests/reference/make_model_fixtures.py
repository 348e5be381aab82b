#!/usr/bin/env python3
"""Regenerate tests/fixtures/models: small random-weight ViT checkpoints of every supported family, in
the layout users have them, with inputs and the outputs the upstream code computes.

    /usr/bin/python3 tests/reference/make_model_fixtures.py --out tests/fixtures/models
    /usr/bin/python3 tests/reference/make_model_fixtures.py --check [--conformance DIR]

Needs only torch (>= 1.11, for bicubic antialias), torchvision, numpy. Where the upstream library is
not installable here (transformers, timm), the forward pass is ported below line by line from the
upstream source (transformers 4.40.2, timm 1.0.x), and `--check` proves each port on the conformance
examples that the real upstream code produced (tests/fixtures/conformance, or ../shared/conformance).
torchvision's VisionTransformer is used as is.

Every parameter (biases, norms, tokens, position embeddings, layer scales) is random with a non-trivial
spread, so a consumer that mishandles any of them fails.
"""
import argparse
import copy
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
torch.set_grad_enabled(False)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


# ----------------------------------------------------------------------------------------------------
# safetensors (F32 only): 8-byte little-endian header length, JSON header padded with spaces to a
# multiple of 8, then the raw little-endian tensors back to back.

def save_safetensors(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        data = t.numpy().astype('<f4', copy=False).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = metadata if metadata is not None else {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    back = load_safetensors(path)  # self-check of the writer
    assert set(back) == set(tensors), path
    for name, t in tensors.items():
        assert torch.equal(back[name], t.detach().to(torch.float32).cpu()), (path, name)


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}


def load_safetensors(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        if info["dtype"] == "BF16":
            a = np.frombuffer(buf[8 + n + b:8 + n + e], dtype="<u2").astype(np.uint32) << 16
            arr = a.view(np.float32)
        else:
            arr = np.frombuffer(buf[8 + n + b:8 + n + e], dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = torch.from_numpy(arr.astype(np.float32).reshape(info["shape"]).copy())
    return out


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------
# random parameters

def randomize_(name, t, gen):
    """Fill t in place: every kind of parameter gets a spread that makes a mistake visible."""
    base = name.rsplit(".", 1)[-1]
    if t.dim() >= 2 and base in ("weight", "in_proj_weight"):
        fan_in = int(np.prod(t.shape[1:]))
        t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(fan_in))
    elif base in ("gamma", "lambda1"):                      # layer scale
        t.copy_(0.5 * torch.randn(t.shape, generator=gen) + 0.3)
    elif t.dim() == 1 and base == "weight":                 # norm scale
        t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=gen))
    elif base.endswith("bias"):
        t.copy_(0.2 * torch.randn(t.shape, generator=gen))
    elif "pos" in name:                                     # position embeddings
        t.copy_(0.4 * torch.randn(t.shape, generator=gen))
    else:                                                   # cls / dist / register / mask tokens
        t.copy_(0.5 * torch.randn(t.shape, generator=gen))


def random_state_dict(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(shapes):
        t = torch.empty(shapes[name])
        randomize_(name, t, gen)
        sd[name] = t
    return sd


def random_pixels(seed, b, h, w):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((b, 3, h, w), generator=gen)


# ----------------------------------------------------------------------------------------------------
# shared numerics

def linear(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def layer_norm(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def patchify(x, sd, p, patch):
    """Conv2d(kernel=stride=patch) -> [B, gh, gw, D]."""
    y = F.conv2d(x, sd[p + ".weight"], sd.get(p + ".bias"), stride=patch)
    return y.permute(0, 2, 3, 1)


def mha(q, k, v, heads, scale_q_first):
    """q,k,v [B,T,D] -> [B,T,D]. scale_q_first: timm scales q before q@k^T, transformers scales the scores."""
    B, T, D = q.shape
    hd = D // heads
    q, k, v = (t.reshape(B, T, heads, hd).transpose(1, 2) for t in (q, k, v))
    if scale_q_first:
        attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
    else:
        attn = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, T, D)


ACT = {
    "gelu": lambda x: F.gelu(x),                             # exact (erf) GELU: HF "gelu", timm nn.GELU
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),    # timm QuickGELU (OpenAI CLIP)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# ----------------------------------------------------------------------------------------------------
# transformers 4.40.2 ports: ViT (ViTModel / ViTForImageClassification), DeiT (DeiTForImageClassification /
# ...WithTeacher) and DINOv2 (Dinov2Model / Dinov2ForImageClassification).

def hf_interpolate_pos_encoding(pos, num_patches, height, width, patch, num_prefix):
    """ViTEmbeddings/Dinov2Embeddings.interpolate_pos_encoding of transformers 4.40: a scale_factor of
    (h0 + 0.1) / sqrt(N) -- the interpolation kernel uses that factor, not out/in -- bicubic
    (a = -0.75), align_corners=False, no antialias. No-op when the patch count matches and the
    *pixel* height equals the width."""
    num_positions = pos.shape[1] - num_prefix
    if num_patches == num_positions and height == width:
        return pos
    cls_pos, patch_pos = pos[:, :num_prefix], pos[:, num_prefix:]
    dim = pos.shape[-1]
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    side = int(math.sqrt(num_positions))
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=(float(h0 / math.sqrt(num_positions)),
                                                       float(w0 / math.sqrt(num_positions))),
                              mode="bicubic", align_corners=False)
    assert int(h0) == patch_pos.shape[-2] and int(w0) == patch_pos.shape[-1]
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)


def hf_layer(x, sd, p, cfg, family):
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    act = ACT[cfg.get("hidden_act", "gelu")]
    if family == "dinov2":
        n1, n2 = p + "norm1", p + "norm2"
    else:
        n1, n2 = p + "layernorm_before", p + "layernorm_after"
    h = layer_norm(x, sd, n1, eps)
    a = p + "attention.attention."
    ctx = mha(linear(h, sd, a + "query"), linear(h, sd, a + "key"), linear(h, sd, a + "value"), heads, False)
    y = linear(ctx, sd, p + "attention.output.dense")
    if family == "dinov2":
        y = y * sd[p + "layer_scale1.lambda1"]
    x = x + y
    h = layer_norm(x, sd, n2, eps)
    if family == "dinov2":
        if cfg.get("use_swiglu_ffn", False):
            x1, x2 = linear(h, sd, p + "mlp.weights_in").chunk(2, dim=-1)
            y = linear(F.silu(x1) * x2, sd, p + "mlp.weights_out")
        else:
            y = linear(act(linear(h, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        y = y * sd[p + "layer_scale2.lambda1"]
    else:
        y = linear(act(linear(h, sd, p + "intermediate.dense")), sd, p + "output.dense")
    return x + y


def hf_backbone(cfg, sd, prefix, pixel_values, family, interpolate_pos_encoding=False):
    """Embeddings + encoder + final layernorm -> last_hidden_state [B, T, D]."""
    B, _, H, W = pixel_values.shape
    patch = cfg["patch_size"]
    e = prefix + "embeddings."
    x = patchify(pixel_values, sd, e + "patch_embeddings.projection", patch).flatten(1, 2)
    prefix_tokens = [sd[e + "cls_token"].expand(B, -1, -1)]
    if family == "deit":
        prefix_tokens.append(sd[e + "distillation_token"].expand(B, -1, -1))
    x = torch.cat(prefix_tokens + [x], dim=1)
    pos = sd[e + "position_embeddings"]
    if family == "dinov2" or interpolate_pos_encoding:  # DINOv2 always calls interpolate_pos_encoding
        assert family != "deit", "DeiT has no interpolate_pos_encoding in transformers 4.40"
        pos = hf_interpolate_pos_encoding(pos, x.shape[1] - 1, H, W, patch, 1)
    else:
        isz = cfg["image_size"]
        isz = isz if isinstance(isz, (list, tuple)) else (isz, isz)
        assert (H, W) == tuple(isz), "input size differs from config and interpolate_pos_encoding is off"
    x = x + pos
    for i in range(cfg["num_hidden_layers"]):
        x = hf_layer(x, sd, f"{prefix}encoder.layer.{i}.", cfg, family)
    return layer_norm(x, sd, prefix + "layernorm", cfg["layer_norm_eps"])


def hf_forward(cfg, sd, pixel_values, interpolate_pos_encoding=False):
    arch = cfg["architectures"][0]
    fam = cfg["model_type"]
    if arch == "ViTModel":
        h = hf_backbone(cfg, sd, "", pixel_values, fam, interpolate_pos_encoding)
        out = {"last_hidden_state": h}
        if "pooler.dense.weight" in sd:
            out["pooler_output"] = torch.tanh(linear(h[:, 0], sd, "pooler.dense"))
        return out
    if arch == "ViTForImageClassification":
        h = hf_backbone(cfg, sd, "vit.", pixel_values, fam, interpolate_pos_encoding)
        return {"logits": linear(h[:, 0], sd, "classifier"), "last_hidden_state": h}
    if arch == "DeiTForImageClassification":
        h = hf_backbone(cfg, sd, "deit.", pixel_values, fam)
        return {"logits": linear(h[:, 0], sd, "classifier"), "last_hidden_state": h}
    if arch == "DeiTForImageClassificationWithTeacher":
        h = hf_backbone(cfg, sd, "deit.", pixel_values, fam)
        cls_logits = linear(h[:, 0], sd, "cls_classifier")
        dist_logits = linear(h[:, 1], sd, "distillation_classifier")
        return {"logits": (cls_logits + dist_logits) / 2, "cls_logits": cls_logits,
                "distillation_logits": dist_logits, "last_hidden_state": h}
    if arch == "Dinov2Model":
        h = hf_backbone(cfg, sd, "", pixel_values, fam)
        return {"last_hidden_state": h, "pooler_output": h[:, 0]}
    if arch == "Dinov2ForImageClassification":
        h = hf_backbone(cfg, sd, "dinov2.", pixel_values, fam)
        linear_input = torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1)
        return {"logits": linear(linear_input, sd, "classifier"), "last_hidden_state": h}
    raise ValueError(f"unsupported architecture {arch}")


def hf_shapes(cfg):
    """State-dict names and shapes that transformers 4.40 gives the model described by cfg."""
    arch, fam = cfg["architectures"][0], cfg["model_type"]
    D, L, P, C = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["patch_size"], cfg.get("num_channels", 3)
    isz = cfg["image_size"]
    gh, gw = (isz // P, isz // P) if isinstance(isz, int) else (isz[0] // P, isz[1] // P)
    prefix = {"ViTForImageClassification": "vit.", "DeiTForImageClassification": "deit.",
              "DeiTForImageClassificationWithTeacher": "deit.",
              "Dinov2ForImageClassification": "dinov2."}.get(arch, "")
    n_prefix = 2 if fam == "deit" else 1
    s = {}
    e = prefix + "embeddings."
    s[e + "cls_token"] = (1, 1, D)
    if fam == "deit":
        s[e + "distillation_token"] = (1, 1, D)
    if fam == "dinov2":
        s[e + "mask_token"] = (1, D)
    s[e + "patch_embeddings.projection.weight"] = (D, C, P, P)
    s[e + "patch_embeddings.projection.bias"] = (D,)
    s[e + "position_embeddings"] = (1, gh * gw + n_prefix, D)
    for i in range(L):
        p = f"{prefix}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s[p + f"attention.attention.{n}.weight"] = (D, D)
            if cfg.get("qkv_bias", True):
                s[p + f"attention.attention.{n}.bias"] = (D,)
        s[p + "attention.output.dense.weight"] = (D, D)
        s[p + "attention.output.dense.bias"] = (D,)
        if fam == "dinov2":
            for n in ("norm1", "norm2"):
                s[p + n + ".weight"] = (D,)
                s[p + n + ".bias"] = (D,)
            s[p + "layer_scale1.lambda1"] = (D,)
            s[p + "layer_scale2.lambda1"] = (D,)
            hid = int(D * cfg["mlp_ratio"])
            if cfg.get("use_swiglu_ffn", False):
                hid = (int(hid * 2 / 3) + 7) // 8 * 8
                s[p + "mlp.weights_in.weight"] = (2 * hid, D)
                s[p + "mlp.weights_in.bias"] = (2 * hid,)
                s[p + "mlp.weights_out.weight"] = (D, hid)
                s[p + "mlp.weights_out.bias"] = (D,)
            else:
                s[p + "mlp.fc1.weight"] = (hid, D)
                s[p + "mlp.fc1.bias"] = (hid,)
                s[p + "mlp.fc2.weight"] = (D, hid)
                s[p + "mlp.fc2.bias"] = (D,)
        else:
            I = cfg["intermediate_size"]
            for n in ("layernorm_before", "layernorm_after"):
                s[p + n + ".weight"] = (D,)
                s[p + n + ".bias"] = (D,)
            s[p + "intermediate.dense.weight"] = (I, D)
            s[p + "intermediate.dense.bias"] = (I,)
            s[p + "output.dense.weight"] = (D, I)
            s[p + "output.dense.bias"] = (D,)
    s[prefix + "layernorm.weight"] = (D,)
    s[prefix + "layernorm.bias"] = (D,)
    nl = len(cfg.get("id2label", {}))
    if arch == "ViTModel":
        s["pooler.dense.weight"] = (D, D)
        s["pooler.dense.bias"] = (D,)
    elif arch in ("ViTForImageClassification", "DeiTForImageClassification"):
        s["classifier.weight"] = (nl, D)
        s["classifier.bias"] = (nl,)
    elif arch == "DeiTForImageClassificationWithTeacher":
        for n in ("cls_classifier", "distillation_classifier"):
            s[n + ".weight"] = (nl, D)
            s[n + ".bias"] = (nl,)
    elif arch == "Dinov2ForImageClassification":
        s["classifier.weight"] = (nl, 2 * D)
        s["classifier.bias"] = (nl,)
    return s


def hf_config(model_type, arch, num_labels=0, **kw):
    """config.json the way transformers 4.40.2 writes it (save_pretrained)."""
    cfg = {"architectures": [arch], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.0, "initializer_range": 0.02, "model_type": model_type,
           "num_channels": 3, "qkv_bias": True, "torch_dtype": "float32", "transformers_version": "4.40.2"}
    if model_type in ("vit", "deit"):
        cfg["encoder_stride"] = 16
    if model_type == "dinov2":
        cfg.update({"apply_layernorm": True, "drop_path_rate": 0.0, "layerscale_value": 1.0, "mlp_ratio": 4,
                    "use_swiglu_ffn": False, "layer_norm_eps": 1e-6})
    cfg.update(kw)
    if num_labels:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        cfg["id2label"] = {str(i): names[i] for i in range(num_labels)}
        cfg["label2id"] = {names[i]: i for i in range(num_labels)}
    if model_type == "dinov2":
        n = cfg["num_hidden_layers"]
        cfg.update({"out_features": [f"stage{n}"], "out_indices": [n], "reshape_hidden_states": True,
                    "stage_names": ["stem"] + [f"stage{i + 1}" for i in range(n)]})
    return dict(sorted(cfg.items()))


# ----------------------------------------------------------------------------------------------------
# timm 1.0 port: VisionTransformer (timm/models/vision_transformer.py) and VisionTransformerDistilled
# (timm/models/deit.py), configured the way timm.create_model builds them from a Hugging Face `timm/`
# folder: the architecture's own model_args, overridden by config.json's model_args.

TIMM_ARCHS = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_clip_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
                                      norm_layer="nn.LayerNorm"),
    "vit_base_patch16_clip_quickgelu_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                                pre_norm=True, norm_layer="nn.LayerNorm", act_layer="quick_gelu"),
    "vit_base_patch14_reg4_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                         reg_tokens=4, no_embed_class=True),
    "deit_tiny_distilled_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, distilled=True),
}

TIMM_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token", embed_dim=768,
                     depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, init_values=None, class_token=True,
                     no_embed_class=False, reg_tokens=0, pre_norm=False, fc_norm=None, dynamic_img_size=False,
                     act_layer="gelu", norm_layer=None, distilled=False)


def timm_resolve(config):
    """config.json (save_for_hf layout) -> the VisionTransformer constructor arguments."""
    a = dict(TIMM_DEFAULTS)
    a.update(TIMM_ARCHS[config["architecture"]])
    a["img_size"] = tuple(config["pretrained_cfg"]["input_size"][-2:])
    a["num_classes"] = config["num_classes"]
    a.update(config.get("model_args", {}))
    if isinstance(a["img_size"], int):
        a["img_size"] = (a["img_size"], a["img_size"])
    # VisionTransformer defaults norm_layer to LayerNorm(eps=1e-6); the CLIP towers pass nn.LayerNorm (eps=1e-5)
    a["norm_eps"] = 1e-5 if a["norm_layer"] == "nn.LayerNorm" else 1e-6
    a["use_fc_norm"] = a["global_pool"] in ("avg", "avgmax", "max") if a["fc_norm"] is None else a["fc_norm"]
    a["num_prefix_tokens"] = (1 if a["class_token"] else 0) + a["reg_tokens"] + (1 if a["distilled"] else 0)
    assert a["global_pool"] in ("", "avg", "avgmax", "max", "token"), "attention pooling ('map') not ported"
    return a


def timm_shapes(a):
    D, P, C = a["embed_dim"], a["patch_size"], a["in_chans"]
    gh, gw = a["img_size"][0] // P, a["img_size"][1] // P
    hid = int(D * a["mlp_ratio"])
    s = {"patch_embed.proj.weight": (D, C, P, P)}
    if not a["pre_norm"]:                              # bias=not pre_norm (CLIP towers have no patch bias)
        s["patch_embed.proj.bias"] = (D,)
    if a["class_token"]:
        s["cls_token"] = (1, 1, D)
    if a["reg_tokens"]:
        s["reg_token"] = (1, a["reg_tokens"], D)
    if a["distilled"]:
        s["dist_token"] = (1, 1, D)
    s["pos_embed"] = (1, gh * gw + (0 if a["no_embed_class"] else a["num_prefix_tokens"]), D)
    if a["pre_norm"]:
        s["norm_pre.weight"] = s["norm_pre.bias"] = (D,)
    for i in range(a["depth"]):
        p = f"blocks.{i}."
        s[p + "norm1.weight"] = s[p + "norm1.bias"] = (D,)
        s[p + "attn.qkv.weight"] = (3 * D, D)
        if a["qkv_bias"]:
            s[p + "attn.qkv.bias"] = (3 * D,)
        s[p + "attn.proj.weight"] = (D, D)
        s[p + "attn.proj.bias"] = (D,)
        s[p + "norm2.weight"] = s[p + "norm2.bias"] = (D,)
        s[p + "mlp.fc1.weight"] = (hid, D)
        s[p + "mlp.fc1.bias"] = (hid,)
        s[p + "mlp.fc2.weight"] = (D, hid)
        s[p + "mlp.fc2.bias"] = (D,)
        if a["init_values"]:
            s[p + "ls1.gamma"] = s[p + "ls2.gamma"] = (D,)
    n = "fc_norm" if a["use_fc_norm"] else "norm"
    s[n + ".weight"] = s[n + ".bias"] = (D,)
    if a["num_classes"] > 0:
        s["head.weight"] = (a["num_classes"], D)
        s["head.bias"] = (a["num_classes"],)
        if a["distilled"]:
            s["head_dist.weight"] = (a["num_classes"], D)
            s["head_dist.bias"] = (a["num_classes"],)
    return s


def timm_resample_abs_pos_embed(posemb, new_size, old_size, num_prefix_tokens):
    """timm.layers.resample_abs_pos_embed: F.interpolate(size=new_size, bicubic, antialias=True),
    align_corners=False. Note antialias=True selects PyTorch's separable AA kernel (bicubic a = -0.5,
    like PIL), even when upsampling. No-op only when the token count matches and new_size is square."""
    num_pos_tokens = posemb.shape[1]
    if new_size[0] * new_size[1] + num_prefix_tokens == num_pos_tokens and new_size[0] == new_size[1]:
        return posemb
    prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    D = posemb.shape[-1]
    posemb = posemb.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=tuple(new_size), mode="bicubic", antialias=True)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, D)
    return torch.cat([prefix, posemb], dim=1) if num_prefix_tokens else posemb


def timm_forward_features(a, sd, x):
    B = x.shape[0]
    P = a["patch_size"]
    if not a["dynamic_img_size"]:
        assert tuple(x.shape[-2:]) == tuple(a["img_size"]), "timm PatchEmbed is strict unless dynamic_img_size"
    else:
        assert x.shape[-2] % P == 0 and x.shape[-1] % P == 0, "dynamic_img_pad is off: sizes must divide"
    x = patchify(x, sd, "patch_embed.proj", P)                      # [B, gh, gw, D]
    gh, gw, D = x.shape[1], x.shape[2], x.shape[3]
    pos = sd["pos_embed"]
    if a["dynamic_img_size"]:
        pos = timm_resample_abs_pos_embed(pos, (gh, gw), (a["img_size"][0] // P, a["img_size"][1] // P),
                                          0 if a["no_embed_class"] else a["num_prefix_tokens"])
    x = x.reshape(B, -1, D)
    to_cat = []
    if a["class_token"]:
        to_cat.append(sd["cls_token"].expand(B, -1, -1))
    if a["reg_tokens"]:
        to_cat.append(sd["reg_token"].expand(B, -1, -1))
    if a["distilled"]:
        to_cat.append(sd["dist_token"].expand(B, -1, -1))
    if a["no_embed_class"]:
        x = torch.cat(to_cat + [x + pos], dim=1)
    else:
        x = torch.cat(to_cat + [x], dim=1) + pos
    eps = a["norm_eps"]
    if a["pre_norm"]:
        x = layer_norm(x, sd, "norm_pre", eps)
    act = ACT[a["act_layer"]]
    for i in range(a["depth"]):
        p = f"blocks.{i}."
        h = layer_norm(x, sd, p + "norm1", eps)
        q, k, v = linear(h, sd, p + "attn.qkv").chunk(3, dim=-1)    # qkv.reshape(B,N,3,H,hd): q | k | v
        y = linear(mha(q, k, v, a["num_heads"], True), sd, p + "attn.proj")
        if a["init_values"]:
            y = y * sd[p + "ls1.gamma"]
        x = x + y
        h = layer_norm(x, sd, p + "norm2", eps)
        y = linear(act(linear(h, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        if a["init_values"]:
            y = y * sd[p + "ls2.gamma"]
        x = x + y
    if not a["use_fc_norm"]:
        x = layer_norm(x, sd, "norm", eps)
    return x


def timm_forward_head(a, sd, x, pre_logits=False):
    if a["distilled"]:
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        return (linear(x, sd, "head") + linear(x_dist, sd, "head_dist")) / 2
    pool, npt = a["global_pool"], a["num_prefix_tokens"]
    if pool == "token":
        x = x[:, 0]
    elif pool == "avg":
        x = x[:, npt:].mean(dim=1)
    elif pool == "max":
        x = x[:, npt:].amax(dim=1)
    elif pool == "avgmax":
        x = 0.5 * (x[:, npt:].amax(dim=1) + x[:, npt:].mean(dim=1))
    if a["use_fc_norm"]:
        x = layer_norm(x, sd, "fc_norm", a["norm_eps"])
    if pre_logits or a["num_classes"] == 0:
        return x
    return linear(x, sd, "head")


def timm_forward(config, sd, x):
    a = timm_resolve(config)
    feats = timm_forward_features(a, sd, x)
    return {"logits": timm_forward_head(a, sd, feats), "features": feats,
            "pre_logits": timm_forward_head(a, sd, feats, pre_logits=True)}


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INCEPTION_MEAN, INCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def timm_config(arch, num_classes, model_args, tag, mean, std, crop_pct=0.9, classifier="head", pool=None):
    """config.json as timm's save_for_hf writes it (push_to_hf_hub): root architecture / num_classes /
    num_features / global_pool, the create_model kwargs as model_args, and the pretrained_cfg."""
    a = dict(TIMM_DEFAULTS)
    a.update(TIMM_ARCHS[arch])
    a.update(model_args)
    img = model_args["img_size"]
    img = [img, img] if isinstance(img, int) else list(img)
    cfg = {"architecture": arch, "num_classes": num_classes, "num_features": a["embed_dim"]}
    if a["global_pool"]:
        cfg["global_pool"] = a["global_pool"]
    cfg["model_args"] = model_args
    cfg["pretrained_cfg"] = {
        "tag": tag, "custom_load": False, "input_size": [3] + img, "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": crop_pct, "crop_mode": "center", "mean": mean, "std": std,
        "num_classes": num_classes, "pool_size": None, "first_conv": "patch_embed.proj",
        "classifier": classifier, "license": "apache-2.0"}
    return cfg


# ----------------------------------------------------------------------------------------------------
# writing fixtures

GENERATOR = "tests/reference/make_model_fixtures.py"


def write_model(out, name, config, sd):
    d = os.path.join(out, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    write_json(os.path.join(d, "config.json"), config)
    save_safetensors(os.path.join(d, "model.safetensors"), sd)
    return d


def write_case(d, case, pixel_values, outputs, description, upstream, forward_kwargs=None):
    c = os.path.join(d, "cases", case)
    save_safetensors(os.path.join(c, "inputs.safetensors"), {"pixel_values": pixel_values})
    save_safetensors(os.path.join(c, "expected.safetensors"), outputs)
    B, _, H, W = pixel_values.shape
    write_json(os.path.join(c, "meta.json"), {
        "case": case, "description": description, "forward_kwargs": forward_kwargs or {},
        "input_shape": [B, 3, H, W], "outputs": {k: list(v.shape) for k, v in sorted(outputs.items())},
        "upstream": upstream, "generator": GENERATOR})
    for k, v in outputs.items():
        assert torch.isfinite(v).all(), (d, case, k)
    print(f"  {os.path.relpath(c, os.path.dirname(d))}: " +
          ", ".join(f"{k}{list(v.shape)} |max| {v.abs().max().item():.3g}" for k, v in sorted(outputs.items())))


def gen_torchvision(out):
    import torchvision
    up = f"torchvision {torchvision.__version__.split('a')[0]} torchvision.models.VisionTransformer (eval)"
    specs = [
        ("tv-vit-rand", dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10), 101),
        ("tv-vit-repr-rand", dict(image_size=24, patch_size=6, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96,
                                  num_classes=5, representation_size=40), 102),
    ]
    for name, kw, seed in specs:
        torch.manual_seed(seed)
        model = torchvision.models.VisionTransformer(**kw).eval()
        gen = torch.Generator().manual_seed(seed)
        for pname, p in model.state_dict().items():
            randomize_(pname, p, gen)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        config = {"architectures": ["torchvision.VisionTransformer"], **kw}
        config.setdefault("representation_size", None)
        config["id2label"] = {str(i): f"class_{i}" for i in range(kw["num_classes"])}
        d = write_model(out, name, config, sd)
        print(name)
        S = kw["image_size"]
        for case, b, s in (("native_b1", 1, seed * 10 + 1), ("native_b3", 3, seed * 10 + 3)):
            x = random_pixels(s, b, S, S)
            logits = model(x)
            # the encoder output (after encoder.ln) too, to localise a mismatch
            tokens = model._process_input(x)
            tokens = torch.cat([model.class_token.expand(b, -1, -1), tokens], dim=1)
            enc = model.encoder(tokens)
            outs = {"logits": logits, "encoder_output": enc}
            write_case(d, case, x, outs, f"{b} random image(s) {S}x{S}; encoder_output = model.encoder(...) "
                       "[B, 1+N, D] after encoder.ln", up)


def gen_hf(out):
    up = "port of transformers 4.40.2 (validated by --check against conformance examples)"
    # ViTForImageClassification: another size, no qkv bias, eps 1e-6, patch 4
    cfg = hf_config("vit", "ViTForImageClassification", num_labels=4, hidden_size=48, num_attention_heads=3,
                    num_hidden_layers=2, intermediate_size=96, patch_size=4, image_size=24, layer_norm_eps=1e-6,
                    qkv_bias=False)
    sd = random_state_dict(hf_shapes(cfg), 201)
    d = write_model(out, "vit-p4-h48-noqkvbias-rand", cfg, sd)
    print("vit-p4-h48-noqkvbias-rand")
    x = random_pixels(2011, 3, 24, 24)
    write_case(d, "native_b3", x, hf_forward(cfg, sd, x), "3 random images 24x24 (grid 6x6)", up)
    x = random_pixels(2012, 2, 32, 20)
    write_case(d, "interp_32x20", x, hf_forward(cfg, sd, x, True),
               "interpolate_pos_encoding=True, non-square 32x20 (grid 8x5)", up, {"interpolate_pos_encoding": True})
    x = random_pixels(2013, 2, 30, 22)
    write_case(d, "interp_30x22", x, hf_forward(cfg, sd, x, True),
               "interpolate_pos_encoding=True, 30x22 not a multiple of the patch: the conv drops the remainder "
               "rows/columns, grid 7x5", up, {"interpolate_pos_encoding": True})
    x = random_pixels(2014, 1, 24, 24)
    write_case(d, "native_b1_interp_flag", x, hf_forward(cfg, sd, x, True),
               "interpolate_pos_encoding=True at the native square size: a no-op", up,
               {"interpolate_pos_encoding": True})

    # ViTModel with its pooler (add_pooling_layer=True)
    cfg = hf_config("vit", "ViTModel", hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                    intermediate_size=64, patch_size=8, image_size=32, layer_norm_eps=1e-12)
    sd = random_state_dict(hf_shapes(cfg), 202)
    d = write_model(out, "vitmodel-pooler-rand", cfg, sd)
    print("vitmodel-pooler-rand")
    x = random_pixels(2021, 2, 32, 32)
    write_case(d, "native", x, hf_forward(cfg, sd, x), "2 random images 32x32; pooler = tanh(dense(h[:, 0]))", up)
    x = random_pixels(2022, 2, 40, 56)
    write_case(d, "interp_40x56", x, hf_forward(cfg, sd, x, True),
               "interpolate_pos_encoding=True, 40x56 (grid 5x7)", up, {"interpolate_pos_encoding": True})

    # DeiTForImageClassification (no teacher head: logits from the CLS token only; the distillation token
    # is still in the sequence)
    cfg = hf_config("deit", "DeiTForImageClassification", num_labels=5, hidden_size=48, num_attention_heads=4,
                    num_hidden_layers=2, intermediate_size=96, patch_size=8, image_size=32, layer_norm_eps=1e-12)
    sd = random_state_dict(hf_shapes(cfg), 203)
    d = write_model(out, "deit-nodistill-rand", cfg, sd)
    print("deit-nodistill-rand")
    x = random_pixels(2031, 3, 32, 32)
    write_case(d, "native_b3", x, hf_forward(cfg, sd, x), "3 random images 32x32 (grid 4x4, 2 prefix tokens)", up)

    # Dinov2Model with SwiGLU FFN, 6x4 non-square interpolation
    cfg = hf_config("dinov2", "Dinov2Model", hidden_size=48, num_attention_heads=4, num_hidden_layers=2,
                    patch_size=7, image_size=28, use_swiglu_ffn=True, mlp_ratio=4)
    sd = random_state_dict(hf_shapes(cfg), 204)
    d = write_model(out, "dinov2-swiglu-rand", cfg, sd)
    print("dinov2-swiglu-rand")
    x = random_pixels(2041, 2, 28, 28)
    write_case(d, "native", x, hf_forward(cfg, sd, x), "2 random images 28x28 (grid 4x4): no interpolation", up)
    x = random_pixels(2042, 2, 42, 28)
    write_case(d, "interp_42x28", x, hf_forward(cfg, sd, x),
               "42x28 (grid 6x4): DINOv2 always interpolates when the grid differs", up)

    # Dinov2Model, plain MLP with mlp_ratio 2, layer scale, 6x4 interpolation, eps 1e-6
    cfg = hf_config("dinov2", "Dinov2Model", hidden_size=32, num_attention_heads=2, num_hidden_layers=3,
                    patch_size=14, image_size=42, mlp_ratio=2, qkv_bias=False)
    sd = random_state_dict(hf_shapes(cfg), 205)
    d = write_model(out, "dinov2-p14-mlp2-rand", cfg, sd)
    print("dinov2-p14-mlp2-rand")
    x = random_pixels(2051, 2, 42, 42)
    write_case(d, "native", x, hf_forward(cfg, sd, x), "2 random images 42x42 (grid 3x3)", up)
    x = random_pixels(2052, 2, 84, 56)
    write_case(d, "interp_84x56", x, hf_forward(cfg, sd, x), "84x56 (grid 6x4): interpolated", up)
    x = random_pixels(2053, 1, 70, 70)
    write_case(d, "interp_70x70", x, hf_forward(cfg, sd, x), "70x70 (grid 5x5, square): interpolated", up)

    # Dinov2ForImageClassification: classifier over [CLS, mean(patch tokens)]
    cfg = hf_config("dinov2", "Dinov2ForImageClassification", num_labels=6, hidden_size=32, num_attention_heads=4,
                    num_hidden_layers=2, patch_size=8, image_size=32, mlp_ratio=4)
    sd = random_state_dict(hf_shapes(cfg), 206)
    d = write_model(out, "dinov2-cls-rand", cfg, sd)
    print("dinov2-cls-rand")
    x = random_pixels(2061, 2, 32, 32)
    write_case(d, "native", x, hf_forward(cfg, sd, x),
               "2 random images 32x32; logits = classifier(cat(h[:,0], h[:,1:].mean(1)))", up)
    x = random_pixels(2062, 2, 48, 32)
    write_case(d, "interp_48x32", x, hf_forward(cfg, sd, x), "48x32 (grid 6x4): interpolated", up)


def gen_timm(out):
    up = "port of timm 1.0 VisionTransformer (validated by --check against conformance examples)"
    variants = [
        # (a) class token, 'token' pooling, no fc_norm; dynamic_img_size
        ("vit_tiny_patch16_224-token-dynamic", "vit_tiny_patch16_224", 6,
         dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, dynamic_img_size=True),
         "augreg_in21k_ft_in1k", INCEPTION_MEAN, INCEPTION_STD, 0.9, "head", 301,
         [("native", 2, 32, 32, "2 random images at the config size 32x32"),
          ("dynamic_48x32", 2, 48, 32, "dynamic_img_size: 48x32 (grid 6x4), pos_embed resampled from 4x4 with "
           "bicubic antialias=True; the class-token position is kept"),
          ("dynamic_24x24", 1, 24, 24, "dynamic_img_size: 24x24 (grid 3x3, downsampled pos_embed: antialias "
           "matters)")]),
        # (b) register tokens, no_embed_class, LayerScale, no head (num_classes=0) like the DINOv2 hub models
        ("vit_base_patch14_reg4_dinov2-reg4", "vit_base_patch14_reg4_dinov2", 0,
         dict(img_size=42, embed_dim=48, depth=2, num_heads=4, dynamic_img_size=True),
         "lvd142m", IMAGENET_MEAN, IMAGENET_STD, 1.0, "head", 302,
         [("native", 2, 42, 42, "2 random images 42x42 (grid 3x3); 1 class + 4 register tokens, pos_embed has no "
           "prefix rows"),
          ("dynamic_70x56", 2, 70, 56, "dynamic_img_size: 70x56 (grid 5x4), pos_embed resampled with "
           "num_prefix_tokens=0 (no_embed_class)")]),
        # (c) CLIP image tower: pre_norm (norm_pre), LayerNorm eps 1e-5, patch embedding without bias
        ("vit_base_patch16_clip_224-clip", "vit_base_patch16_clip_224", 7,
         dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
         "openai_ft_in1k", CLIP_MEAN, CLIP_STD, 1.0, "head", 303,
         [("native", 2, 32, 32, "2 random images 32x32")]),
        # (c') the same with QuickGELU (architecture vit_base_patch16_clip_quickgelu_224)
        ("vit_base_patch16_clip_quickgelu_224-quickgelu", "vit_base_patch16_clip_quickgelu_224", 5,
         dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4),
         "openai", CLIP_MEAN, CLIP_STD, 1.0, "head", 304,
         [("native", 2, 32, 32, "2 random images 32x32; MLP activation x * sigmoid(1.702 x)")]),
        # (d) no class token, 'avg' pooling, fc_norm; no qkv bias, mlp_ratio 3
        ("vit_small_patch16_224-noclass-avg", "vit_small_patch16_224", 4,
         dict(img_size=[24, 40], patch_size=8, embed_dim=48, depth=2, num_heads=2, class_token=False,
              global_pool="avg", qkv_bias=False, mlp_ratio=3.0),
         "augreg_in21k_ft_in1k", INCEPTION_MEAN, INCEPTION_STD, 0.9, "head", 305,
         [("native", 2, 24, 40, "2 random images 24x40 (non-square config size, grid 3x5); no prefix tokens")]),
        # (e) distilled DeiT: cls + dist tokens, head and head_dist averaged
        ("deit_tiny_distilled_patch16_224-distilled", "deit_tiny_distilled_patch16_224", 6,
         dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
         "fb_in1k", IMAGENET_MEAN, IMAGENET_STD, 0.875, ["head", "head_dist"], 306,
         [("native", 2, 32, 32, "2 random images 32x32; logits = (head(x[:,0]) + head_dist(x[:,1])) / 2, "
           "pre_logits = (x[:,0] + x[:,1]) / 2")]),
    ]
    for name, arch, ncls, margs, tag, mean, std, crop, clf, seed, cases in variants:
        config = timm_config(arch, ncls, margs, tag, mean, std, crop, clf)
        a = timm_resolve(config)
        sd = random_state_dict(timm_shapes(a), seed)
        d = write_model(out, os.path.join("timm", name), config, sd)
        print("timm/" + name)
        for i, (case, b, h, w, desc) in enumerate(cases):
            x = random_pixels(seed * 10 + i, b, h, w)
            write_case(d, case, x, timm_forward(config, sd, x), desc, up)


# ----------------------------------------------------------------------------------------------------
# --check: the ports against the conformance examples computed by the real upstream code

def find_conformance(arg):
    for c in ([arg] if arg else []) + [os.path.join(REPO, "tests", "fixtures", "conformance"),
                                        os.path.join(REPO, "..", "shared", "conformance"), "/work/shared/conformance"]:
        if c and os.path.isfile(os.path.join(c, "vit-tiny-rand", "config.json")):
            return c
    return None


def max_abs_diff(got, want):
    worst = 0.0
    for k, v in want.items():
        assert k in got, f"port produced no {k}"
        assert got[k].shape == v.shape, (k, tuple(got[k].shape), tuple(v.shape))
        worst = max(worst, (got[k] - v).abs().max().item())
    return worst


def check(conf, tol=1e-5):
    print(f"checking the ports against {conf}")
    ok = True
    for model in ("vit-tiny-rand", "deit-tiny-distilled-rand", "dinov2-small-rand", "timm/vit_small_patch16_224-gap-fcnorm"):
        d = os.path.join(conf, model)
        if not os.path.isdir(d):
            print(f"  {model}: missing, skipped")
            continue
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        sd = load_safetensors(os.path.join(d, "model.safetensors"))
        for case in sorted(os.listdir(os.path.join(d, "cases"))):
            c = os.path.join(d, "cases", case)
            x = load_safetensors(os.path.join(c, "inputs.safetensors"))["pixel_values"]
            want = load_safetensors(os.path.join(c, "expected.safetensors"))
            kwargs = {}
            if os.path.isfile(os.path.join(c, "meta.json")):
                with open(os.path.join(c, "meta.json")) as f:
                    kwargs = json.load(f).get("forward_kwargs", {})
            if "architecture" in cfg:
                got = timm_forward(cfg, sd, x)
            else:
                got = hf_forward(cfg, sd, x, **kwargs)
            diff = max_abs_diff(got, want)
            good = diff <= tol
            ok &= good
            print(f"  {model}/{case}: {', '.join(sorted(want))} max abs diff {diff:.2e} {'ok' if good else 'FAIL'}")
    return ok


def cross_check_torchvision(tol=1e-5):
    """A torchvision VisionTransformer is a timm ViT with a class token, 'token' pooling and LayerNorm eps
    1e-6, and a transformers ViTForImageClassification with layer_norm_eps 1e-6. Renaming its random
    weights and comparing logits checks the ports' class-token paths against a real upstream at a size
    the conformance examples do not have."""
    import torchvision
    ok = True
    kw = dict(image_size=24, patch_size=6, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=5)
    torch.manual_seed(7)
    tv = torchvision.models.VisionTransformer(**kw).eval()
    gen = torch.Generator().manual_seed(7)
    for n, t in tv.state_dict().items():
        randomize_(n, t, gen)
    tsd = tv.state_dict()
    x = random_pixels(77, 2, 24, 24)
    want = tv(x)
    D, L = kw["hidden_dim"], kw["num_layers"]
    # timm names
    t = {"patch_embed.proj.weight": tsd["conv_proj.weight"], "patch_embed.proj.bias": tsd["conv_proj.bias"],
         "cls_token": tsd["class_token"], "pos_embed": tsd["encoder.pos_embedding"],
         "norm.weight": tsd["encoder.ln.weight"], "norm.bias": tsd["encoder.ln.bias"],
         "head.weight": tsd["heads.head.weight"], "head.bias": tsd["heads.head.bias"]}
    # transformers names
    h = {"vit.embeddings.patch_embeddings.projection.weight": tsd["conv_proj.weight"],
         "vit.embeddings.patch_embeddings.projection.bias": tsd["conv_proj.bias"],
         "vit.embeddings.cls_token": tsd["class_token"], "vit.embeddings.position_embeddings": tsd["encoder.pos_embedding"],
         "vit.layernorm.weight": tsd["encoder.ln.weight"], "vit.layernorm.bias": tsd["encoder.ln.bias"],
         "classifier.weight": tsd["heads.head.weight"], "classifier.bias": tsd["heads.head.bias"]}
    for i in range(L):
        s = f"encoder.layers.encoder_layer_{i}."
        b, v = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for w in ("weight", "bias"):
            t[b + "norm1." + w] = h[v + "layernorm_before." + w] = tsd[s + "ln_1." + w]
            t[b + "norm2." + w] = h[v + "layernorm_after." + w] = tsd[s + "ln_2." + w]
            t[b + "attn.qkv." + w] = tsd[s + "self_attention.in_proj_" + w]
            for j, n in enumerate(("query", "key", "value")):
                h[v + f"attention.attention.{n}.{w}"] = tsd[s + "self_attention.in_proj_" + w][j * D:(j + 1) * D]
            t[b + "attn.proj." + w] = h[v + "attention.output.dense." + w] = tsd[s + "self_attention.out_proj." + w]
            t[b + "mlp.fc1." + w] = h[v + "intermediate.dense." + w] = tsd[s + "mlp.0." + w]
            t[b + "mlp.fc2." + w] = h[v + "output.dense." + w] = tsd[s + "mlp.3." + w]
    tcfg = timm_config("vit_base_patch16_224", 5, dict(img_size=24, patch_size=6, embed_dim=D, depth=L, num_heads=3,
                                                       mlp_ratio=2.0), "x", INCEPTION_MEAN, INCEPTION_STD)
    diff = (timm_forward(tcfg, t, x)["logits"] - want).abs().max().item()
    ok &= diff <= tol
    print(f"  timm port vs torchvision {torchvision.__version__}: logits max abs diff {diff:.2e} "
          f"{'ok' if diff <= tol else 'FAIL'}")
    hcfg = hf_config("vit", "ViTForImageClassification", num_labels=5, hidden_size=D, num_attention_heads=3,
                     num_hidden_layers=L, intermediate_size=96, patch_size=6, image_size=24, layer_norm_eps=1e-6)
    diff = (hf_forward(hcfg, h, x)["logits"] - want).abs().max().item()
    ok &= diff <= tol
    print(f"  transformers ViT port vs torchvision {torchvision.__version__}: logits max abs diff {diff:.2e} "
          f"{'ok' if diff <= tol else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (tests/fixtures/models)")
    ap.add_argument("--check", action="store_true", help="validate the timm/transformers ports first")
    ap.add_argument("--conformance", help="conformance folder (default: tests/fixtures/conformance)")
    args = ap.parse_args()
    if not args.out and not args.check:
        ap.error("give --out and/or --check")
    conf = find_conformance(args.conformance)
    if args.check or args.out:
        if conf:
            if not (check(conf) & cross_check_torchvision()):
                sys.exit("a port disagrees with the upstream-computed conformance outputs")
        elif args.check:
            sys.exit("no conformance folder found")
        else:
            print("warning: no conformance folder; ports not re-validated")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        gen_torchvision(args.out)
        gen_hf(args.out)
        gen_timm(args.out)


if __name__ == "__main__":
    main()
