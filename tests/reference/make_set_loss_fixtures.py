#!/usr/bin/env python3
"""Writes tests/fixtures/set_loss/*.safetensors: the DETR / YOLOS Hungarian set loss and its
gradient as transformers 4.40 computes them (DetrHungarianMatcher, DetrLoss, and the weighting in
DetrForObjectDetection.forward), ported here line by line since transformers is not installable:
  cost  = class_cost * -softmax(logits)[:, target class] + bbox_cost * L1(cxcywh) + giou_cost * -GIoU(corners)
  match = scipy.optimize.linear_sum_assignment per image
  loss_ce   = cross_entropy(logits over every query, no-object = num_labels, weight [1.., eos_coef])
  loss_bbox = sum L1(matched boxes) / num_boxes;  loss_giou = sum (1 - GIoU(matched)) / num_boxes
  loss      = 1 * loss_ce + 5 * loss_bbox + 2 * loss_giou  (+ the same per auxiliary decoder layer)
Gradients by torch autograd. Run: /usr/bin/python3 tests/reference/make_set_loss_fixtures.py
"""
import pathlib

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from make_kernel_fixtures import write_safetensors

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "set_loss"


def save(path, tensors):
    """F32 safetensors through the shared writer (make_kernel_fixtures.write_safetensors)."""
    write_safetensors(str(path), {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()},
                      {"generator": "tests/reference/make_set_loss_fixtures.py"})


def center_to_corners(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def box_iou(b1, b2):
    a1, a2 = box_area(b1), box_area(b2)
    lt = torch.max(b1[:, None, :2], b2[:, :2])
    rb = torch.min(b1[:, None, 2:], b2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = a1[:, None] + a2 - inter
    return inter / union, union


def generalized_box_iou(b1, b2):
    iou, union = box_iou(b1, b2)
    tl = torch.min(b1[:, None, :2], b2[:, :2])
    br = torch.max(b1[:, None, 2:], b2[:, 2:])
    wh = (br - tl).clamp(min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area


@torch.no_grad()
def match(logits, boxes, targets, class_cost=1.0, bbox_cost=5.0, giou_cost=2.0):
    bs, nq = logits.shape[:2]
    prob = logits.flatten(0, 1).softmax(-1)
    ob = boxes.flatten(0, 1)
    ids = torch.cat([t["class_labels"] for t in targets])
    tb = torch.cat([t["boxes"] for t in targets])
    c = bbox_cost * torch.cdist(ob, tb, p=1) + class_cost * -prob[:, ids] + giou_cost * -generalized_box_iou(
        center_to_corners(ob), center_to_corners(tb))
    c = c.view(bs, nq, -1)
    sizes = [len(t["boxes"]) for t in targets]
    out = []
    for i, part in enumerate(c.split(sizes, -1)):
        r, k = linear_sum_assignment(part[i])
        out.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(k, dtype=torch.int64)))
    return out


def layer_loss(logits, boxes, targets, num_labels, eos, num_boxes):
    idx_pairs = match(logits, boxes, targets)
    batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(idx_pairs)])
    src_idx = torch.cat([s for s, _ in idx_pairs])
    weight = torch.ones(num_labels + 1)
    weight[-1] = eos
    tc_o = torch.cat([t["class_labels"][j] for t, (_, j) in zip(targets, idx_pairs)])
    tc = torch.full(logits.shape[:2], num_labels, dtype=torch.int64)
    tc[(batch_idx, src_idx)] = tc_o
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tc, weight)
    sb = boxes[(batch_idx, src_idx)]
    tb = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, idx_pairs)], dim=0)
    l1 = torch.nn.functional.l1_loss(sb, tb, reduction="none").sum() / num_boxes
    giou = (1 - torch.diag(generalized_box_iou(center_to_corners(sb), center_to_corners(tb)))).sum() / num_boxes
    return ce, l1, giou, idx_pairs


def case(name, seed, batch, queries, num_labels, counts, layers):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, queries, num_labels + 1, generator=g, dtype=torch.float32).requires_grad_() for _ in range(layers)]
    boxes = [torch.sigmoid(torch.randn(batch, queries, 4, generator=g)).detach().requires_grad_() for _ in range(layers)]
    targets = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"class_labels": torch.randint(0, num_labels, (n,), generator=g),
                        "boxes": torch.cat([cxcy, wh], dim=1)})
    num_boxes = max(float(sum(counts)), 1.0)
    total = 0
    terms = []
    matches = None
    for l in range(layers):  # the last layer is the model's output; the others are auxiliary
        ce, l1, giou, pairs = layer_loss(logits[l], boxes[l], targets, num_labels, 0.1, num_boxes)
        total = total + 1 * ce + 5 * l1 + 2 * giou
        terms.append([ce.item(), l1.item(), giou.item()])
        if l == layers - 1:
            matches = pairs
    total.backward()
    t = {"loss": np.array([total.item()]), "terms": np.array(terms), "counts": np.array(counts)}
    for l in range(layers):
        t[f"logits.{l}"] = logits[l].detach().numpy()
        t[f"boxes.{l}"] = boxes[l].detach().numpy()
        t[f"dlogits.{l}"] = logits[l].grad.numpy()
        t[f"dboxes.{l}"] = boxes[l].grad.numpy()
    for i, tg in enumerate(targets):
        if len(tg["boxes"]):
            t[f"target_labels.{i}"] = tg["class_labels"].numpy()
            t[f"target_boxes.{i}"] = tg["boxes"].numpy()
        q, j = matches[i]
        if len(q):
            t[f"match.{i}"] = np.stack([q.numpy(), j.numpy()], axis=1)
    save(OUT / f"{name}.safetensors", t)
    print(name, total.item(), terms)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    case("yolos-like", 1, batch=2, queries=8, num_labels=5, counts=[3, 0], layers=1)
    case("detr-aux", 2, batch=3, queries=7, num_labels=4, counts=[2, 5, 1], layers=3)
    case("more-targets", 3, batch=1, queries=6, num_labels=3, counts=[6], layers=1)
