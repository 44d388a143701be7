"""The CLIP ViT classifier of soup (`soup-models/src/arch/clip.rs`) in PyTorch, for side-by-side
benchmarks: the same architecture, tensor names and shapes (Hugging Face CLIP vision tower →
visual projection → L2-normalised features → linear head).

    python bench/clip_torch.py --batch 8 --rounds 5 [--threads 2] [--classes 1000]

prints one JSON line per phase (forward, backward, step) with every timed round and the median,
then the peak RSS, in the format of `soup-models/examples/step_bench.rs`. Used by
`cargo xtask bench --torch`; never part of CI.
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F

B32 = dict(hidden=768, intermediate=3072, layers=12, heads=12, channels=3, image=224, patch=32,
           projection=512, eps=1e-5)


def layout(cfg, classes):
    """(name, shape) of every tensor, in soup's order (the Hugging Face state dict's)."""
    e, c, p = cfg["hidden"], cfg["channels"], cfg["patch"]
    positions = (cfg["image"] // p) ** 2 + 1
    out = [("vision_model.embeddings.class_embedding", (e,)),
           ("vision_model.embeddings.patch_embedding.weight", (e, c, p, p)),
           ("vision_model.embeddings.position_embedding.weight", (positions, e)),
           ("vision_model.pre_layrnorm.weight", (e,)), ("vision_model.pre_layrnorm.bias", (e,))]
    for i in range(cfg["layers"]):
        l = f"vision_model.encoder.layers.{i}"
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"]:
            out += [(f"{l}.self_attn.{proj}.weight", (e, e)), (f"{l}.self_attn.{proj}.bias", (e,))]
        out += [(f"{l}.layer_norm1.weight", (e,)), (f"{l}.layer_norm1.bias", (e,)),
                (f"{l}.mlp.fc1.weight", (cfg["intermediate"], e)),
                (f"{l}.mlp.fc1.bias", (cfg["intermediate"],)),
                (f"{l}.mlp.fc2.weight", (e, cfg["intermediate"])), (f"{l}.mlp.fc2.bias", (e,)),
                (f"{l}.layer_norm2.weight", (e,)), (f"{l}.layer_norm2.bias", (e,))]
    out += [("vision_model.post_layernorm.weight", (e,)),
            ("vision_model.post_layernorm.bias", (e,)),
            ("visual_projection.weight", (cfg["projection"], e)),
            ("classification_head.weight", (classes, cfg["projection"])),
            ("classification_head.bias", (classes,))]
    return out


def init(cfg, classes, seed=1):
    """Random parameters with the scales of soup's `init` (values differ: another generator)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in layout(cfg, classes):
        if "layer_norm" in name or "layrnorm" in name:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=g) * fan_in ** -0.5
        params[name] = t
    return params


def forward(p, images, cfg):
    """Logits of the classifier for images (n, c, h, w)."""
    e, heads, ps = cfg["hidden"], cfg["heads"], cfg["patch"]
    n = images.shape[0]
    emb = "vision_model.embeddings"
    x = F.conv2d(images, p[f"{emb}.patch_embedding.weight"], stride=ps)
    x = x.flatten(2).transpose(1, 2)
    cls = p[f"{emb}.class_embedding"].reshape(1, 1, e).expand(n, 1, e)
    x = torch.cat([cls, x], dim=1) + p[f"{emb}.position_embedding.weight"]
    ln = lambda x, name: F.layer_norm(x, (e,), p[f"{name}.weight"], p[f"{name}.bias"], cfg["eps"])
    lin = lambda x, name: F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])
    x = ln(x, "vision_model.pre_layrnorm")
    t = x.shape[1]
    hd = e // heads
    split = lambda y: y.reshape(n, t, heads, hd).transpose(1, 2)
    for i in range(cfg["layers"]):
        l = f"vision_model.encoder.layers.{i}"
        h = ln(x, f"{l}.layer_norm1")
        q = split(lin(h, f"{l}.self_attn.q_proj") * hd ** -0.5)
        k = split(lin(h, f"{l}.self_attn.k_proj"))
        v = split(lin(h, f"{l}.self_attn.v_proj"))
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        x = x + lin(a.transpose(1, 2).reshape(n, t, e), f"{l}.self_attn.out_proj")
        h = ln(x, f"{l}.layer_norm2")
        h = lin(h, f"{l}.mlp.fc1")
        h = h * torch.sigmoid(1.702 * h)
        x = x + lin(h, f"{l}.mlp.fc2")
    pooled = ln(x[:, 0], "vision_model.post_layernorm")
    feats = F.linear(pooled, p["visual_projection.weight"])
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return F.linear(feats, p["classification_head.weight"], p["classification_head.bias"])


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = B32
    params = {k: v.to(dev).requires_grad_() for k, v in init(cfg, args.classes).items()}
    g = torch.Generator().manual_seed(2)
    images = torch.randn(args.batch, 3, 224, 224, generator=g).to(dev)
    labels = (torch.arange(args.batch) % args.classes).to(dev)
    fwd, bwd, step = [], [], []
    for r in range(args.rounds + 1):
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward(params, images, cfg), labels)
        loss.item()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss, list(params.values()))
        sync()
        t2 = time.perf_counter()
        with torch.no_grad():
            for p, gr in zip(params.values(), grads):
                p.sub_(gr, alpha=1e-6)
        sync()
        t3 = time.perf_counter()
        if r > 0:  # round 0 warms caches and allocators
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            step.append(t3 - t0)
    numel = sum(p.numel() for p in params.values())
    for phase, v in [("forward", fwd), ("backward", bwd), ("step", step)]:
        print(json.dumps({"bench": "clip-step", "impl": "pytorch", "arch": "clip-vit-b32",
                          "params": numel, "batch": args.batch, "threads": args.threads,
                          "device": args.device, "phase": phase,
                          "seconds": [round(s, 4) for s in v],
                          "median_s": round(statistics.median(v), 4)}))
    print(json.dumps({"bench": "clip-step", "impl": "pytorch", "arch": "clip-vit-b32",
                      "batch": args.batch, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
