#!/usr/bin/env python3
"""Writes tests/fixtures/segmentation_loss/ce.safetensors: F.cross_entropy(logits, labels,
ignore_index=255) (Segmenter's training loss on upsampled logits) and its gradient by autograd.
Run: /usr/bin/python3 tests/reference/make_segmentation_loss_fixture.py"""
import pathlib

import numpy as np
import torch
from make_kernel_fixtures import write_safetensors


def save(path, tensors):
    """F32 safetensors through the shared writer (make_kernel_fixtures.write_safetensors)."""
    write_safetensors(str(path), {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()},
                      {"generator": "tests/reference/make_segmentation_loss_fixture.py"})


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
