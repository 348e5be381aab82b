#!/usr/bin/python3
"""Regenerates tests/fixtures/preprocess/ and tests/fixtures/images/ (not needed to run the tests).

Run with Debian's /usr/bin/python3 (Pillow 9.4, numpy), from the repository root:
    /usr/bin/python3 tests/reference/make_preprocess_fixtures.py [path/to/shared/conformance]

What it writes:
  preprocess/photos/*.png          conformance photos, re-encoded losslessly (pixels identical, checked)
  preprocess/<case>/...            the conformance processor configs and the pixel_values that the upstream
                                   code computed (transformers 4.40.2 / timm 1.0.28), sliced to the photos kept
  preprocess/pil_resize/*.png      Pillow Image.resize outputs for every filter, up and down, odd sizes
  preprocess/pil_resize/cases.json what each output is (source, size, filter)
  images/*                         small odd images (gray, alpha, palette, 16-bit, EXIF-rotated, broken)
  images/expected.safetensors      what Image.open(p) [+ ImageOps.exif_transpose] .convert("RGB") gives
"""
import io
import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
CONF = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(ROOT), "shared", "conformance")


# ---------------------------------------------------------------- safetensors, by hand
def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype="<f4").reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    dtypes = {np.dtype("float32"): "F32", np.dtype("uint8"): "U8"}
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ---------------------------------------------------------------- the noise images the C++ test also makes
def noise_image(w, h, seed, channels=3):
    """uint8 noise from a 64-bit LCG (Knuth MMIX constants); byte = top 8 bits. Same in the test."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    out = bytearray(w * h * channels)
    for i in range(len(out)):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        out[i] = x >> 56
    return Image.frombytes("RGB" if channels == 3 else "L", (w, h), bytes(out))


# ---------------------------------------------------------------- a PNG writer for what Pillow cannot save
def png_bytes(arr, color_type, bit_depth):
    """arr: HxW[xC] uint8/uint16 array; writes a plain PNG (filter 0) with big-endian samples."""
    h, w = arr.shape[:2]
    be = arr.astype(">u2") if bit_depth == 16 else arr.astype(np.uint8)
    rows = be.reshape(h, -1).view(np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def gradient(w, h, c, dtype, maxval, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, maxval + 1, size=(h, w, c) if c > 1 else (h, w), dtype=np.int64).astype(dtype)


# ---------------------------------------------------------------- 1. photos and conformance processors
def conformance():
    dst = os.path.join(FIX, "preprocess")
    photos = os.path.join(dst, "photos")
    os.makedirs(photos, exist_ok=True)
    sources = {
        "chelsea.png": "processors/vit-default/images/0_chelsea.png",
        "coffee_portrait.png": "yolos-tiny-rand/cases/e2e/images/1_coffee_portrait.png",
    }
    for name, rel in sources.items():
        im = Image.open(os.path.join(CONF, rel))
        im.save(os.path.join(photos, name), optimize=True)
        a = np.asarray(Image.open(os.path.join(photos, name)).convert("RGB"))
        assert (a == np.asarray(im.convert("RGB"))).all()

    def case(name, config_src, tensor_src, tensor_name, keep, images, extra=None):
        d = os.path.join(dst, name)
        os.makedirs(d, exist_ok=True)
        shutil.copyfile(os.path.join(CONF, config_src), os.path.join(d, os.path.basename(config_src)))
        t = read_safetensors(os.path.join(CONF, tensor_src))[tensor_name]
        write_safetensors(os.path.join(d, "pixel_values.safetensors"), {"pixel_values": t[:keep].copy()})
        meta = {"images": images, "from": tensor_src, "kept_batch_rows": keep}
        meta.update(extra or {})
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    # Only the first image of each batch whose photos do not fit the 2 MB fixture budget.
    case("vit-default", "processors/vit-default/preprocessor_config.json",
         "processors/vit-default/expected.safetensors", "pixel_values", 1, ["chelsea.png"],
         {"upstream": "transformers 4.40.2 ViTImageProcessor"})
    case("vit-tiny-e2e", "vit-tiny-rand/cases/e2e/preprocessor_config.json",
         "vit-tiny-rand/cases/e2e/inputs.safetensors", "pixel_values", 1, ["chelsea.png"],
         {"upstream": "transformers 4.40.2 ViTImageProcessor"})
    case("deit-tiny-e2e", "deit-tiny-distilled-rand/cases/e2e/preprocessor_config.json",
         "deit-tiny-distilled-rand/cases/e2e/inputs.safetensors", "pixel_values", 1, ["chelsea.png"],
         {"upstream": "transformers 4.40.2 DeiTImageProcessor"})
    case("yolos-tiny-e2e", "yolos-tiny-rand/cases/e2e/preprocessor_config.json",
         "yolos-tiny-rand/cases/e2e/inputs.safetensors", "pixel_values", 2,
         ["chelsea.png", "coffee_portrait.png"],
         {"upstream": "transformers 4.40.2 YolosImageProcessor", "note": "batch padded with zeros bottom/right"})
    case("timm-e2e", "timm/vit_small_patch16_224-gap-fcnorm/config.json",
         "timm/vit_small_patch16_224-gap-fcnorm/cases/e2e/inputs.safetensors", "pixel_values", 1,
         ["chelsea.png"], {"upstream": "timm 1.0.28 eval transform (resolve_data_config + create_transform)"})


# ---------------------------------------------------------------- 1b. timm eval transforms (no timm here)
def timm_eval_reference(img, cfg):
    """timm 1.0 transforms_imagenet_eval for crop_mode center / squash / border, built from torchvision
    0.14's own transforms; ResizeKeepRatio and center_crop_or_pad are transcribed from timm
    (timm/data/transforms.py) because timm is not installed here."""
    import math
    import torch
    import torchvision.transforms as T
    import torchvision.transforms.functional as F
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    img_size = tuple(cfg["input_size"][1:])
    crop_pct, mode, mean, std = cfg["crop_pct"], cfg.get("crop_mode", "center"), cfg["mean"], cfg["std"]
    scale_size = tuple(math.floor(x / crop_pct) for x in img_size)

    def resize_keep_ratio(im, target, longest, interpolation):
        h, w = im.size[1], im.size[0]
        ratio_h, ratio_w = h / target[0], w / target[1]
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        return F.resize(im, [round(x / ratio) for x in (h, w)], interpolation)

    def center_crop_or_pad(im, size, fill):
        ch, cw = size
        ih, iw = im.size[1], im.size[0]
        if cw > iw or ch > ih:
            pad = [(cw - iw) // 2 if cw > iw else 0, (ch - ih) // 2 if ch > ih else 0,
                   (cw - iw + 1) // 2 if cw > iw else 0, (ch - ih + 1) // 2 if ch > ih else 0]
            im = F.pad(im, pad, fill=fill)
            ih, iw = im.size[1], im.size[0]
            if cw == iw and ch == ih:
                return im
        return F.crop(im, int(round((ih - ch) / 2.0)), int(round((iw - cw) / 2.0)), ch, cw)

    if mode == "squash":
        im = T.CenterCrop(img_size)(T.Resize(scale_size, interpolation=interp[cfg["interpolation"]])(img))
    elif mode == "border":
        fill = tuple(round(255 * v) for v in mean)
        im = resize_keep_ratio(img, scale_size, 1.0, interp[cfg["interpolation"]])
        im = center_crop_or_pad(im, img_size, fill)
    else:
        if scale_size[0] == scale_size[1]:
            im = T.Resize(scale_size[0], interpolation=interp[cfg["interpolation"]])(img)
        else:
            im = resize_keep_ratio(img, scale_size, 0.0, T.InterpolationMode.BILINEAR)
        im = T.CenterCrop(img_size)(im)
    t = T.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))(T.ToTensor()(im))
    return t.numpy()


def timm_modes():
    d = os.path.join(FIX, "preprocess", "timm-modes")
    os.makedirs(d, exist_ok=True)
    imgs = {n: Image.open(os.path.join(FIX, "preprocess", "photos", n)).convert("RGB")
            for n in ("chelsea.png", "coffee_portrait.png")}
    im_mean, im_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    configs = {
        "center_nonsquare": {"input_size": [3, 24, 32], "interpolation": "bicubic", "crop_pct": 0.95,
                             "crop_mode": "center", "mean": im_mean, "std": im_std},
        "squash": {"input_size": [3, 28, 28], "interpolation": "bilinear", "crop_pct": 0.9,
                   "crop_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3},
        "border": {"input_size": [3, 28, 28], "interpolation": "bicubic", "crop_pct": 1.0,
                   "crop_mode": "border", "mean": im_mean, "std": im_std},
        "border_crop": {"input_size": [3, 28, 28], "interpolation": "bicubic", "crop_pct": 0.9,
                        "crop_mode": "border", "mean": im_mean, "std": im_std},
    }
    tensors = {}
    for cname, cfg in configs.items():
        for iname, img in imgs.items():
            tensors[f"{cname}/{iname}"] = timm_eval_reference(img, cfg).astype(np.float32)
    write_safetensors(os.path.join(d, "expected.safetensors"), tensors)
    with open(os.path.join(d, "configs.json"), "w") as f:
        json.dump(configs, f, indent=1)


# ---------------------------------------------------------------- 2. Pillow resize outputs
FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def pil_resize():
    d = os.path.join(FIX, "preprocess", "pil_resize")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    chelsea = Image.open(os.path.join(FIX, "preprocess", "photos", "chelsea.png")).convert("RGB")
    sources = {
        "chelsea": chelsea,
        "chelsea_crop": chelsea.crop((200, 100, 237, 123)),  # x, y, w=37, h=23
        "noise37x23": noise_image(37, 23, 1),
        "noise300x200": noise_image(300, 200, 2),
        "noise64x48": noise_image(64, 48, 3),
        "noise5x5": noise_image(5, 5, 4),
    }
    # (source, size[, filters]); the photo at 224x224 only for bicubic (bilinear 224x224 is vit-default)
    plan = [
        ("chelsea", (224, 224), [3]), ("chelsea", (97, 131)),
        ("chelsea_crop", (100, 61)),
        ("noise37x23", (100, 61)), ("noise300x200", (7, 5)), ("noise300x200", (1, 1)),
        ("noise64x48", (50, 90)), ("noise64x48", (127, 13)), ("noise5x5", (5, 7)), ("noise5x5", (9, 5)),
    ]
    cases = []
    for src, (w, h), *only in plan:
        for f, fname in FILTERS.items():
            if only and f not in only[0]:
                continue
            out = sources[src].resize((w, h), resample=f)
            name = f"{src}_{w}x{h}_{fname}.png"
            out.save(os.path.join(d, name), optimize=True)
            cases.append({"source": src, "width": w, "height": h, "resample": f, "file": name})
    # Many more sizes, checked by the CRC-32 of the output bytes (keeps the fixtures small):
    # random source/target sizes (up and down, per axis), every filter, RGB and L, and extreme shapes.
    import random
    rng = random.Random(1234)
    crc_cases = []
    shapes = [(rng.randint(1, 90), rng.randint(1, 90), rng.randint(1, 130), rng.randint(1, 130)) for _ in range(96)]
    shapes += [(1, 1, 50, 50), (200, 1, 3, 7), (3, 500, 2, 1), (640, 2, 7, 2), (2, 2, 1, 3), (97, 61, 97, 60)]
    for i, (sw, sh, dw, dh) in enumerate(shapes):
        for f in FILTERS if i >= 96 else [i % 6]:
            channels = 1 if i % 4 == 3 else 3
            out = noise_image(sw, sh, 1000 + i, channels).resize((dw, dh), resample=f)
            crc_cases.append([sw, sh, channels, 1000 + i, dw, dh, f, zlib.crc32(out.tobytes())])
    with open(os.path.join(d, "cases.json"), "w") as fp:
        json.dump({"pillow": Image.__version__ if hasattr(Image, "__version__") else "", "cases": cases,
                   "crc_cases_columns": "src_w src_h channels seed dst_w dst_h resample crc32",
                   "crc_cases": crc_cases,
                   "sources": {"chelsea_crop": [200, 100, 37, 23], "noise37x23": [37, 23, 1],
                               "noise300x200": [300, 200, 2], "noise64x48": [64, 48, 3], "noise5x5": [5, 5, 4]}},
                  fp, indent=1)


# ---------------------------------------------------------------- 3. odd images
def odd_images():
    d = os.path.join(FIX, "images")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(7)
    w, h = 13, 9
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(os.path.join(d, "rgb.png"))
    Image.fromarray(rgb[..., 0], "L").save(os.path.join(d, "gray.png"))
    la = np.stack([rgb[..., 0], rgb[..., 1]], -1)
    Image.fromarray(la, "LA").save(os.path.join(d, "gray_alpha.png"))
    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "rgba.png"))
    pal = Image.fromarray(rgb, "RGB").quantize(colors=16)
    pal.info["transparency"] = 3
    pal.save(os.path.join(d, "palette.png"), transparency=3)
    Image.fromarray(rgb[..., 0], "L").convert("1").save(os.path.join(d, "bilevel.png"))
    # 16-bit PNGs, written by hand (Pillow cannot save 48/64-bit PNGs)
    rgb16 = gradient(w, h, 3, np.uint16, 65535, 8)
    open(os.path.join(d, "rgb16.png"), "wb").write(png_bytes(rgb16, 2, 16))
    rgba16 = gradient(w, h, 4, np.uint16, 65535, 9)
    open(os.path.join(d, "rgba16.png"), "wb").write(png_bytes(rgba16, 6, 16))
    gray16 = gradient(w, h, 1, np.uint16, 65535, 10)
    open(os.path.join(d, "gray16.png"), "wb").write(png_bytes(gray16, 0, 16))
    # JPEGs: one per EXIF orientation, non-square so that rotation shows
    base = Image.fromarray(np.kron(rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8),
                                   np.ones((8, 8, 1), dtype=np.uint8)), "RGB")  # 32x24 blocks
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        base.save(os.path.join(d, f"exif{o}.jpg"), quality=95, exif=exif.tobytes())
    base.convert("L").save(os.path.join(d, "gray.jpg"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(os.path.join(d, "exif6.png"), exif=exif.tobytes())  # PNG eXIf chunk
    base.convert("CMYK").save(os.path.join(d, "cmyk.jpg"), quality=95)
    base.save(os.path.join(d, "rgb.webp"), lossless=True)
    base.save(os.path.join(d, "rgb.bmp"))
    base.save(os.path.join(d, "rgb.tiff"))
    # broken files
    png = open(os.path.join(d, "rgb.png"), "rb").read()
    open(os.path.join(d, "truncated.png"), "wb").write(png[: len(png) // 2])
    jpg = open(os.path.join(d, "exif1.jpg"), "rb").read()
    # cut inside the entropy-coded scan: libjpeg decodes it with a grey rest; Pillow refuses it
    open(os.path.join(d, "truncated.jpg"), "wb").write(jpg[: len(jpg) - 40])
    open(os.path.join(d, "text.jpg"), "w").write("this is not an image\n")
    base.save(os.path.join(d, "unsupported.gif"))  # OpenCV 4.6 has no GIF decoder
    open(os.path.join(d, "empty.png"), "wb").close()

    # What Pillow gives (the reference for the decoder). For EXIF: exif_transpose, then convert("RGB").
    expected = {}
    for name in sorted(os.listdir(d)):
        if name in ("expected.safetensors", "README.md") or name.startswith(("truncated", "text", "empty", "unsupported")):
            continue
        im = Image.open(os.path.join(d, name))
        im.load()
        if name.startswith("exif"):
            im = ImageOps.exif_transpose(im)
        if name == "gray16.png":
            # Tessera's choice: 16-bit samples become 8-bit by their high byte (value >> 8), as Pillow does
            # for 16-bit RGB PNGs; Pillow's own I;16 -> RGB clips at 255 instead (kept below, for the record).
            a = np.asarray(im).astype(np.uint32)
            a = (a >> 8).astype(np.uint8)
            expected[name] = np.repeat(a[..., None], 3, -1)
            expected["pillow_convert_rgb_" + name] = np.asarray(im.convert("RGB"))
            continue
        if name == "rgba16.png" or name == "rgb16.png":
            ref = (rgba16 if name == "rgba16.png" else rgb16)[..., :3] >> 8
            pil = np.asarray(im.convert("RGB"))
            assert (pil == ref).all(), name  # Pillow takes the high byte
        expected[name] = np.asarray(im.convert("RGB"))
    write_safetensors(os.path.join(d, "expected.safetensors"), expected)


if __name__ == "__main__":
    conformance()
    timm_modes()
    pil_resize()
    odd_images()
