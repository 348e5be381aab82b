#!/usr/bin/env python3
# Dense probe (issue 15's detector): how well can a detector that reads each patch token alone
# (FCOS-style: every patch whose centre lies in a box predicts that box's digit and extent) do
# on an encoder's frozen features? A per-patch head (linear, or one hidden ReLU layer of HIDDEN)
# is fitted with Adam on the features of training scenes (softmax over background + 10 digits;
# L1 on the sigmoid box (cx, cy, w, h) of patches inside a box), then every patch with a digit
# probability > 0.05 is a detection, class-wise NMS at NMS_IOU, 100 per image, and COCO AP
# (101 recall points, IoU .50:.95) on the validation scenes. numpy only (Debian's python3-numpy).
#
#   ls $PWD/out/data/train-6000-seed1/images/*.png | head -1500 > train.txt
#   tessera features --model ENCODER --out train.safetensors @train.txt
#   tessera features --model ENCODER --out val.safetensors out/data/train-300-seed2/images
#   bench/detr_dense_probe.py HIDDEN NMS_IOU train.safetensors val.safetensors \
#       out/data/train-6000-seed1/annotations.json out/data/train-300-seed2/annotations.json
#
# The encoder's processor must resize to 128x128 at patch 4 (a 32x32 grid), as the detector's.
import json, struct, sys, time

import numpy as np

def load_st(p):
    f = open(p, 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); base = 8 + n
    meta = h.pop('__metadata__'); buf = np.memmap(p, dtype=np.uint8, mode='r')
    out = {}
    for k, v in h.items():
        a, b = v['data_offsets']; out[k] = np.frombuffer(buf[base + a: base + b], dtype=np.float32).reshape(v['shape'])
    return out, meta
def load_coco(p):
    c = json.load(open(p)); imgs = {i['id']: i for i in c['images']}; by = {}
    for a in c['annotations']: by.setdefault(a['image_id'], []).append(a)
    return {imgs[i]['file_name'].split('/')[-1]: (imgs[i]['width'], imgs[i]['height'], by.get(i, [])) for i in imgs}
G, S = 32, 128
def build(feat_p, coco_p):
    F, meta = load_st(feat_p); coco = load_coco(coco_p)
    X, Y, B, info = [], [], [], []
    for i in range(len(F)):
        name = meta['image.%d' % i].split('/')[-1]; W, H, anns = coco[name]
        f = F['features.%d' % i].reshape(G * G, -1)
        cls = np.zeros(G * G, np.int64); box = np.zeros((G * G, 4), np.float32); best = np.full(G * G, np.inf)
        jj, ii = np.meshgrid(np.arange(G), np.arange(G)); px = ((jj + 0.5) * 4 * W / S).ravel(); py = ((ii + 0.5) * 4 * H / S).ravel()
        for a in anns:
            x, y, w, h = a['bbox']; inside = (px >= x) & (px < x + w) & (py >= y) & (py < y + h)
            if not inside.any():
                k = int(min(G - 1, (y + h / 2) * S / H / 4)) * G + int(min(G - 1, (x + w / 2) * S / W / 4)); inside = np.zeros(G * G, bool); inside[k] = True
            sel = inside & (w * h < best); best[sel] = w * h; cls[sel] = a['category_id']
            box[sel] = [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H]
        X.append(f); Y.append(cls); B.append(box); info.append((name, W, H, anns))
    return np.concatenate(X), np.concatenate(Y), np.concatenate(B), info
t0 = time.time()
Xt, Yt, Bt, _ = build(sys.argv[3], sys.argv[5])
Xv, Yv, Bv, infov = build(sys.argv[4], sys.argv[6])
print('built', Xt.shape, (Yt > 0).mean(), time.time() - t0, flush=True)
hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 0
rng = np.random.default_rng(0)
D = Xt.shape[1]
def feats(X, P):
    return np.maximum(X @ P['W1'] + P['b1'], 0) if hidden else X
P = {}
if hidden: P['W1'] = rng.normal(0, 1 / np.sqrt(D), (D, hidden)).astype(np.float32); P['b1'] = np.zeros(hidden, np.float32)
Dh = hidden or D
P['Wc'] = np.zeros((Dh, 11), np.float32); P['bc'] = np.zeros(11, np.float32)
P['Wb'] = np.zeros((Dh, 4), np.float32); P['bb'] = np.zeros(4, np.float32)
M = {k: np.zeros_like(v) for k, v in P.items()}; V = {k: np.zeros_like(v) for k, v in P.items()}
pos = Yt > 0
sig = lambda z: 1 / (1 + np.exp(-z))
lr = 3e-3 if hidden else 1e-2
steps = 600
for it in range(1, steps + 1):
    idx = rng.integers(0, len(Xt), 65536); x = Xt[idx]; y = Yt[idx]; bt = Bt[idx]; p_ = pos[idx]
    h = feats(x, P); z = h @ P['Wc'] + P['bc']; z -= z.max(1, keepdims=True); e = np.exp(z); pr = e / e.sum(1, keepdims=True)
    g = pr.copy(); g[np.arange(len(y)), y] -= 1; g /= len(y)
    bz = h @ P['Wb'] + P['bb']; bs = sig(bz); gb = np.sign(bs - bt) * bs * (1 - bs) * p_[:, None] * 2 / max(1, p_.sum())
    G_ = {'Wc': h.T @ g, 'bc': g.sum(0), 'Wb': h.T @ gb, 'bb': gb.sum(0)}
    if hidden:
        dh = (g @ P['Wc'].T + gb @ P['Wb'].T) * (h > 0); G_['W1'] = x.T @ dh; G_['b1'] = dh.sum(0)
    a = lr * (0.5 * (1 + np.cos(np.pi * it / steps)))
    for k in P:
        M[k] = 0.9 * M[k] + 0.1 * G_[k]; V[k] = 0.999 * V[k] + 0.001 * G_[k] ** 2
        P[k] -= a * (M[k] / (1 - 0.9 ** it)) / (np.sqrt(V[k] / (1 - 0.999 ** it)) + 1e-8)
    if it % 100 == 0:
        ce = -np.log(pr[np.arange(len(y)), y] + 1e-12).mean(); l1 = (np.abs(bs - bt).sum(1) * p_).sum() / max(1, p_.sum())
        acc = (pr.argmax(1) == y)[p_].mean()
        print(it, 'ce %.3f pos-acc %.3f boxL1 %.3f' % (ce, acc, l1), flush=True)
# dense detection on val
def iou(a, b):
    x0 = np.maximum(a[0], b[:, 0]); y0 = np.maximum(a[1], b[:, 1]); x1 = np.minimum(a[2], b[:, 2]); y1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)
dets = []  # (img, cls, score, box xyxy)
for n, (name, W, H, anns) in enumerate(infov):
    x = Xv[n * G * G:(n + 1) * G * G]; h = feats(x, P); z = h @ P['Wc'] + P['bc']; z -= z.max(1, keepdims=True); e = np.exp(z); pr = e / e.sum(1, keepdims=True)
    bs = sig(h @ P['Wb'] + P['bb'])
    boxes = np.stack([(bs[:, 0] - bs[:, 2] / 2) * W, (bs[:, 1] - bs[:, 3] / 2) * H, (bs[:, 0] + bs[:, 2] / 2) * W, (bs[:, 1] + bs[:, 3] / 2) * H], 1)
    cand = []
    for c in range(1, 11):
        s = pr[:, c]; keep = np.where(s > 0.05)[0]; keep = keep[np.argsort(-s[keep])]
        taken = []
        while len(keep):
            k = keep[0]; taken.append(k)
            if len(keep) == 1: break
            keep = keep[1:][iou(boxes[k], boxes[keep[1:]]) < float(sys.argv[2])]
        cand += [(c, s[k], boxes[k]) for k in taken]
    cand.sort(key=lambda t: -t[1])
    dets += [(n, c, s, b) for c, s, b in cand[:100]]
def coco_ap(dets, infov):
    aps = {}
    for thr in np.arange(0.5, 0.96, 0.05):
        per = []
        for c in range(1, 11):
            gts = {n: [np.array([a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]]) for a in anns if a['category_id'] == c] for n, (_, _, _, anns) in enumerate(infov)}
            npos = sum(len(v) for v in gts.values())
            if npos == 0: continue
            used = {n: np.zeros(len(v), bool) for n, v in gts.items()}
            D_ = sorted([d for d in dets if d[1] == c], key=lambda d: -d[2]); tp = []
            for n, _, s, b in D_:
                g = gts[n]
                if not g: tp.append(0); continue
                ious = iou(b, np.array(g)); ious[used[n]] = -1; j = ious.argmax()
                if ious[j] >= thr: used[n][j] = True; tp.append(1)
                else: tp.append(0)
            tp = np.array(tp); ctp = np.cumsum(tp); rec = ctp / npos; prec = ctp / np.arange(1, len(tp) + 1)
            for i in range(len(prec) - 2, -1, -1): prec[i] = max(prec[i], prec[i + 1])
            q = [prec[np.searchsorted(rec, r, side='left')] if np.searchsorted(rec, r, side='left') < len(prec) else 0 for r in np.linspace(0, 1, 101)]
            per.append(np.mean(q))
        aps[round(thr, 2)] = np.mean(per)
    return aps
aps = coco_ap(dets, infov)
print('hidden', hidden, 'val AP50 %.3f AP75 %.3f mAP %.3f' % (aps[0.5], aps[0.75], np.mean(list(aps.values()))))
