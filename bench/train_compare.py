#!/usr/bin/python3
"""Training speed: Tessera (`tessera train`) against PyTorch 1.13 on the same model, data, initial
weights, batch, step count and thread count, in alternating rounds (Tessera first in even rounds,
PyTorch first in odd ones), each run in a process of its own.

Models (--model):
  digits  the digits ViT of issue 14: 20x20, patch 4, hidden 96, 6 layers, 4 heads, MLP 192,
          10 labels, batch 64, AdamW, on OpenCV's digits tutorial training cells (digits:train,
          the left 50 columns of digits.png), at each of --threads (default 1,2).
  vits    ViT-S/16 at 224, batch 16: a full fine-tuning step (forward, backward, AdamW) on random
          224x224 PNGs with random labels (an ImageFolder written to a temporary folder), at the
          largest of --threads.
  yolos   YOLOS-Ti-sized (hidden 192, 12 layers, 3 heads, MLP 768, patch 16, 100 detection tokens)
          at 256x256, batch 8, with DETR's set loss (Hungarian matching; CE + 5 L1 + 2 GIoU, no-object
          weight 0.1): `tessera train --task detect --arch yolos-ti` against the plain-torch port of
          transformers' YolosForObjectDetection and DetrLoss in tests/reference/ (validated there
          against upstream outputs; scipy's linear_sum_assignment matches), on digit scenes from
          `tessera data scenes` (10 labels), resized to 256x256 by both (Pillow-exact bilinear), at
          the largest of --threads.

How it measures:
  * Initial weights: `tessera train --arch ... --max-steps 1 --lr 0` writes a model folder of the
    untrained model (AdamW with lr 0 leaves every weight as it is); Tessera then trains from it
    with --init, and PyTorch loads the same model.safetensors into its own ViT (HF names).
  * Data order: --no-shuffle --no-augment on both sides, so batch s is samples s*B .. s*B+B-1 of
    the split (mod the epoch); the first step's loss of the two must agree (printed, a check that
    the two train the same model on the same batch).
  * Same optimisation on both sides: AdamW (0.9, 0.999, eps 1e-8), lr 1e-3 with a cosine over the
    run, weight decay 0.05 on the tensors Tessera decays, global gradient-norm clipping at 1.0,
    mean cross-entropy.
  * Speed: images/s over the steps after --warmup steps, i.e. (N - W) * B / (t_N - t_W), where
    t_k is the time step k ended. For Tessera t_k comes from log.csv (its images_per_s column is
    the running mean since the first step started: t_k = k * B / images_per_s_k); for PyTorch the
    worker times its own loop the same way. Process start-up, data loading before the first
    step, Tessera's export and its check are therefore not counted on either side. Tessera's next
    batch is decoded in a thread beside the step (its pipeline); PyTorch indexes a pre-decoded
    tensor (its data cost is ~0).
  * CPU time per image over the same steps (utime + stime of every thread: for PyTorch from
    time.process_time() in its loop, for Tessera from /proc/PID/stat, polled every 20 ms as
    log.csv reaches step W and step N). On a loaded machine wall-clock images/s mostly measures
    the share of the cores a process was given; CPU ms per image measures the work (and any
    spinning), which the load changes far less. Both are reported; the ratio of each is per round.
  * PyTorch's OpenMP threads run with OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy): with libgomp's
    default spinning, PyTorch's 2-thread steps on a loaded 2-core machine were 100x slower (10 s
    instead of 0.1 s a step), which would flatter Tessera.
  * Peak RSS: ru_maxrss of each process (os.wait4): the whole process, start-up, data and export
    included (for PyTorch: the interpreter and libtorch too); and the peak up to the last training
    step (VmHWM as log.csv gets its last row; PyTorch's own ru_maxrss after its loop), which leaves
    out Tessera's export and the check that loads it back through the inference path.
  * The ratio is Tessera / PyTorch images/s per round; the median over rounds is the result.
    On a shared machine, give the load (uptime) beside every number: the script prints it.

Run (from the repository root, after cmake --build build):
  /usr/bin/python3 bench/train_compare.py --model digits --threads 1,2 --rounds 3 --steps 40
  /usr/bin/python3 bench/train_compare.py --model vits --threads 2 --rounds 3 --steps 6 --warmup 1
  /usr/bin/python3 bench/train_compare.py --model yolos --threads 2 --rounds 3 --steps 8 --warmup 2
  add --json for a JSON document on stdout instead of the table; --precision bf16 runs Tessera with
  --precision bf16 and PyTorch under torch.autocast("cpu", dtype=torch.bfloat16) (mixed precision
  on both sides: bf16 GEMM operands, fp32 weights and optimizer; the losses then agree to bf16's
  precision, not 1e-6).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIGITS_PNG = "/usr/share/doc/opencv-doc/examples/data/digits.png"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------------------------------------
# Data (shared by the PyTorch worker; Tessera reads the same files itself)

def digits_train_pixels():
    """digits:train as Tessera orders it (rows r = 0..49, columns c = 0..49, label r // 5), as
    float32 [2500, 3, 20, 20] after /255 and (x - 0.5) / 0.5, gray replicated to 3 channels."""
    import numpy as np
    from PIL import Image
    img = Image.open(DIGITS_PNG)
    a = np.asarray(img.convert("RGB"))[:, :, 0].astype(np.float32)  # Tessera takes channel 0
    assert a.shape == (1000, 2000), a.shape
    cells, labels = [], []
    for r in range(50):
        for c in range(50):
            cells.append(a[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20])
            labels.append(r // 5)
    x = (np.stack(cells) / 255.0 - 0.5) / 0.5
    x = np.repeat(x[:, None, :, :], 3, axis=1).astype(np.float32)
    return x, np.array(labels, dtype=np.int64)


def image_folder_pixels(folder):
    """An ImageFolder in Tessera's order (class folders sorted, files sorted), each image RGB
    /255 and (x - 0.5) / 0.5 (they are written at the model's size: no resize)."""
    import numpy as np
    from PIL import Image
    xs, ys = [], []
    for k, cls in enumerate(sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))):
        for f in sorted(os.listdir(os.path.join(folder, cls))):
            a = np.asarray(Image.open(os.path.join(folder, cls, f)).convert("RGB")).astype(np.float32)
            xs.append(((a / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
            ys.append(k)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def write_random_image_folder(folder, classes, per_class, size, seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = os.path.join(folder, "c%02d" % k)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(d, "%03d.png" % i))


def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", (name, t["dtype"])
        lo, hi = t["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], dtype=np.float32).reshape(t["shape"]).copy()
    return out


# ---------------------------------------------------------------------------------------------
# The PyTorch side: HF ViTForImageClassification's math (pre-norm blocks, exact GELU, eager
# attention as transformers 4.x writes it for torch 1.13), parameter names as in the checkpoint.

def torch_adamw(spec, decay, no_decay):
    """AdamW as Tessera runs it here (decay on `decay` only) and the cosine over the run."""
    import torch
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8)
    N = spec["steps"]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / N))))


def torch_timed_loop(spec, opt, sched, params, step_loss):
    """The PyTorch worker's timed loop: step_loss(s) builds step s's loss; then backward, clipping,
    AdamW and the schedule. Writes the step end times, CPU times and losses as JSON on stdout."""
    import resource
    import torch
    ends, cpus, losses = [], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    # --precision bf16: PyTorch's own mixed precision (CPU autocast: the linear layers and matmuls in
    # bf16, the weights and optimizer fp32), against Tessera's --precision bf16.
    bf16 = spec.get("precision") == "bf16"
    for s in range(spec["steps"]):
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = step_loss(s)
            loss = loss.float()
        else:
            loss = step_loss(s)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["clip_grad"])
        opt.step()
        sched.step()
        losses.append(float(loss))
        ends.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    json.dump({"ends": ends, "cpus": cpus, "losses": losses, "rss_train_mib": rss_train, "torch": torch.__version__,
               "threads": torch.get_num_threads()}, sys.stdout)


def scene_pixels_targets(annotations, height, width, mean, std):
    """A COCO instances file of `tessera data scenes` as Tessera's detection training reads it with
    --no-augment: every image (file order) RGB, resized to height x width with Pillow's bilinear
    filter, /255, (x - mean) / std; its boxes as (cx, cy, w, h) / image size, labels = category ids."""
    import numpy as np
    from PIL import Image
    doc = json.load(open(annotations))
    folder = os.path.dirname(annotations)
    by_image = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    xs, targets = [], []
    for im in doc["images"]:
        img = Image.open(os.path.join(folder, im["file_name"])).convert("RGB").resize((width, height), Image.BILINEAR)
        a = np.asarray(img).astype(np.float32) / 255.0
        xs.append(((a - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1))
        W, H = im["width"], im["height"]
        labels, boxes = [], []
        for ann in by_image.get(im["id"], []):
            x, y, w, h = ann["bbox"]
            labels.append(ann["category_id"])
            boxes.append([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H])
        targets.append((labels, boxes))
    return np.stack(xs).astype(np.float32), targets


def torch_worker_yolos(spec):
    """The YOLOS side: a plain-torch YolosForObjectDetection forward with DetrLoss (tests/reference)."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
    import make_detection_fixtures as md
    import make_set_loss_fixtures as ms
    torch.set_grad_enabled(True)  # the fixture modules turn autograd off for their inference fixtures
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(spec["init"], "config.json")))
    proc = json.load(open(os.path.join(spec["init"], "preprocessor_config.json")))
    K = len(cfg["id2label"])
    if isinstance(cfg["image_size"], int):
        cfg["image_size"] = [cfg["image_size"], cfg["image_size"]]
    sd = {k: torch.from_numpy(v).requires_grad_(True)
          for k, v in read_safetensors(os.path.join(spec["init"], "model.safetensors")).items()}
    H, W = proc["size"]["height"], proc["size"]["width"]
    x, targets = scene_pixels_targets(spec["data"], H, W, proc["image_mean"], proc["image_std"])
    x = torch.from_numpy(x)
    targets = [{"class_labels": torch.tensor(l, dtype=torch.int64), "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4)}
               for l, b in targets]
    B = spec["batch"]
    per_epoch = x.shape[0] // B
    # As Tessera: weight decay on the matrices (".weight" with 2+ dimensions), not on biases,
    # norms, the class / detection tokens or the position embeddings.
    decay = [t for n, t in sd.items() if n.endswith("weight") and t.dim() >= 2]
    no_decay = [t for n, t in sd.items() if not (n.endswith("weight") and t.dim() >= 2)]
    opt, sched = torch_adamw(spec, decay, no_decay)
    eos = cfg.get("eos_coefficient", 0.1)

    def step_loss(s):
        lo = (s % per_epoch) * B
        xb, tb = x[lo:lo + B], targets[lo:lo + B]
        out = md.yolos_forward(cfg, sd, xb)
        num_boxes = max(1, sum(len(t["boxes"]) for t in tb))
        assert out["logits"].shape[-1] == K + 1, (out["logits"].shape, K)  # K labels + no-object
        ce, l1, giou, _ = ms.layer_loss(out["logits"], out["pred_boxes"], tb, K, eos, num_boxes)
        return ce + 5 * l1 + 2 * giou
    torch_timed_loop(spec, opt, sched, list(sd.values()), step_loss)


def torch_worker(spec):
    if spec.get("kind") == "yolos":
        return torch_worker_yolos(spec)
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(spec["init"], "config.json")))
    d, L, H, f = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]
    p, size, eps = cfg["patch_size"], cfg["image_size"], cfg["layer_norm_eps"]
    K = len(cfg["id2label"])
    T = 1 + (size // p) ** 2

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layernorm_before = nn.LayerNorm(d, eps=eps)
            self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.attn_out = nn.Linear(d, d)
            self.layernorm_after = nn.LayerNorm(d, eps=eps)
            self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

        def forward(self, x):
            B = x.shape[0]
            h = self.layernorm_before(x)
            split = lambda t: t.view(B, T, H, d // H).permute(0, 2, 1, 3)
            q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // H)
            a = torch.matmul(F.softmax(s, dim=-1), v).permute(0, 2, 1, 3).reshape(B, T, d)
            x = x + self.attn_out(a)
            return x + self.fc2(F.gelu(self.fc1(self.layernorm_after(x))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.position_embeddings = nn.Parameter(torch.zeros(1, T, d))
            self.projection = nn.Conv2d(3, d, p, stride=p)
            self.layers = nn.ModuleList([Layer() for _ in range(L)])
            self.layernorm = nn.LayerNorm(d, eps=eps)
            self.classifier = nn.Linear(d, K)

        def forward(self, x):
            t = self.projection(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + self.position_embeddings
            for layer in self.layers:
                t = layer(t)
            return self.classifier(self.layernorm(t)[:, 0])  # as HF: the final norm over every token

    model = ViT()
    # Checkpoint name -> this module's name.
    def ours(name):
        n = name[len("vit."):] if name.startswith("vit.") else name
        n = n.replace("embeddings.patch_embeddings.projection", "projection").replace("embeddings.", "")
        n = n.replace("encoder.layer.", "layers.").replace("attention.attention.", "")
        n = n.replace("attention.output.dense", "attn_out").replace("intermediate.dense", "fc1")
        return n.replace("output.dense", "fc2")
    weights = read_safetensors(os.path.join(spec["init"], "model.safetensors"))
    state = {ours(k): torch.from_numpy(v) for k, v in weights.items()}
    missing = set(model.state_dict()) - set(state)
    extra = set(state) - set(model.state_dict())
    assert not missing and not extra, (sorted(missing), sorted(extra))
    model.load_state_dict(state)

    if spec["data"] == "digits:train":
        x, y = digits_train_pixels()
    else:
        x, y = image_folder_pixels(spec["data"])
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    assert x.shape[1:] == (3, size, size), x.shape
    B = spec["batch"]
    per_epoch = x.shape[0] // B
    # Tessera decays the matrices (patch projection, q/k/v, dense, fc1/fc2, classifier), not the
    # biases, norms, cls token or position embeddings.
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2 and n not in ("cls_token", "position_embeddings")]
    no_decay = [q for n, q in model.named_parameters() if not (q.dim() >= 2 and n not in ("cls_token", "position_embeddings"))]
    opt, sched = torch_adamw(spec, decay, no_decay)
    model.train()

    def step_loss(s):
        lo = (s % per_epoch) * B
        return F.cross_entropy(model(x[lo:lo + B]), y[lo:lo + B])
    torch_timed_loop(spec, opt, sched, list(model.parameters()), step_loss)


# ---------------------------------------------------------------------------------------------
# Running the two sides

def proc_cpu_seconds(pid):
    """utime + stime of a running process (all its threads), from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid):
    """Peak RSS so far (VmHWM) of a running process, MiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def count_rows(path):
    try:
        with open(path, "rb") as f:
            return max(0, f.read().count(b"\n") - 1)
    except OSError:
        return 0


def run_measured(cmd, env=None, stdout=subprocess.DEVNULL, watch=None):
    """Runs cmd; returns (stdout text or None, peak RSS in MiB, wall seconds). watch = (log.csv,
    marks, cpu): while it runs, cpu[k] = (the process's CPU seconds, its peak RSS so far in MiB)
    when log.csv first holds k rows, for each k in marks (polled every 20 ms)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env, text=True)
    if watch:
        path, marks, cpu = watch
        # Not proc.poll(): it reaps a finished child, and wait4 below (for its rusage) would then
        # fail with ECHILD; waitid with WNOWAIT only looks.
        def running():
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        while running() and len(cpu) < len(marks):
            try:
                c = proc_cpu_seconds(proc.pid), proc_hwm_mib(proc.pid)
            except OSError:
                break
            rows = count_rows(path)
            for k in marks:
                if rows >= k and k not in cpu:
                    cpu[k] = c
            time.sleep(0.02)
    out = proc.stdout.read() if stdout == subprocess.PIPE else None
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s" % (" ".join(cmd), proc.returncode, err[-3000:]))
    return out, ru.ru_maxrss / 1024.0, time.perf_counter() - t


def rate(ends, batch, warmup):
    n = len(ends)
    assert n > warmup, "need more steps than --warmup"
    return (n - warmup) * batch / (ends[-1] - (ends[warmup - 1] if warmup > 0 else 0.0))


def tessera_run(args, m, init, data, threads, out):
    cmd = [args.tessera, "train", "--task", m.get("task", "classify"), "--init", init, "--data", data, "--out", out,
           "--max-steps", str(args.steps), "--batch", str(m["batch"]), "--no-augment", "--no-shuffle",
           "--threads", str(threads), "--seed", "0", "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
           "--clip-grad", str(args.clip_grad), "--precision", args.precision]
    env = dict(os.environ, TESSERA_NUM_THREADS=str(threads))
    cpu = {}
    shutil.rmtree(out, ignore_errors=True)
    _, rss, wall = run_measured(cmd, env=env, watch=(os.path.join(out, "log.csv"), [args.warmup, args.steps], cpu))
    ends, losses = [], []
    with open(os.path.join(out, "log.csv")) as f:
        head = f.readline().strip().split(",")
        for line in f:
            row = dict(zip(head, line.strip().split(",")))
            k = int(row["step"])
            ends.append(k * m["batch"] / float(row["images_per_s"]))
            losses.append(float(row["loss"]))
    shutil.rmtree(out, ignore_errors=True)
    timed = (args.steps - args.warmup) * m["batch"]
    cpu_ms = 1e3 * (cpu[args.steps][0] - cpu[args.warmup][0]) / timed if len(cpu) == 2 else float("nan")
    rss_train = cpu[args.steps][1] if args.steps in cpu else float("nan")
    return {"images_per_s": rate(ends, m["batch"], args.warmup), "cpu_ms_per_image": cpu_ms, "rss_mib": rss,
            "rss_train_mib": rss_train,
            "wall_s": wall, "loss_first": losses[0], "loss_last": losses[-1], "steps": len(ends)}


def torch_run(args, m, init, data, threads):
    spec = {"kind": m.get("kind", "vit"), "init": init, "data": data, "threads": threads, "batch": m["batch"],
            "steps": args.steps,
            "lr": args.lr, "weight_decay": args.weight_decay, "clip_grad": args.clip_grad, "precision": args.precision}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    out, rss, wall = run_measured([sys.executable, os.path.abspath(__file__), "--torch-worker", json.dumps(spec)],
                                  env=env, stdout=subprocess.PIPE)
    r = json.loads(out)
    w, timed = args.warmup, (args.steps - args.warmup) * m["batch"]
    cpu_ms = 1e3 * (r["cpus"][-1] - (r["cpus"][w - 1] if w > 0 else 0.0)) / timed
    return {"images_per_s": rate(r["ends"], m["batch"], args.warmup), "cpu_ms_per_image": cpu_ms,
            "rss_mib": rss, "rss_train_mib": r["rss_train_mib"], "wall_s": wall,
            "loss_first": r["losses"][0], "loss_last": r["losses"][-1], "steps": len(r["ends"]),
            "torch": r["torch"], "threads_seen": r["threads"]}


MODELS = {
    "digits": {"title": "digits ViT 20x20/4, D96, 6 layers, 4 heads, MLP 192, batch 64",
               "arch": ["--arch", "vit-digits", "--image-size", "20", "--patch-size", "4", "--hidden-size", "96",
                        "--layers", "6", "--heads", "4", "--mlp", "192"],
               "batch": 64},
    "vits": {"title": "ViT-S/16 224, batch 16 (random images, 10 labels)",
             "arch": ["--arch", "vit-s16", "--image-size", "224"],
             "batch": 16},
    "yolos": {"title": "YOLOS-Ti-sized 256x256, batch 8, set loss (digit scenes, 10 labels)",
              "arch": ["--arch", "yolos-ti", "--image-size", "256"], "task": "detect", "kind": "yolos",
              "batch": 8},
}


def make_init(args, name, m, data, tmp, threads):
    """The untrained model as a folder: one step at lr 0 (weights unchanged), exported."""
    init = os.path.join(tmp, name + "-init")
    cmd = [args.tessera, "train", "--task", m.get("task", "classify"), *m["arch"], "--data", data, "--out", init,
           "--max-steps", "1", "--batch", str(m["batch"]), "--lr", "0", "--no-augment", "--no-shuffle",
           "--threads", str(threads), "--seed", "0"]
    run_measured(cmd)
    return init


def bench_model(args, name, threads_list, tmp):
    m = MODELS[name]
    if name == "digits":
        data = "digits:train"
    elif name == "yolos":
        # every timed step in the first epoch (see below), scenes of the training cells
        folder = os.path.join(tmp, "yolos-data")
        run_measured([args.tessera, "data", "scenes", "--split", "train", "--count", str((args.steps + 1) * m["batch"]),
                      "--seed", "0", "--out", folder])
        data = os.path.join(folder, "annotations.json")
    else:
        data = os.path.join(tmp, "vits-data")
        # Enough images that every step is in the first epoch: `tessera train` writes a checkpoint
        # (weights and both AdamW moments, ~260 MB for ViT-S, fsynced) at every epoch's end, and
        # with a 2-step epoch the timed steps were half checkpoints, which PyTorch's loop does not write.
        per_class = max(2, -(-(args.steps + 1) * m["batch"] // 10))
        write_random_image_folder(data, classes=10, per_class=per_class, size=224)
    init = make_init(args, name, m, data, tmp, max(threads_list))
    results = []
    for threads in threads_list:
        rounds = []
        for r in range(args.rounds):
            order = ["tessera", "torch"] if r % 2 == 0 else ["torch", "tessera"]
            got = {"load_before": loadavg()}
            for side in order:
                log("%s, %d thread(s), round %d: %s ..." % (name, threads, r + 1, side))
                if side == "tessera":
                    got["tessera"] = tessera_run(args, m, init, data, threads, os.path.join(tmp, "run"))
                else:
                    got["torch"] = torch_run(args, m, init, data, threads)
                log("  %.1f images/s, %.2f CPU ms/image, peak RSS %.0f MiB, loss %.5f -> %.5f"
                    % (got[side]["images_per_s"], got[side]["cpu_ms_per_image"], got[side]["rss_mib"],
                       got[side]["loss_first"], got[side]["loss_last"]))
            got["load_after"] = loadavg()
            got["ratio"] = got["tessera"]["images_per_s"] / got["torch"]["images_per_s"]
            got["cpu_ratio"] = got["torch"]["cpu_ms_per_image"] / got["tessera"]["cpu_ms_per_image"]
            rounds.append(got)
        med = lambda f: statistics.median(f(x) for x in rounds)
        results.append({
            "model": name, "title": m["title"] + (", bf16 GEMMs (Tessera --precision bf16, PyTorch autocast)"
                                                  if args.precision == "bf16" else ""), "precision": args.precision,
            "threads": threads, "batch": m["batch"], "steps": args.steps,
            "warmup": args.warmup, "rounds": rounds,
            "median_ratio": med(lambda x: x["ratio"]),
            "median_tessera_images_per_s": med(lambda x: x["tessera"]["images_per_s"]),
            "median_torch_images_per_s": med(lambda x: x["torch"]["images_per_s"]),
            "median_cpu_ratio": med(lambda x: x["cpu_ratio"]),
            "median_tessera_cpu_ms_per_image": med(lambda x: x["tessera"]["cpu_ms_per_image"]),
            "median_torch_cpu_ms_per_image": med(lambda x: x["torch"]["cpu_ms_per_image"]),
            "peak_rss_tessera_mib": max(x["tessera"]["rss_mib"] for x in rounds),
            "peak_rss_torch_mib": max(x["torch"]["rss_mib"] for x in rounds),
            "peak_rss_train_tessera_mib": max(x["tessera"]["rss_train_mib"] for x in rounds),
            "peak_rss_train_torch_mib": max(x["torch"]["rss_train_mib"] for x in rounds),
            "first_loss_max_diff": max(abs(x["tessera"]["loss_first"] - x["torch"]["loss_first"]) for x in rounds),
            "last_loss_max_diff": max(abs(x["tessera"]["loss_last"] - x["torch"]["loss_last"]) for x in rounds),
        })
    return results


def num(x):
    """Three significant digits at least (1.13, 23.3, 233)."""
    return "%.3g" % x if abs(x) < 100 else "%.0f" % x


def print_table(results, header):
    print(header)
    for res in results:
        print("\n%s, %d thread(s), %d steps (first %d not timed), %d rounds"
              % (res["title"], res["threads"], res["steps"], res["warmup"], len(res["rounds"])))
        print("| round | first | Tessera img/s | PyTorch img/s | Tessera/PyTorch | CPU ms/img Tessera | CPU ms/img PyTorch "
              "| PyTorch/Tessera CPU | RSS Tessera MiB | RSS PyTorch MiB | load (before → after) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for i, x in enumerate(res["rounds"]):
            print("| %d | %s | %s | %s | %.2fx | %s | %s | %.2fx | %.0f | %.0f | %s → %s |"
                  % (i + 1, "Tessera" if i % 2 == 0 else "PyTorch", num(x["tessera"]["images_per_s"]),
                     num(x["torch"]["images_per_s"]), x["ratio"], num(x["tessera"]["cpu_ms_per_image"]),
                     num(x["torch"]["cpu_ms_per_image"]), x["cpu_ratio"], x["tessera"]["rss_mib"], x["torch"]["rss_mib"],
                     x["load_before"], x["load_after"]))
        print("| **median** | | **%s** | **%s** | **%.2fx** | %s | %s | **%.2fx** | %.0f (peak) | %.0f (peak) | |"
              % (num(res["median_tessera_images_per_s"]), num(res["median_torch_images_per_s"]), res["median_ratio"],
                 num(res["median_tessera_cpu_ms_per_image"]), num(res["median_torch_cpu_ms_per_image"]), res["median_cpu_ratio"],
                 res["peak_rss_tessera_mib"], res["peak_rss_torch_mib"]))
        print("peak RSS up to the last step (before Tessera's export and its check): Tessera %.0f MiB, PyTorch %.0f MiB "
              "(%.2fx); whole process: %.0f vs %.0f MiB (%.2fx)"
              % (res["peak_rss_train_tessera_mib"], res["peak_rss_train_torch_mib"],
                 res["peak_rss_train_tessera_mib"] / res["peak_rss_train_torch_mib"],
                 res["peak_rss_tessera_mib"], res["peak_rss_torch_mib"],
                 res["peak_rss_tessera_mib"] / res["peak_rss_torch_mib"]))
        print("loss, Tessera vs PyTorch (same weights, same batches): max |difference| %.2e at step 1, %.2e at step %d"
              % (res["first_loss_max_diff"], res["last_loss_max_diff"], res["steps"]))
    by = {(r["model"], r["threads"]): r for r in results}
    if ("digits", 1) in by and ("digits", 2) in by:
        a, b = by[("digits", 1)], by[("digits", 2)]
        print("\ndigits, 2 vs 1 thread (medians): Tessera %.2fx, PyTorch %.2fx"
              % (b["median_tessera_images_per_s"] / a["median_tessera_images_per_s"],
                 b["median_torch_images_per_s"] / a["median_torch_images_per_s"]))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--torch-worker":
        return torch_worker(json.loads(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--table-from":  # the table of an earlier --json-out
        doc = json.load(open(sys.argv[2]))
        print("command: " + doc["command"])
        return print_table(doc["results"], doc["header"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits", help="digits, vits, yolos or all")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (vits runs at the largest)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: digits 40, vits 6, yolos 8)")
    ap.add_argument("--warmup", type=int, default=-1, help="untimed first steps (default: digits 5, vits 1, yolos 2)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: tessera train --precision bf16 against PyTorch's CPU autocast to bf16")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip-grad", type=float, default=1.0)
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of the PyTorch worker (its OpenMP threads); 'unset' leaves libgomp's "
                         "default. PASSIVE by default: on a loaded machine libgomp's spinning makes PyTorch's "
                         "2-thread steps up to 100x slower, and this gives PyTorch its best showing")
    ap.add_argument("--tessera", default=os.path.join(ROOT, "build", "apps", "tessera"))
    ap.add_argument("--json", action="store_true", help="a JSON document on stdout instead of the table")
    ap.add_argument("--json-out", help="also write the JSON document to this file")
    args = ap.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]
    models = ["digits", "vits", "yolos"] if args.model == "all" else [args.model]
    for n in models:
        if n not in MODELS:
            ap.error("--model: digits, vits, yolos or all")
    blas = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    if "openblas" not in blas:  # as bench/compare.py: a fresh Debian machine has only the reference BLAS
        sys.exit(f"PyTorch would use the reference BLAS ({blas}), which is ~15x slower than OpenBLAS and "
                 "makes the comparison meaningless: apt-get install libopenblas0-pthread")
    steps0, warm0 = args.steps, args.warmup
    header = "train_compare: %s; %s; %d cores; load average at start %s" % (
        args.tessera, subprocess.run(["/usr/bin/python3", "-c", "import torch; print('torch', torch.__version__)"],
                                     capture_output=True, text=True).stdout.strip(), os.cpu_count(), loadavg())
    results = []
    tmp = tempfile.mkdtemp(prefix="train_compare-")
    try:
        for n in models:
            args.steps = steps0 or {"digits": 40, "vits": 6, "yolos": 8}[n]
            args.warmup = warm0 if warm0 >= 0 else {"digits": 5, "vits": 1, "yolos": 2}[n]
            tl = threads_list if n == "digits" else [max(threads_list)]
            results += bench_model(args, n, tl, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header += "; load average at end %s" % loadavg()
    doc = {"header": header, "command": " ".join(sys.argv), "results": results}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=1)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print_table(results, header)


if __name__ == "__main__":
    main()
