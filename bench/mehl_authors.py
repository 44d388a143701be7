"""The authors' MEHL-Soup+ loop (github.com/nblt/MEHL-Soup, `MEHL_soup_layer.py`: the model-batch
loop and `P_Step`), ported to one CPU process for an end-to-end comparison with
`soup mix --method mehl+` (`cargo xtask bench --torch`; never part of CI).

What is kept from the authors' code, operation for operation: models loaded one at a time into
rows of a dense (b × D) matrix P; the center as the mean of the first model batch, then the current
soup; P ← P − center, each row normalised per tensor (one block per tensor, `--layer-size 0`,
no guard for zero norms); X (b × L) trained by AdamW with warm-up 0.2 + cosine; per step: the
gradient flattened into one D-vector, clipped to global norm 1.0, X.grad[:, l] = P_l g_l by one
matrix product per tensor, the optimizer step, then θ = center + Σ_l P_lᵀ X[:, l] built in a fresh
D-vector and copied into the model's tensors. What differs: no DDP/CUDA (one CPU process), the
model is `clip_torch.forward` on the zoo's tensors, and evaluation is what `soup mix` does (the
held-out set after each model batch, the test set at the end) instead of the authors' per-epoch
test passes, so both sides do the same work.

    python bench/mehl_authors.py --zoo DIR --heldout-index FILE --examples K [--model-batch 4]
        [--epochs 2] [--batch-size 50] [--lr 0.01] [--seed 1] [--threads 2]
"""

import argparse
import gzip
import json
import math
import os
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import clip_torch

FMNIST = "/usr/share/datasets/fashion-mnist"


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def dataset(split, rows, cfg):
    """Images prepared as soup prepares them for a 1-channel model at 28 px: (v/255 − 0.5)/0.5."""
    images = idx(f"{FMNIST}/{split}-images-idx3-ubyte.gz")[rows].astype(np.float32)
    labels = idx(f"{FMNIST}/{split}-labels-idx1-ubyte.gz")[rows].astype(np.int64)
    assert cfg["channels"] == 1 and cfg["image"] == 28, "the port takes 1-channel 28 px models"
    x = (images / 255.0 - 0.5) / 0.5
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(labels)


def config(path):
    with open(path) as f:
        c = json.load(f)
    return dict(hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                channels=c.get("num_channels", 3), image=c["image_size"], patch=c["patch_size"],
                projection=c["projection_dim"], eps=c.get("layer_norm_eps", 1e-5),
                classes=c["num_classes"])


def flat(params):
    return torch.cat([p.data.reshape(-1) for p in params])


def set_flat(params, vec):
    """The authors' update_param: each tensor a copy of its slice."""
    i = 0
    for p in params:
        n = p.numel()
        p.data = vec[i:i + n].reshape(p.shape).clone()
        i += n


def evaluate(params, names, cfg, data, batch=500):
    x, y = data
    p = dict(zip(names, params))
    loss, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(y), batch):
            out = clip_torch.forward(p, x[s:s + batch], cfg)
            loss += F.cross_entropy(out, y[s:s + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[s:s + batch]).sum().item()
    return loss / len(y), correct / len(y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--heldout-index", required=True)
    ap.add_argument("--examples", type=int, required=True)
    ap.add_argument("--model-batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    dirs = sorted(os.path.join(args.zoo, d) for d in os.listdir(args.zoo)
                  if os.path.exists(os.path.join(args.zoo, d, "model.safetensors")))
    cfg = config(os.path.join(dirs[0], "config.json"))
    names = [n for n, _ in clip_torch.layout(cfg, cfg["classes"])]
    with open(args.heldout_index) as f:
        rows = [int(l) for l in f if l.strip()][:args.examples]
    heldout = dataset("train", rows, cfg)
    test = dataset("t10k", list(range(args.examples)), cfg)

    first = load_file(os.path.join(dirs[0], "model.safetensors"))
    params = [first[n].clone().requires_grad_() for n in names]
    sizes = [p.numel() for p in params]  # one block per tensor (--layer-size 0)
    D = sum(sizes)

    models = list(range(len(dirs)))
    np.random.shuffle(models)
    center = None
    n_batches = math.ceil(len(rows) / args.batch_size)
    for st in range(0, len(models), args.model_batch):
        batch = models[st:st + args.model_batch]
        P = torch.zeros((len(batch), D))
        if center is not None:
            center = flat(params)
        for i, m in enumerate(batch):
            state = load_file(os.path.join(dirs[m], "model.safetensors"))
            for p, n in zip(params, names):
                p.data.copy_(state[n])
            P[i, :] = flat(params)
        del state
        if center is None:
            center = P.sum(0) / len(batch)
            if len(batch) > 1:
                P -= center
        else:
            P -= center
        set_flat(params, center)
        j = 0
        for size in sizes:
            P[:, j:j + size] /= torch.norm(P[:, j:j + size], dim=1).reshape(-1, 1)
            j += size
        X = torch.zeros((len(batch), len(sizes)), requires_grad=True)
        X.sum().backward()
        opt = torch.optim.AdamW([X], lr=args.lr, weight_decay=0.0)
        steps = n_batches * args.epochs
        warmup = int(steps * 0.2)
        step = 0
        g = torch.Generator().manual_seed(args.seed + st)
        for epoch in range(args.epochs):
            order = torch.randperm(len(rows), generator=g)
            for s in range(n_batches):
                lr = (args.lr * (step + 1) / warmup if step < warmup else
                      0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))) * args.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                step += 1
                sel = order[s * args.batch_size:(s + 1) * args.batch_size]
                out = clip_torch.forward(dict(zip(names, params)), heldout[0][sel], cfg)
                loss = F.cross_entropy(out, heldout[1][sel])
                for p in params:
                    p.grad = None
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                # P_Step
                grad = torch.cat([p.grad.reshape(-1) for p in params])
                j = 0
                for l, size in enumerate(sizes):
                    X.grad.data[:, l] = torch.mm(P[:, j:j + size],
                                                 grad[j:j + size].reshape(-1, 1)).reshape(-1)
                    j += size
                opt.step()
                proj = torch.zeros_like(grad)
                j = 0
                for l, size in enumerate(sizes):
                    proj[j:j + size] = torch.mm(P[:, j:j + size].transpose(0, 1),
                                                X.data[:, l].reshape(-1, 1)).reshape(-1)
                    j += size
                set_flat(params, proj + center)
                for p in params:
                    p.requires_grad_()
        evaluate(params, names, cfg, heldout)
    test_loss, test_acc = evaluate(params, names, cfg, test)
    print(json.dumps({"bench": "mehl-end-to-end", "impl": "authors-port", "models": len(dirs),
                      "params": D, "test_loss": test_loss, "test_accuracy": test_acc,
                      "seconds_inside": round(time.perf_counter() - started, 3),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
