#!/usr/bin/env python3
"""Box-part masks for digit scenes (issue 15's detector experiments): every pixel inside a digit's
box gets 1 + 9*digit + part, part = which ninth (3x3) of the box it is in; background 0. A
Segmenter trained on them learns patch tokens that say which digit's box they are in and where in
it: the features bench/detr_oracle.cpp's parts=1 row imitates, which a DETR head learns from far
faster than from ink masks.

    /usr/bin/python3 bench/part_masks.py SCENES_DIR OUT_DIR

SCENES_DIR is a `tessera data scenes` folder; OUT_DIR gets images/ (a symlink to SCENES_DIR's),
masks/ (8-bit PNGs) and annotations.json (the 90 categories "digit-part", for `tessera train
--task segment`).
"""
import json, os, sys
import numpy as np
from PIL import Image
src, dst = sys.argv[1], sys.argv[2]
doc = json.load(open(os.path.join(src, "annotations.json")))
os.makedirs(os.path.join(dst, "masks"), exist_ok=True)
if not os.path.exists(os.path.join(dst, "images")):
    os.symlink(os.path.abspath(os.path.join(src, "images")), os.path.join(dst, "images"))
by = {}
for a in doc["annotations"]:
    by.setdefault(a["image_id"], []).append(a)
for im in doc["images"]:
    H, W = im["height"], im["width"]
    m = np.zeros((H, W), np.uint8)
    for a in by.get(im["id"], []):
        x, y, w, h = a["bbox"]
        d = a["category_id"] - 1
        x0, y0 = int(round(x)), int(round(y))
        for yy in range(y0, min(H, y0 + int(h))):
            pv = min(2, int(3 * (yy - y0 + 0.5) / h))
            for part_u in range(3):
                xa = x0 + int(round(part_u * w / 3)); xb = x0 + int(round((part_u + 1) * w / 3))
                m[yy, xa:min(W, xb)] = 1 + 9 * d + 3 * pv + part_u
    Image.fromarray(m).save(os.path.join(dst, "masks", os.path.basename(im["file_name"])))
cats = [{"id": 1 + 9 * d + p, "name": f"{d}-{p}"} for d in range(10) for p in range(9)]
json.dump({"categories": cats}, open(os.path.join(dst, "annotations.json"), "w"))
print(len(doc["images"]), "masks")
