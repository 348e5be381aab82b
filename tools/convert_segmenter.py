#!/usr/bin/env python3
"""Convert an original Segmenter checkpoint (rstrudel/segmenter: checkpoint.pth = {"model": state_dict},
with variant.yml beside it) into a Tessera model folder:

    OUT/config.json                 {"architectures": ["Segmenter"], "model_type": "segmenter", "n_cls",
                                     "encoder": {...}, "decoder": {...}, "id2label", "inference"}
    OUT/model.safetensors           the state_dict under its own names (encoder.*, decoder.*), float32
    OUT/preprocessor_config.json    Segmenter's normalisation (variant.yml dataset_kwargs.normalization:
                                    "vit" = 0.5/0.5, "deit" = ImageNet), pixels /255, no resize: Segmenter
                                    segments images at their own size (see `tessera segment --sliding-window`)

    /usr/bin/python3 tools/convert_segmenter.py seg_tiny_mask/checkpoint.pth OUT [--variant variant.yml]
                     [--labels names.txt] [--decoder-heads N]

The encoder/decoder fields are Segmenter's keyword names with the values its factory
(segm/model/factory.py) derives: d_ff = 4 d_model; the mask transformer's d_model = the encoder's,
n_heads = d_model // 64 (override with --decoder-heads), d_ff = 4 d_model; LayerNorm eps 1e-5.
Needs torch and yaml only; nothing from the Segmenter code base.
"""
import argparse
import json
import os
import struct
import sys

import torch
import yaml

STATS = {"vit": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
         "deit": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt", "converted_by": "tools/convert_segmenter.py"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="Segmenter checkpoint.pth ({'model': state_dict})")
    ap.add_argument("out", help="output model folder")
    ap.add_argument("--variant", help="variant.yml (default: next to the checkpoint)")
    ap.add_argument("--labels", help="class names, one per line (default: class_0, class_1, ...)")
    ap.add_argument("--decoder-heads", type=int, help="mask transformer heads (default: d_model // 64)")
    a = ap.parse_args()

    variant_path = a.variant or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), "variant.yml")
    with open(variant_path) as f:
        variant = yaml.safe_load(f)
    net = variant["net_kwargs"]
    data = torch.load(a.checkpoint, map_location="cpu")
    sd = data["model"] if isinstance(data, dict) and "model" in data else data
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}

    D = int(net["d_model"])
    image_size = net["image_size"]
    image_size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    n_cls = int(net["n_cls"])
    encoder = {"image_size": image_size, "patch_size": int(net["patch_size"]), "n_layers": int(net["n_layers"]),
               "d_model": D, "n_heads": int(net["n_heads"]), "d_ff": 4 * D,
               "distilled": bool(net.get("distilled", False)), "layer_norm_eps": 1e-05}
    dec_in = net["decoder"]
    if "linear" in dec_in["name"]:
        decoder = {"name": "linear"}
    elif dec_in["name"] == "mask_transformer":
        decoder = {"name": "mask_transformer", "n_layers": int(dec_in["n_layers"]),
                   "n_heads": a.decoder_heads or D // 64, "d_model": D, "d_ff": 4 * D, "layer_norm_eps": 1e-05}
    else:
        sys.exit(f"{variant_path}: unknown decoder {dec_in['name']!r}")
    # Cross-check the variant against the weights before writing anything.
    expect = {"encoder.pos_embed": None, "encoder.patch_embed.proj.weight": (D, 3, encoder["patch_size"], encoder["patch_size"])}
    for k, shape in expect.items():
        if k not in sd:
            sys.exit(f"{a.checkpoint}: no tensor {k!r}: not a Segmenter checkpoint")
        if shape and tuple(sd[k].shape) != shape:
            sys.exit(f"{a.checkpoint}: {k} has shape {tuple(sd[k].shape)}, variant.yml says {shape}")
    head = sd.get("decoder.head.weight", sd.get("decoder.mask_norm.weight"))
    if head is None or head.shape[0] != n_cls:
        sys.exit(f"{a.checkpoint}: decoder does not have n_cls = {n_cls} classes")

    names = [f"class_{i}" for i in range(n_cls)]
    if a.labels:
        with open(a.labels) as f:
            given = [l.strip() for l in f if l.strip()]
        if len(given) != n_cls:
            sys.exit(f"{a.labels}: {len(given)} names for {n_cls} classes")
        names = given
    config = {"architectures": ["Segmenter"], "model_type": "segmenter", "n_cls": n_cls, "encoder": encoder,
              "decoder": decoder, "id2label": {str(i): n for i, n in enumerate(names)}}
    inf = variant.get("inference_kwargs", {})
    if "window_size" in inf:
        config["inference"] = {"window_size": int(inf["window_size"]), "window_stride": int(inf["window_stride"])}
    norm = variant.get("dataset_kwargs", {}).get("normalization", net.get("normalization", "vit"))
    mean, std = STATS[norm]
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": False, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std}

    os.makedirs(a.out, exist_ok=True)
    save_safetensors(os.path.join(a.out, "model.safetensors"), sd)
    write_json(os.path.join(a.out, "config.json"), config)
    write_json(os.path.join(a.out, "preprocessor_config.json"), pre)
    print(f"{a.out}: Segmenter {decoder['name']} decoder, {n_cls} classes, ViT d_model {D} x {encoder['n_layers']}, "
          f"{len(sd)} tensors, normalization {norm}")


if __name__ == "__main__":
    main()
