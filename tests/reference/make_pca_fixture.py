#!/usr/bin/env python3
"""Writes tests/fixtures/pca/pca.safetensors: feature rows x [n, d] with a few strong directions,
and numpy's principal components of them (numpy.linalg.eigh of the 1/(n-1) covariance, largest
eigenvalue first), for test_features: Tessera's PCA must match them up to sign.

Run with Debian's python3 (numpy only): /usr/bin/python3 tests/reference/make_pca_fixture.py
"""
import json
import pathlib
import struct

import numpy as np


def save(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


rng = np.random.default_rng(7)
n, d = 60, 12
basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
scales = np.array([6.0, 3.5, 2.0] + [0.4] * (d - 3))
x = (rng.standard_normal((n, d)) * scales) @ basis.T + rng.standard_normal(d) * 3
x = x.astype(np.float32)
xd = x.astype(np.float64)
cov = np.cov(xd, rowvar=False)  # 1 / (n - 1)
w, v = np.linalg.eigh(cov)
order = np.argsort(w)[::-1][:3]
out = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "pca" / "pca.safetensors"
save(out, {"x": x, "components": v[:, order].T.copy(), "variances": w[order].copy()})
print(out, "variances", w[order])
