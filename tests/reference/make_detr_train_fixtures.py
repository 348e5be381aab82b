#!/usr/bin/env python3
"""Regenerates the DETR-head training references for vision/include/tessera/detr_train.hpp:

  tests/fixtures/models/detr-vit-aux-rand      a vit-detr folder with auxiliary_loss true (conv input
                                               projection, d_model 32 != backbone 48, 3 decoder
                                               layers), with an inference case ("native")
  tests/fixtures/train/detr-vit-step.safetensors      one step of conformance/detr-vit-rand (the
                                               folder transformers made; auxiliary loss off)
  tests/fixtures/train/detr-vit-aux-step.safetensors  one step of detr-vit-aux-rand at another size
                                               (position table interpolated), auxiliary loss on

Run: /usr/bin/python3 tests/reference/make_detr_train_fixtures.py

The forward is make_detection_fixtures.py's plain-torch port of HF ViTModel + transformers 4.36
DetrDecoder / DetrForObjectDetection (validated there against the upstream outputs; with
auxiliary_loss the decoder norm runs after every layer and the heads run on every layer's state,
as DetrDecoder.forward and DetrForObjectDetection.forward do). The loss is make_set_loss_fixtures.py's
port of DetrLoss per supervised layer (the model's output and, with auxiliary loss, every earlier
decoder layer, each matched on its own; weights 1 CE + 5 L1 + 2 GIoU each), in float64; autograd
gives every weight's gradient. Stored: pixel_values, targets (target_labels.i as F32,
target_boxes.i), logits, pred_boxes, loss, terms [layers, 3], grad.<checkpoint name>.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_model_fixtures as mm  # noqa: E402
import make_detection_fixtures as md  # noqa: E402
import make_set_loss_fixtures as ms  # noqa: E402

FIXTURES = os.path.join(mm.REPO, "tests", "fixtures")
OUT_DIR = os.path.join(FIXTURES, "train")

AUX_CONFIG = {
    "architectures": ["VitDetrForObjectDetection"], "model_type": "vit-detr",
    "backbone_config": {"model_type": "vit", "image_size": 64, "patch_size": 16, "num_channels": 3,
                        "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
                        "intermediate_size": 96, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                        "qkv_bias": True},
    "d_model": 32, "num_queries": 6, "decoder_layers": 3, "decoder_attention_heads": 2,
    "decoder_ffn_dim": 80, "activation_function": "relu", "decoder_layer_norm_eps": 1e-5,
    "position_embedding_type": "sine", "auxiliary_loss": True, "class_cost": 1, "bbox_cost": 5,
    "giou_cost": 2, "bbox_loss_coefficient": 5, "giou_loss_coefficient": 2, "eos_coefficient": 0.1,
    "num_labels": 3, "id2label": {str(i): f"class_{i}" for i in range(3)}}

DINOV2_CONFIG = dict(AUX_CONFIG, backbone_config={
    "model_type": "dinov2", "image_size": 42, "patch_size": 7, "num_channels": 3, "hidden_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 3, "mlp_ratio": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0, "use_swiglu_ffn": False, "qkv_bias": True}, d_model=32, num_queries=5, decoder_layers=2)

# Tessera's windowed encoder: a 32x32 backbone (patch 8) on 32x32 windows every 16 pixels,
# merged, the memory's values with the sine code (detection.hpp DetectionHead::window).
WINDOW_CONFIG = dict(AUX_CONFIG, backbone_config=dict(AUX_CONFIG["backbone_config"], image_size=32, patch_size=8),
                     d_model=32, num_queries=5, decoder_layers=2, encoder_window={"size": 32, "stride": 16})

CASES = [
    # (output name, model folder, batch, seed, targets per image, input size)
    ("detr-vit-step", "conformance/detr-vit-rand", 2, 1601, [3, 1], (64, 64)),
    # auxiliary loss on, another size (the 4x4 position grid interpolated to 3x5, bicubic), an
    # image without targets
    ("detr-vit-aux-step", "models/detr-vit-aux-rand", 3, 1602, [2, 0, 4], (48, 80)),
    # a DINOv2 backbone (LayerScale, mask_token; DINOv2 always interpolates: 56x35 is an 8x5 grid
    # from the 6x6 table), auxiliary loss on
    ("detr-dinov2-step", "models/detr-dinov2-rand", 2, 1603, [1, 3], (56, 35)),
    # the windowed encoder at 64x48: 3x2 windows, overlapping, an 8x6 grid
    ("detr-window-step", "models/detr-window-rand", 2, 1604, [2, 3], (64, 48)),
]


def write_aux_model():
    sd = mm.random_state_dict(md.vit_detr_shapes(AUX_CONFIG, True), seed=321)
    d = mm.write_model(os.path.join(FIXTURES, "models"), "detr-vit-aux-rand", AUX_CONFIG, sd)
    with torch.no_grad():
        x = mm.random_pixels(322, 2, 64, 64)
        out = md.vit_detr_forward(AUX_CONFIG, sd, x)
        out.pop("auxiliary")
        mm.write_case(d, "native", x, out, "2 random images 64x64 (auxiliary_loss: the decoder norm after every layer)",
                      md.UPSTREAM_DETR)
    # The DETR head on a DINOv2 backbone (transformers' Dinov2Model names under "dinov2.").
    sd = mm.random_state_dict(md.vit_detr_shapes(DINOV2_CONFIG, False), seed=323)
    for k in sd:  # LayerScale near 1 (not 1e-5) so that the branches matter in the checks
        if k.endswith("lambda1"):
            sd[k] = 1.0 + 0.1 * sd[k]
    # Query position embeddings of unit scale, as DETR initialises them (nn.Embedding: N(0, 1)). With
    # the generator's small values every query looks alike after the first layer, the decoder's
    # self-attention is near-uniform, and its queries' and keys' gradients (~1e-3 of the others')
    # would measure fp32 rounding rather than the pass.
    q = sd["model.query_position_embeddings.weight"]
    sd["model.query_position_embeddings.weight"] = q / q.std()
    d = mm.write_model(os.path.join(FIXTURES, "models"), "detr-dinov2-rand", DINOV2_CONFIG, sd)
    with torch.no_grad():
        x = mm.random_pixels(324, 2, 42, 42)
        out = md.vit_detr_forward(DINOV2_CONFIG, sd, x)
        out.pop("auxiliary")
        mm.write_case(d, "native", x, out, "2 random images 42x42: a DETR head on a DINOv2 backbone", md.UPSTREAM_DETR)
    sd = mm.random_state_dict(md.vit_detr_shapes(WINDOW_CONFIG, False), seed=325)
    q = sd["model.query_position_embeddings.weight"]
    sd["model.query_position_embeddings.weight"] = q / q.std()  # as for the DINOv2 case
    d = mm.write_model(os.path.join(FIXTURES, "models"), "detr-window-rand", WINDOW_CONFIG, sd)
    with torch.no_grad():
        x = mm.random_pixels(326, 2, 64, 48)
        out = md.vit_detr_forward(WINDOW_CONFIG, sd, x)
        out.pop("auxiliary")
        mm.write_case(d, "native", x, out, "2 random images 64x48: Tessera's windowed encoder (32x32 windows "
                      "every 16 pixels, merged) under a DETR head", "Tessera's windowed vit-detr (no upstream)")
        x = mm.random_pixels(327, 1, 56, 40)
        out = md.vit_detr_forward(WINDOW_CONFIG, sd, x)
        out.pop("auxiliary")
        mm.write_case(d, "flush", x, out, "1 random image 56x40: the last window flush with the edge (rows at 0, 16, "
                      "24; columns at 0, 8)", "Tessera's windowed vit-detr (no upstream)")


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    write_aux_model()
    torch.set_grad_enabled(True)
    for name, folder, batch, seed, counts, hw in CASES:
        d = os.path.join(FIXTURES, folder)
        cfg = mm.json.load(open(os.path.join(d, "config.json")))
        num_labels = cfg["num_labels"]
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
        out = md.vit_detr_forward(cfg, sd, pixels.double())
        layers = out.get("auxiliary", []) + [(out["logits"], out["pred_boxes"])]
        num_boxes = max(float(sum(counts)), 1.0)
        torch.set_default_dtype(torch.float64)  # layer_loss's class weights in the logits' dtype
        loss, terms = 0, []
        for logits, boxes in layers:
            ce, l1, giou, _ = ms.layer_loss(logits, boxes, targets, num_labels, cfg.get("eos_coefficient", 0.1),
                                            num_boxes)
            loss = loss + 1 * ce + cfg.get("bbox_loss_coefficient", 5) * l1 + cfg.get("giou_loss_coefficient", 2) * giou
            terms.append([ce.item(), l1.item(), giou.item()])
        torch.set_default_dtype(torch.float32)
        loss.backward()
        tensors = {"pixel_values": pixels, "logits": out["logits"].detach().float(),
                   "pred_boxes": out["pred_boxes"].detach().float(), "loss": loss.detach().reshape(1),
                   "terms": torch.tensor(terms)}
        for i, t in enumerate(targets):
            if len(t["boxes"]):
                tensors[f"target_labels.{i}"] = t["class_labels"].float()
                tensors[f"target_boxes.{i}"] = t["boxes"].float()
        for k, v in sorted(sd.items()):
            if k.startswith("vit.pooler"):
                continue
            if name == "detr-vit-step" and k.startswith("vit.") and v.dim() > 1 and "position" not in k:
                continue  # size: the encoder's matrices are checked by the auxiliary case
            # Mathematically zero, so stored as zero (float64 rounding noise is not a reference): the
            # key bias (softmax is shift-invariant along the keys), and the first decoder layer's
            # self-attention queries and keys (its input is all zeros, so every value row is the
            # bias and the output does not depend on the attention weights).
            zero = v.grad is None or k.endswith("attention.key.bias") or k.endswith("k_proj.bias") or \
                k.startswith("model.decoder.layers.0.self_attn.q_proj") or \
                k.startswith("model.decoder.layers.0.self_attn.k_proj")
            tensors["grad." + k] = torch.zeros_like(v) if zero else v.grad.float()
        path = os.path.join(OUT_DIR, name + ".safetensors")
        mm.save_safetensors(path, tensors, {"model": folder, "loss": "DETR set loss per supervised layer "
                                            "(1 CE + 5 L1 + 2 GIoU, eos 0.1)"})
        print(path, os.path.getsize(path), "bytes, loss", float(loss), "terms", terms)


if __name__ == "__main__":
    main()
