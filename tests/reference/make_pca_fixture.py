#!/usr/bin/env python3
"""Writes tests/fixtures/pca/pca.safetensors: feature rows x [n, d] with a few strong directions,
and numpy's principal components of them (numpy.linalg.eigh of the 1/(n-1) covariance, largest
eigenvalue first), for test_features: Tessera's PCA must match them up to sign.

Run with Debian's python3 (numpy; torch for the shared writer): /usr/bin/python3 tests/reference/make_pca_fixture.py
"""
import pathlib

import numpy as np
import torch
from make_kernel_fixtures import write_safetensors


def save(path, tensors):
    """F32 safetensors through the shared writer (make_kernel_fixtures.write_safetensors)."""
    write_safetensors(str(path), {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()},
                      {"generator": "tests/reference/make_pca_fixture.py"})


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
