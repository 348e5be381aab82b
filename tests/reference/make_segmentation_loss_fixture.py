#!/usr/bin/env python3
"""Writes tests/fixtures/segmentation_loss/ce.safetensors: F.cross_entropy(logits, labels,
ignore_index=255) (Segmenter's training loss on upsampled logits) and its gradient by autograd.
Run: /usr/bin/python3 tests/reference/make_segmentation_loss_fixture.py"""
import json
import pathlib
import struct

import numpy as np
import torch


def save(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.asarray(a).shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


g = torch.Generator().manual_seed(11)
logits = (torch.randn(2, 5, 7, 9, generator=g) * 3).requires_grad_()
labels = torch.randint(0, 5, (2, 7, 9), generator=g)
labels[torch.rand(2, 7, 9, generator=g) < 0.2] = 255
loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
loss.backward()
out = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "segmentation_loss"
out.mkdir(parents=True, exist_ok=True)
save(out / "ce.safetensors", {"logits": logits.detach().numpy(), "labels": labels.numpy(),
                              "loss": np.array([loss.item()]), "dlogits": logits.grad.numpy()})
print(loss.item())
