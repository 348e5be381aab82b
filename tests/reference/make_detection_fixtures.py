#!/usr/bin/env python3
"""Regenerate the detection fixtures in tests/fixtures/models: YOLOS with mid-layer position
embeddings (as yolos-small/base have them) and the DETR decoder head on a ViT at a second size.

    /usr/bin/python3 tests/reference/make_detection_fixtures.py --check [--conformance DIR]
    /usr/bin/python3 tests/reference/make_detection_fixtures.py --check --out tests/fixtures/models

transformers is not installable here, so YolosForObjectDetection (transformers 4.40.2) and the DETR
decoder (transformers 4.36.2 DetrDecoder, DetrSinePositionEmbedding, DetrMLPPredictionHead) are
ported below line by line in plain torch; `--check` proves both ports on the conformance examples
that the real upstream code produced (yolos-tiny-rand, detr-vit-rand: every case, 1e-5) before any
fixture is written. The ViT parts reuse make_model_fixtures.py's validated transformers port.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_model_fixtures as mm  # noqa: E402

torch.set_num_threads(1)
torch.set_grad_enabled(False)
mm.GENERATOR = "tests/reference/make_detection_fixtures.py"
UPSTREAM_YOLOS = "port of transformers 4.40.2 YolosForObjectDetection (validated by --check)"
UPSTREAM_DETR = ("port of transformers 4.36.2 ViTModel -> linear projection -> DetrDecoder "
                 "(validated by --check against detr-vit-rand)")


# ----------------------------------------------------------------------------------------------------
# YOLOS (transformers 4.40.2 modeling_yolos.py)

def yolos_interpolate(pos, cfg, height, width):
    """InterpolateInitialPositionEmbeddings / InterpolateMidPositionEmbeddings: [..., N, D] with
    rows [cls, grid, detection]; the grid resized bicubically to (height // p, width // p), always."""
    ndet, p = cfg["num_detection_tokens"], cfg["patch_size"]
    lead, D = pos.shape[:-2], pos.shape[-1]
    cls_pos, det_pos = pos[..., :1, :], pos[..., -ndet:, :]
    grid = pos[..., 1:-ndet, :]
    gh, gw = cfg["image_size"][0] // p, cfg["image_size"][1] // p
    grid = grid.reshape(-1, gh, gw, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height // p, width // p), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(*lead, -1, D)
    return torch.cat((cls_pos, grid, det_pos), dim=-2)


def mlp_head(x, sd, p, num_layers):
    """YolosMLPPredictionHead / DetrMLPPredictionHead: ReLU after every layer but the last."""
    for i in range(num_layers):
        x = mm.linear(x, sd, f"{p}layers.{i}")
        if i < num_layers - 1:
            x = F.relu(x)
    return x


def yolos_forward(cfg, sd, pixel_values):
    B, _, H, W = pixel_values.shape
    e = "vit.embeddings."
    x = mm.patchify(pixel_values, sd, e + "patch_embeddings.projection", cfg["patch_size"]).flatten(1, 2)
    x = torch.cat((sd[e + "cls_token"].expand(B, -1, -1), x, sd[e + "detection_tokens"].expand(B, -1, -1)), 1)
    x = x + yolos_interpolate(sd[e + "position_embeddings"], cfg, H, W)
    L = cfg["num_hidden_layers"]
    mid = None
    if cfg.get("use_mid_position_embeddings", False):
        mid = yolos_interpolate(sd["vit.encoder.mid_position_embeddings"], cfg, H, W)  # [L-1, 1, T, D]
    for i in range(L):
        x = mm.hf_layer(x, sd, f"vit.encoder.layer.{i}.", cfg, "vit")
        if mid is not None and i < L - 1:
            x = x + mid[i]
    h = mm.layer_norm(x, sd, "vit.layernorm", cfg["layer_norm_eps"])
    s = h[:, -cfg["num_detection_tokens"]:, :]
    return {"logits": mlp_head(s, sd, "class_labels_classifier.", 3),
            "pred_boxes": mlp_head(s, sd, "bbox_predictor.", 3).sigmoid(), "last_hidden_state": h}


def yolos_shapes(cfg, num_labels):
    vit_cfg = dict(cfg, architectures=["ViTModel"], model_type="vit")
    isz = cfg["image_size"]
    D, p, ndet = cfg["hidden_size"], cfg["patch_size"], cfg["num_detection_tokens"]
    n = 1 + (isz[0] // p) * (isz[1] // p) + ndet
    shapes = {"vit." + k: v for k, v in mm.hf_shapes(vit_cfg).items()
              if not k.startswith("pooler")}
    shapes["vit.embeddings.position_embeddings"] = (1, n, D)
    shapes["vit.embeddings.detection_tokens"] = (1, ndet, D)
    if cfg.get("use_mid_position_embeddings"):
        shapes["vit.encoder.mid_position_embeddings"] = (cfg["num_hidden_layers"] - 1, 1, n, D)
    for head, out in (("class_labels_classifier", num_labels + 1), ("bbox_predictor", 4)):
        for i, (o, k) in enumerate(((D, D), (D, D), (out, D))):
            shapes[f"{head}.layers.{i}.weight"] = (o, k)
            shapes[f"{head}.layers.{i}.bias"] = (o,)
    return shapes


# ----------------------------------------------------------------------------------------------------
# DETR decoder head (transformers 4.36.2 modeling_detr.py) on HF ViTModel patch tokens

def detr_sine(B, gh, gw, d_model, temperature=10000.0):
    """DetrSinePositionEmbedding(d_model // 2, normalize=True) of an all-ones pixel mask -> [B, gh*gw, D]."""
    mask = torch.ones(B, gh, gw)
    emb_dim, scale = d_model // 2, 2 * math.pi
    y_embed = mask.cumsum(1, dtype=torch.float32)
    x_embed = mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(emb_dim, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / emb_dim)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    return pos.flatten(2).permute(0, 2, 1)


def detr_attention(h, pos, kv, kv_pos, sd, p, heads, value_pos=False):
    """DetrAttention: q, k from the inputs plus their position embeddings, v from the inputs alone
    (with value_pos, Tessera's windowed encoder: the memory's values with its position code too);
    q scaled by head_dim^-0.5 after its projection."""
    q_in = h + pos
    k_in = q_in if kv is None else kv + kv_pos
    v_in = h if kv is None else (kv + kv_pos if value_pos else kv)
    B, Q, D = h.shape
    hd = D // heads
    q = mm.linear(q_in, sd, p + "q_proj") * hd ** -0.5
    k = mm.linear(k_in, sd, p + "k_proj")
    v = mm.linear(v_in, sd, p + "v_proj")
    q, k, v = (t.reshape(B, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-1, -2)).softmax(-1)
    ctx = (attn @ v).transpose(1, 2).reshape(B, Q, D)
    return mm.linear(ctx, sd, p + "out_proj")


def vit_detr_forward(cfg, sd, pixel_values):
    bb = cfg["backbone_config"]
    B, _, H, W = pixel_values.shape
    isz = bb["image_size"]
    fam = bb.get("model_type", "vit")  # the backbone's family: its names live under "<model_type>."
    p = bb["patch_size"]
    prefix_tokens = 2 if fam == "deit" else 1
    if "encoder_window" in cfg:
        # Tessera's windowed encoder: the backbone (at its own size, the window's) on every window of
        # the input, each patch the mean of its final-norm rows over the windows that hold it
        # ("merge": "centre": each row weighted by (min(i, g-1-i) + 1) along each axis of its window).
        win, stride = cfg["encoder_window"]["size"], cfg["encoder_window"]["stride"]
        centre = cfg["encoder_window"].get("merge", "mean") == "centre"
        anchors = lambda n: [v for v in range(0, n - win, stride)] + [n - win]
        gh, gw, g = H // p, W // p, win // p
        tent = torch.tensor([min(i, g - 1 - i) + 1.0 if centre else 1.0 for i in range(g)], dtype=pixel_values.dtype)
        weight = (tent[:, None] * tent[None, :]).reshape(1, g, g, 1)
        total = torch.zeros(B, gh, gw, bb["hidden_size"], dtype=pixel_values.dtype)
        count = torch.zeros(1, gh, gw, 1, dtype=pixel_values.dtype)
        for ya in anchors(H):
            for xa in anchors(W):
                crop = pixel_values[:, :, ya:ya + win, xa:xa + win]
                h = mm.hf_backbone(dict(bb, architectures=["ViTModel"]), sd, fam + ".", crop, fam, False)
                rows = h[:, prefix_tokens:].reshape(B, g, g, -1)
                pad = (0, 0, xa // p, gw - xa // p - g, ya // p, gh - ya // p - g)
                total = total + F.pad(rows * weight, pad)
                count = count + F.pad(weight, pad)
        merged = (total / count).reshape(B, gh * gw, -1)
        return detr_decoder_forward(cfg, sd, merged, gh, gw, value_pos=True)
    interp = (H, W) != (isz, isz)  # ViTModel(..., interpolate_pos_encoding=True) at another size
    h = mm.hf_backbone(dict(bb, architectures=["ViTModel"]), sd, fam + ".", pixel_values, fam, interp)
    return detr_decoder_forward(cfg, sd, h[:, prefix_tokens:], H // p, W // p)  # the patch tokens


def detr_decoder_forward(cfg, sd, patch_tokens, gh, gw, value_pos=False):
    """The DETR head on the backbone's final-norm patch tokens [B, gh*gw, Denc]: input projection,
    decoder, heads (and the auxiliary heads with auxiliary_loss)."""
    B = patch_tokens.shape[0]
    w = sd["input_projection.weight"]
    mem = F.linear(patch_tokens, w.reshape(w.shape[0], -1), sd["input_projection.bias"])
    D, heads, eps = cfg["d_model"], cfg["decoder_attention_heads"], cfg.get("decoder_layer_norm_eps", 1e-5)
    pos = detr_sine(B, gh, gw, D)
    qpos = sd["model.query_position_embeddings.weight"].unsqueeze(0).repeat(B, 1, 1)
    x = torch.zeros_like(qpos)
    ln = lambda t, n: F.layer_norm(t, (D,), sd[n + ".weight"], sd[n + ".bias"], eps)
    aux = cfg.get("auxiliary_loss", False)
    intermediate = []
    for i in range(cfg["decoder_layers"]):
        l = f"model.decoder.layers.{i}."
        x = ln(x + detr_attention(x, qpos, None, None, sd, l + "self_attn.", heads), l + "self_attn_layer_norm")
        x = ln(x + detr_attention(x, qpos, mem, pos, sd, l + "encoder_attn.", heads, value_pos), l + "encoder_attn_layer_norm")
        y = mm.linear(F.relu(mm.linear(x, sd, l + "fc1")), sd, l + "fc2")
        x = ln(x + y, l + "final_layer_norm")
        if aux:  # DetrDecoder: with auxiliary_loss every layer's output goes through the decoder norm
            x = ln(x, "model.decoder.layernorm")
            intermediate.append(x)
    x = ln(x, "model.decoder.layernorm")
    out = {"logits": mm.linear(x, sd, "class_labels_classifier"),
           "pred_boxes": mlp_head(x, sd, "bbox_predictor.", 3).sigmoid(), "last_hidden_state": x}
    if aux:  # DetrForObjectDetection: the heads on the intermediate states; all but the last are auxiliary
        out["auxiliary"] = [(mm.linear(h, sd, "class_labels_classifier"),
                             mlp_head(h, sd, "bbox_predictor.", 3).sigmoid()) for h in intermediate[:-1]]
    return out


def vit_detr_shapes(cfg, conv_projection):
    bb = cfg["backbone_config"]
    fam = bb.get("model_type", "vit")
    shapes = {fam + "." + k: v for k, v in mm.hf_shapes(dict(bb, architectures=["ViTModel"])).items()
              if not k.startswith("pooler")}
    D, Denc, F_ = cfg["d_model"], bb["hidden_size"], cfg["decoder_ffn_dim"]
    shapes["input_projection.weight"] = (D, Denc, 1, 1) if conv_projection else (D, Denc)
    shapes["input_projection.bias"] = (D,)
    shapes["model.query_position_embeddings.weight"] = (cfg["num_queries"], D)
    for i in range(cfg["decoder_layers"]):
        l = f"model.decoder.layers.{i}."
        for att in ("self_attn", "encoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{l}{att}.{proj}.weight"] = (D, D)
                shapes[f"{l}{att}.{proj}.bias"] = (D,)
        for n in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            shapes[f"{l}{n}.weight"] = (D,)
            shapes[f"{l}{n}.bias"] = (D,)
        shapes[l + "fc1.weight"], shapes[l + "fc1.bias"] = (F_, D), (F_,)
        shapes[l + "fc2.weight"], shapes[l + "fc2.bias"] = (D, F_), (D,)
    shapes["model.decoder.layernorm.weight"] = (D,)
    shapes["model.decoder.layernorm.bias"] = (D,)
    shapes["class_labels_classifier.weight"] = (cfg["num_labels"] + 1, D)
    shapes["class_labels_classifier.bias"] = (cfg["num_labels"] + 1,)
    for i, (o, k) in enumerate(((D, D), (D, D), (4, D))):
        shapes[f"bbox_predictor.layers.{i}.weight"] = (o, k)
        shapes[f"bbox_predictor.layers.{i}.bias"] = (o,)
    return shapes


# ----------------------------------------------------------------------------------------------------

def check(conf, tol=1e-5):
    worst = 0.0
    for name, fwd in (("yolos-tiny-rand", yolos_forward), ("detr-vit-rand", vit_detr_forward)):
        d = os.path.join(conf, name)
        cfg = mm.json.load(open(os.path.join(d, "config.json")))
        sd = mm.load_safetensors(os.path.join(d, "model.safetensors"))
        if name == "detr-vit-rand":
            want = set(vit_detr_shapes(cfg, False).items())
            assert want == {(k, tuple(v.shape)) for k, v in sd.items()}, "detr-vit-rand layout differs from the port"
        else:
            want = set(yolos_shapes(cfg, len(cfg["id2label"])).items())
            assert want == {(k, tuple(v.shape)) for k, v in sd.items()}, "yolos-tiny-rand layout differs from the port"
        for case in sorted(os.listdir(os.path.join(d, "cases"))):
            c = os.path.join(d, "cases", case)
            x = mm.load_safetensors(os.path.join(c, "inputs.safetensors"))["pixel_values"]
            exp = mm.load_safetensors(os.path.join(c, "expected.safetensors"))
            got = fwd(cfg, sd, x)
            for k, v in exp.items():
                diff = (got[k] - v).abs().max().item()
                worst = max(worst, diff)
                print(f"  check {name}/{case} {k}: max |diff| {diff:.2e}")
                assert diff <= tol, f"{name}/{case}/{k}: port differs from upstream by {diff}"
    print(f"ports agree with upstream (worst {worst:.2e} <= {tol})")


def gen(out):
    # YOLOS with mid position embeddings (use_mid_position_embeddings=True, as hustvl/yolos-small/base).
    cfg = {"architectures": ["YolosForObjectDetection"], "model_type": "yolos", "hidden_size": 48,
           "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 96, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "image_size": [48, 80], "patch_size": 16, "num_channels": 3,
           "qkv_bias": True, "num_detection_tokens": 7, "use_mid_position_embeddings": True,
           "id2label": {str(i): f"class_{i}" for i in range(4)}, "transformers_version": "4.40.2"}
    sd = mm.random_state_dict(yolos_shapes(cfg, 4), seed=301)
    d = mm.write_model(out, "yolos-mid-rand", cfg, sd)
    for case, (b, h, w), seed in (("native", (2, 48, 80), 302), ("interp_64x48", (2, 64, 48), 303),
                                  ("interp_80x112", (1, 80, 112), 304)):
        x = mm.random_pixels(seed, b, h, w)
        mm.write_case(d, case, x, yolos_forward(cfg, sd, x), f"{b} random images {h}x{w}", UPSTREAM_YOLOS)

    # DETR head: d_model differs from the backbone width, HF's 1x1-conv input projection, another size.
    cfg = {"architectures": ["VitDetrForObjectDetection"], "model_type": "vit-detr",
           "backbone_config": {"model_type": "vit", "image_size": 64, "patch_size": 16, "num_channels": 3,
                               "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
                               "intermediate_size": 96, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                               "qkv_bias": True},
           "d_model": 32, "num_queries": 6, "decoder_layers": 3, "decoder_attention_heads": 2,
           "decoder_ffn_dim": 80, "activation_function": "relu", "decoder_layer_norm_eps": 1e-5,
           "position_embedding_type": "sine", "num_labels": 3,
           "id2label": {str(i): f"class_{i}" for i in range(3)}}
    sd = mm.random_state_dict(vit_detr_shapes(cfg, True), seed=311)
    d = mm.write_model(out, "detr-vit-conv-rand", cfg, sd)
    for case, (b, h, w), seed, kw in (("native", (2, 64, 64), 312, {}),
                                      ("interp_48x96", (2, 48, 96), 313, {"interpolate_pos_encoding": True})):
        x = mm.random_pixels(seed, b, h, w)
        mm.write_case(d, case, x, vit_detr_forward(cfg, sd, x), f"{b} random images {h}x{w}", UPSTREAM_DETR, kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="fixture folder to write (tests/fixtures/models)")
    ap.add_argument("--check", action="store_true", help="validate the ports first")
    ap.add_argument("--conformance", help="conformance examples (default: tests/fixtures/conformance)")
    a = ap.parse_args()
    if not a.out and not a.check:
        ap.error("give --out and/or --check")
    if a.check:
        check(mm.find_conformance(a.conformance))
    if a.out:
        gen(a.out)


if __name__ == "__main__":
    main()
