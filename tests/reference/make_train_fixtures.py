#!/usr/bin/env python3
"""Regenerates tests/fixtures/train/*.safetensors: one training step's reference for the ViT
training pass (vision/include/tessera/vit_train.hpp). Run with any PyTorch >= 1.13:
    python3 make_train_fixtures.py

For a fixture model folder, a batch of random pixel values and labels goes through the
transformers 4.40 ViTForImageClassification port of make_model_fixtures.py (hf_forward), in
float64 from the checkpoint's float32 weights; the loss is mean cross-entropy on the labels
(F.cross_entropy, as ViTForImageClassification computes it for single-label classification), and
autograd gives the gradient of every weight. adamw_curve(): the loss over 20 torch.optim.AdamW
steps of one model on one batch. distillation_step(): the same for DeiT's hard-distillation loss. Stored: pixel_values, labels (as F32), logits, loss,
and grad.<checkpoint name> -- for every tensor, or (keep="1d") for the 1-D ones only, which keeps
the fixture of the larger model small while still covering every bias and norm ("1d+pos": and the
position table, the class / distillation tokens and the classifier).
"""
import os

import torch
import torch.nn.functional as F

import make_model_fixtures as mm

torch.set_grad_enabled(True)  # make_model_fixtures turns autograd off for its inference fixtures

FIXTURES = os.path.join(mm.REPO, "tests", "fixtures")
OUT_DIR = os.path.join(FIXTURES, "train")

CASES = [
    # (model folder under tests/fixtures, output name, batch, seed, which gradients to keep,
    #  input size or None for the training size -- another size runs interpolate_pos_encoding=True)
    ("models/vit-p4-h48-noqkvbias-rand", "vit-p4-h48-noqkvbias-step", 3, 1301, "all", None),
    ("conformance/vit-tiny-rand", "vit-tiny-step", 2, 1302, "1d", None),
    ("conformance/vit-tiny-rand", "vit-tiny-48x40-step", 2, 1303, "1d+pos", (48, 40)),
    ("models/deit-nodistill-rand", "deit-nodistill-step", 2, 1304, "1d+pos", None),
    ("models/dinov2-cls-rand", "dinov2-cls-step", 2, 1305, "1d+pos", None),
    # SwiGLU MLPs (use_swiglu_ffn, as dinov2-giant), at another size (42x28: the grid interpolated)
    ("models/dinov2-swiglu-cls-rand", "dinov2-swiglu-cls-step", 2, 1306, "all", (42, 28)),
]


def swiglu_classifier(out=os.path.join(FIXTURES, "models")):
    """models/dinov2-swiglu-cls-rand: a Dinov2ForImageClassification with SwiGLU MLPs (a training
    fixture: no classifier folder of the inference fixtures has them), with an inference case."""
    cfg = mm.hf_config("dinov2", "Dinov2ForImageClassification", num_labels=4, hidden_size=24, num_attention_heads=2,
                       num_hidden_layers=2, patch_size=7, image_size=28, use_swiglu_ffn=True, mlp_ratio=4)
    sd = mm.random_state_dict(mm.hf_shapes(cfg), 207)
    d = mm.write_model(out, "dinov2-swiglu-cls-rand", cfg, sd)
    with torch.no_grad():
        x = mm.random_pixels(2071, 2, 28, 28)
        mm.write_case(d, "native", x, mm.hf_forward(cfg, sd, x), "2 random images 28x28 (SwiGLU MLPs)",
                      "port of transformers 4.40.2 (validated by make_model_fixtures.py --check)")


def exact_grad(name, v):
    """v's gradient; 0 where it is 0 in exact arithmetic: an unused tensor (DINOv2's mask_token),
    and the key bias (q·(k + b) shifts all of a query's scores alike, which softmax ignores), whose
    float64 autograd value is ~1e-17 of round-off that varies from run to run."""
    if v.grad is None or name.endswith("attention.attention.key.bias"):
        return torch.zeros_like(v)
    return v.grad


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    for folder, name, batch, seed, keep, hw in CASES:
        d = os.path.join(FIXTURES, folder)
        cfg = mm.json.load(open(os.path.join(d, "config.json")))
        sd32 = mm.load_safetensors(os.path.join(d, "model.safetensors"))
        sd = {k: v.double().requires_grad_(True) for k, v in sd32.items()}
        size = cfg["image_size"]
        pixels = mm.random_pixels(seed, batch, *(hw or (size, size)))
        gen = torch.Generator().manual_seed(seed + 1)
        labels = torch.randint(0, len(cfg["id2label"]), (batch,), generator=gen)
        logits = mm.hf_forward(cfg, sd, pixels.double(), interpolate_pos_encoding=hw is not None)["logits"]
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        tensors = {"pixel_values": pixels, "labels": labels.float(), "logits": logits.detach(),
                   "loss": loss.detach().reshape(1)}
        for k, v in sorted(sd.items()):
            if keep == "all" or v.dim() == 1 or (keep == "1d+pos" and (k.endswith("position_embeddings")
                                                                      or k.endswith("_token")
                                                                      or k == "classifier.weight")):
                tensors["grad." + k] = exact_grad(k, v)
        path = os.path.join(OUT_DIR, name + ".safetensors")
        mm.save_safetensors(path, tensors, {"model": folder, "loss": "mean cross-entropy",
                                            "gradients": keep})
        print(path, os.path.getsize(path), "bytes, loss", float(loss))


def adamw_curve(folder="models/vit-p4-h48-noqkvbias-rand", name="vit-p4-h48-noqkvbias-adamw",
                batch=3, seed=1301, steps=20, lr=1e-3, weight_decay=0.05):
    """20 torch.optim.AdamW steps on one batch (float64), weight decay on the matrices only (not on
    biases, norms, the class token or the position embeddings): the loss before each step."""
    d = os.path.join(FIXTURES, folder)
    cfg = mm.json.load(open(os.path.join(d, "config.json")))
    sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(d, "model.safetensors")).items()}
    size = cfg["image_size"]
    pixels = mm.random_pixels(seed, batch, size, size)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, len(cfg["id2label"]), (batch,), generator=gen)
    decay = [v for k, v in sorted(sd.items()) if v.dim() == 2 or k.endswith("projection.weight")]
    no_decay = [v for k, v in sorted(sd.items()) if not (v.dim() == 2 or k.endswith("projection.weight"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(mm.hf_forward(cfg, sd, pixels.double())["logits"], labels)
        loss.backward()
        losses.append(float(loss))
        opt.step()
    path = os.path.join(OUT_DIR, name + ".safetensors")
    mm.save_safetensors(path, {"pixel_values": pixels, "labels": labels.float(),
                               "losses": torch.tensor(losses, dtype=torch.float64)},
                        {"model": folder, "steps": str(steps), "lr": str(lr), "weight_decay": str(weight_decay),
                         "betas": "0.9,0.999", "eps": "1e-08"})
    print(path, os.path.getsize(path), "bytes, losses", losses[0], "->", losses[-1])


def distillation_step(folder="conformance/deit-tiny-distilled-rand", name="deit-distilled-step",
                      batch=2, seed=1306, label_smoothing=0.1):
    """DeiT's hard-distillation loss on DeiTForImageClassificationWithTeacher:
    0.5 * CE(cls_logits, labels, label_smoothing) + 0.5 * CE(distillation_logits, teacher_labels)."""
    d = os.path.join(FIXTURES, folder)
    cfg = mm.json.load(open(os.path.join(d, "config.json")))
    sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(d, "model.safetensors")).items()}
    size = cfg["image_size"]
    pixels = mm.random_pixels(seed, batch, size, size)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, len(cfg["id2label"]), (batch,), generator=gen)
    teacher = torch.randint(0, len(cfg["id2label"]), (batch,), generator=gen)
    out = mm.hf_forward(cfg, sd, pixels.double())
    loss = 0.5 * F.cross_entropy(out["cls_logits"], labels, label_smoothing=label_smoothing) + \
        0.5 * F.cross_entropy(out["distillation_logits"], teacher)
    loss.backward()
    tensors = {"pixel_values": pixels, "labels": labels.float(), "teacher_labels": teacher.float(),
               "logits": out["logits"].detach(), "loss": loss.detach().reshape(1)}
    for k, v in sorted(sd.items()):
        if v.dim() == 1 or k.endswith("_token") or k.endswith("position_embeddings") or "classifier" in k:
            tensors["grad." + k] = exact_grad(k, v)
    path = os.path.join(OUT_DIR, name + ".safetensors")
    mm.save_safetensors(path, tensors, {"model": folder, "loss": "hard distillation",
                                        "label_smoothing": str(label_smoothing)})
    print(path, os.path.getsize(path), "bytes, loss", float(loss))


def timm_distillation_step(folder="models/timm/deit_tiny_distilled_patch16_224-distilled",
                           name="timm-distilled-step", batch=2, seed=1312, label_smoothing=0.1):
    """timm's distilled DeiT (VisionTransformerDistilled) on DeiT's hard-distillation loss, as DeiT's
    DistillationLoss (distillation_type "hard") computes it with the model in distilled training:
    0.5 * CE(head(x[:, 0]), labels, label_smoothing) + 0.5 * CE(head_dist(x[:, 1]), teacher_labels),
    x the final-normed tokens of make_model_fixtures.py's timm port; float64 autograd, timm's names.
    The logits stored are the eval output, (head + head_dist) / 2."""
    d = os.path.join(FIXTURES, folder)
    config = mm.json.load(open(os.path.join(d, "config.json")))
    sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(d, "model.safetensors")).items()}
    size = config["pretrained_cfg"]["input_size"][1]
    pixels = mm.random_pixels(seed, batch, size, size)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, config["num_classes"], (batch,), generator=gen)
    teacher = torch.randint(0, config["num_classes"], (batch,), generator=gen)
    out = mm.timm_forward(config, sd, pixels.double())
    feats = out["features"]
    cls_logits = F.linear(feats[:, 0], sd["head.weight"], sd["head.bias"])
    dist_logits = F.linear(feats[:, 1], sd["head_dist.weight"], sd["head_dist.bias"])
    assert torch.allclose((cls_logits + dist_logits) / 2, out["logits"])
    loss = 0.5 * F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing) + \
        0.5 * F.cross_entropy(dist_logits, teacher)
    loss.backward()
    tensors = {"pixel_values": pixels, "labels": labels.float(), "teacher_labels": teacher.float(),
               "logits": out["logits"].detach(), "loss": loss.detach().reshape(1)}
    tensors.update(timm_grads(sd, config["num_features"]))
    path = os.path.join(OUT_DIR, name + ".safetensors")
    mm.save_safetensors(path, tensors, {"model": folder, "loss": "hard distillation",
                                        "label_smoothing": str(label_smoothing),
                                        "upstream": "port of timm 1.0 VisionTransformerDistilled (validated by "
                                                    "make_model_fixtures.py --check); DeiT's DistillationLoss"})
    print(path, os.path.getsize(path), "bytes, loss", float(loss))


def torchvision_representation_step(folder="models/tv-vit-repr-rand", name="tv-vit-repr-step", batch=3, seed=1307):
    """One batch's gradient through torchvision's own VisionTransformer (representation_size 40:
    heads.pre_logits, tanh, heads.head), float64 autograd, under torchvision's names."""
    import torchvision
    d = os.path.join(FIXTURES, folder)
    cfg = mm.json.load(open(os.path.join(d, "config.json")))
    kw = {k: cfg[k] for k in ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim",
                              "num_classes", "representation_size")}
    model = torchvision.models.VisionTransformer(**kw)
    model.load_state_dict(mm.load_safetensors(os.path.join(d, "model.safetensors")))
    model = model.double().train()  # dropout is 0: train and eval compute the same
    pixels = mm.random_pixels(seed, batch, cfg["image_size"], cfg["image_size"])
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, cfg["num_classes"], (batch,), generator=gen)
    logits = model(pixels.double())
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    tensors = {"pixel_values": pixels, "labels": labels.float(), "logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for k, p in sorted(model.named_parameters()):
        g = p.grad
        if k.endswith("self_attention.in_proj_bias"):  # the key third's gradient is 0 in exact arithmetic
            g = g.clone()
            g[cfg["hidden_dim"]:2 * cfg["hidden_dim"]] = 0
        tensors["grad." + k] = g
    path = os.path.join(OUT_DIR, name + ".safetensors")
    mm.save_safetensors(path, tensors, {"model": folder, "loss": "mean cross-entropy",
                                        "upstream": f"torchvision {torchvision.__version__} VisionTransformer"})
    print(path, os.path.getsize(path), "bytes, loss", float(loss))


def timm_grads(sd, D):
    """grad.NAME for every tensor of a timm state dict after backward(); the key third of a fused
    qkv bias is 0 in exact arithmetic (q·(k + b) shifts a query's scores alike), so it is stored as 0."""
    out = {}
    for k, v in sorted(sd.items()):
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        if k.endswith("attn.qkv.bias"):
            g = g.clone()
            g[D:2 * D] = 0
        out["grad." + k] = g
    return out


def timm_steps():
    """timm heads and tokens the training pass has beyond a plain ViT, each one batch's gradient by
    float64 autograd through make_model_fixtures.py's timm port (validated against timm's own outputs),
    under timm's names:
      - timm-noclass-avg-step: models/timm/vit_small_patch16_224-noclass-avg (no class token,
        global_pool avg, fc_norm, no qkv bias; 24x40);
      - timm-reg4-step: a new models/timm/vit_small_patch14_reg4_dinov2-cls (1 class + 4 register
        tokens, no_embed_class, LayerScale, token pooling, a 5-class head, dynamic_img_size) at
        70x56, the 3x3 position grid resampled to 5x4 (bicubic, antialias) and back;
      - timm-avg-nofcnorm-step: a new models/timm/vit_tiny_patch16_224-avg-nofcnorm (class token,
        global_pool avg with fc_norm False: the final norm on every token, then the mean);
      - timm-clip-quickgelu-step: models/timm/vit_base_patch16_clip_quickgelu_224-quickgelu (a CLIP
        tower: norm_pre, QuickGELU, no patch bias)."""
    up = "port of timm 1.0 VisionTransformer (validated by make_model_fixtures.py --check)"
    models = os.path.join(FIXTURES, "models")
    new = [("vit_small_patch14_reg4_dinov2-cls", "vit_base_patch14_reg4_dinov2", 5,
            dict(img_size=42, embed_dim=48, depth=2, num_heads=4, dynamic_img_size=True), 308, (2, 42, 42)),
           ("vit_tiny_patch16_224-avg-nofcnorm", "vit_tiny_patch16_224", 4,
            dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, global_pool="avg", fc_norm=False),
            309, (2, 32, 32))]
    for name, arch, ncls, margs, seed, (b, h, w) in new:
        config = mm.timm_config(arch, ncls, margs, "test", mm.IMAGENET_MEAN, mm.IMAGENET_STD, 1.0, "head")
        a = mm.timm_resolve(config)
        sd = mm.random_state_dict(mm.timm_shapes(a), seed)
        if a["init_values"]:  # LayerScale near 1, not timm's 1e-5, so the branches matter in the check
            for k in sd:
                if k.endswith(".gamma"):
                    sd[k] = 1.0 + 0.1 * sd[k]
        d = mm.write_model(models, os.path.join("timm", name), config, sd)
        with torch.no_grad():
            x = mm.random_pixels(seed * 10, b, h, w)
            mm.write_case(d, "native", x, mm.timm_forward(config, sd, x), f"{b} random images {h}x{w}", up)
    for folder, name, seed, (b, h, w) in (("models/timm/vit_small_patch16_224-noclass-avg", "timm-noclass-avg-step",
                                           1308, (3, 24, 40)),
                                          ("models/timm/vit_small_patch14_reg4_dinov2-cls", "timm-reg4-step", 1309,
                                           (2, 70, 56)),
                                          ("models/timm/vit_tiny_patch16_224-avg-nofcnorm", "timm-avg-nofcnorm-step",
                                           1310, (2, 32, 32)),
                                          # a CLIP tower: norm_pre, QuickGELU, no patch bias, LayerNorm eps 1e-5
                                          ("models/timm/vit_base_patch16_clip_quickgelu_224-quickgelu",
                                           "timm-clip-quickgelu-step", 1311, (2, 32, 32))):
        d = os.path.join(FIXTURES, folder)
        config = mm.json.load(open(os.path.join(d, "config.json")))
        sd = {k: v.double().requires_grad_(True) for k, v in mm.load_safetensors(os.path.join(d, "model.safetensors")).items()}
        pixels = mm.random_pixels(seed, b, h, w)
        gen = torch.Generator().manual_seed(seed + 1)
        labels = torch.randint(0, config["num_classes"], (b,), generator=gen)
        logits = mm.timm_forward(config, sd, pixels.double())["logits"]
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        tensors = {"pixel_values": pixels, "labels": labels.float(), "logits": logits.detach(),
                   "loss": loss.detach().reshape(1)}
        tensors.update(timm_grads(sd, config["num_features"]))
        path = os.path.join(OUT_DIR, name + ".safetensors")
        mm.save_safetensors(path, tensors, {"model": folder, "loss": "mean cross-entropy", "upstream": up})
        print(path, os.path.getsize(path), "bytes, loss", float(loss))


if __name__ == "__main__":
    if len(mm.sys.argv) > 1 and mm.sys.argv[1] == "--only-timm-distilled":
        timm_distillation_step()
        raise SystemExit
    timm_steps()
    timm_distillation_step()
    torchvision_representation_step()
    swiglu_classifier()
    distillation_step()
    adamw_curve()
    main()
