"""The CLIP ViT classifier of soup (`soup-models/src/arch/clip.rs`) in PyTorch, for side-by-side
benchmarks: the same architecture, tensor names and shapes (Hugging Face CLIP vision tower →
visual projection → L2-normalised features → linear head).

    python bench/clip_torch.py --batch 8 --rounds 5 [--threads 2] [--classes 1000]
        [--arch clip-vit-b32|dinov2-vit-s14]

`dinov2-vit-s14` is soup's `dinov2-vit` (transformers' Dinov2ForImageClassification: LayerScale,
exact GELU, final LayerNorm, head on [CLS ‖ mean of the patch tokens]) at DINOv2-S/14's size and
224 px (257 tokens), as `step_bench --arch dinov2-vit-s14` builds it.

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


S14 = dict(hidden=384, intermediate=1536, layers=12, heads=6, channels=3, image=224, patch=14,
           eps=1e-6)


def dinov2_layout(cfg, classes):
    """(name, shape) of every tensor of soup's `dinov2-vit` (transformers' names and order)."""
    e, c, p = cfg["hidden"], cfg["channels"], cfg["patch"]
    positions = (cfg["image"] // p) ** 2 + 1
    out = [("dinov2.embeddings.cls_token", (1, 1, e)),
           ("dinov2.embeddings.position_embeddings", (1, positions, e)),
           ("dinov2.embeddings.patch_embeddings.projection.weight", (e, c, p, p)),
           ("dinov2.embeddings.patch_embeddings.projection.bias", (e,))]
    for i in range(cfg["layers"]):
        l = f"dinov2.encoder.layer.{i}"
        out += [(f"{l}.norm1.weight", (e,)), (f"{l}.norm1.bias", (e,))]
        for proj in ["query", "key", "value"]:
            out += [(f"{l}.attention.attention.{proj}.weight", (e, e)),
                    (f"{l}.attention.attention.{proj}.bias", (e,))]
        out += [(f"{l}.attention.output.dense.weight", (e, e)),
                (f"{l}.attention.output.dense.bias", (e,)),
                (f"{l}.layer_scale1.lambda1", (e,)),
                (f"{l}.norm2.weight", (e,)), (f"{l}.norm2.bias", (e,)),
                (f"{l}.mlp.fc1.weight", (cfg["intermediate"], e)),
                (f"{l}.mlp.fc1.bias", (cfg["intermediate"],)),
                (f"{l}.mlp.fc2.weight", (e, cfg["intermediate"])), (f"{l}.mlp.fc2.bias", (e,)),
                (f"{l}.layer_scale2.lambda1", (e,))]
    out += [("dinov2.layernorm.weight", (e,)), ("dinov2.layernorm.bias", (e,)),
            ("classifier.weight", (classes, 2 * e)), ("classifier.bias", (classes,))]
    return out


def dinov2_forward(p, images, cfg):
    """Logits of the DINOv2 classifier for images (n, c, h, w)."""
    e, heads, ps = cfg["hidden"], cfg["heads"], cfg["patch"]
    n = images.shape[0]
    emb = "dinov2.embeddings"
    x = F.conv2d(images, p[f"{emb}.patch_embeddings.projection.weight"],
                 p[f"{emb}.patch_embeddings.projection.bias"], stride=ps)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p[f"{emb}.cls_token"].expand(n, 1, e), x], dim=1)
    x = x + p[f"{emb}.position_embeddings"]
    ln = lambda x, name: F.layer_norm(x, (e,), p[f"{name}.weight"], p[f"{name}.bias"], cfg["eps"])
    lin = lambda x, name: F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])
    t = x.shape[1]
    hd = e // heads
    split = lambda y: y.reshape(n, t, heads, hd).transpose(1, 2)
    for i in range(cfg["layers"]):
        l = f"dinov2.encoder.layer.{i}"
        h = ln(x, f"{l}.norm1")
        a = f"{l}.attention.attention"
        q = split(lin(h, f"{a}.query") * hd ** -0.5)
        k = split(lin(h, f"{a}.key"))
        v = split(lin(h, f"{a}.value"))
        o = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        o = lin(o.transpose(1, 2).reshape(n, t, e), f"{l}.attention.output.dense")
        x = x + o * p[f"{l}.layer_scale1.lambda1"]
        h = F.gelu(lin(ln(x, f"{l}.norm2"), f"{l}.mlp.fc1"))
        x = x + lin(h, f"{l}.mlp.fc2") * p[f"{l}.layer_scale2.lambda1"]
    x = ln(x, "dinov2.layernorm")
    pooled = torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=-1)
    return F.linear(pooled, p["classifier.weight"], p["classifier.bias"])


def init(cfg, classes, seed=1, layout_of=None):
    """Random parameters with the scales of soup's `init` (values differ: another generator)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in (layout_of or layout)(cfg, classes):
        if "layer_norm" in name or "layrnorm" in name or ".norm" in name or "layernorm" in name \
                or name.endswith("lambda1"):
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


ARCHS = {"clip-vit-b32": (B32, layout, forward),
         "dinov2-vit-s14": (S14, dinov2_layout, dinov2_forward)}


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="clip-vit-b32", choices=sorted(ARCHS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg, layout_of, forward_of = ARCHS[args.arch]
    params = {k: v.to(dev).requires_grad_()
              for k, v in init(cfg, args.classes, layout_of=layout_of).items()}
    g = torch.Generator().manual_seed(2)
    images = torch.randn(args.batch, 3, cfg["image"], cfg["image"], generator=g).to(dev)
    labels = (torch.arange(args.batch) % args.classes).to(dev)
    fwd, bwd, step = [], [], []
    for r in range(args.rounds + 1):
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward_of(params, images, cfg), labels)
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
        print(json.dumps({"bench": "clip-step", "impl": "pytorch", "arch": args.arch,
                          "params": numel, "batch": args.batch, "threads": args.threads,
                          "device": args.device, "phase": phase,
                          "seconds": [round(s, 4) for s in v],
                          "median_s": round(statistics.median(v), 4)}))
    print(json.dumps({"bench": "clip-step", "impl": "pytorch", "arch": args.arch,
                      "batch": args.batch, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
