"""Makes soup-models/tests/golden/backward/expected.safetensors: losses and gradients of every
parameter computed by PyTorch's autograd in float64, once; CI compares soup's hand-written
backward passes (`arch/tape`) against them without Python (soup-models/tests/tape.rs). Run by hand
from the repository root:

    python3 -m venv venv && venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        safetensors==0.8.0 numpy
    venv/bin/python soup-models/tests/golden/make_backward.py

What it writes (about 200 kB, every tensor float64 except the labels, int64):
- `clip.<name>`: random parameters of a tiny CLIP classifier (soup's `tiny_clip_config(3, 5)`:
  width 16, MLP 32, 2 layers, 2 heads, 16 px, patch 4, projection 8, 5 classes), every tensor
  random (no LayerNorm trivially 1 or 0); `clip.images` (3 × 3 × 16 × 16), `clip.labels`;
  `clip.loss`: PyTorch's cross-entropy with label smoothing 0.1 of the logits of
  `bench/clip_torch.py`'s forward (F.conv2d, F.layer_norm, softmax attention, quick-GELU);
  `clip.grad.<name>`: its gradient with respect to every parameter.
- `dinov2.loss`, `dinov2.grad.<name>`: the same for transformers' Dinov2ForImageClassification in
  tests/golden/dinov2/hf-dinov2 (converted to float64) on that directory's `tiny.pixel_values`,
  labels `dinov2.labels`.
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "..", "..", "..", "bench"))
import clip_torch  # noqa: E402

SMOOTHING = 0.1
TINY = dict(hidden=16, intermediate=32, layers=2, heads=2, channels=3, image=16, patch=4,
            projection=8, eps=1e-5)


def clip(out):
    g = torch.Generator().manual_seed(11)
    params = {}
    for name, shape in clip_torch.layout(TINY, 5):
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        scale = fan_in ** -0.5 if len(shape) > 1 else 0.3
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if "layer_norm" in name or "layrnorm" in name:
            t = t + (1.0 if name.endswith("weight") else 0.0)
        params[name] = t.requires_grad_()
    images = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.tensor([4, 0, 2])
    logits = clip_torch.forward(params, images, TINY)
    loss = F.cross_entropy(logits, labels, label_smoothing=SMOOTHING)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, p), gr in zip(params.items(), grads):
        out[f"clip.{name}"] = p.detach()
        out[f"clip.grad.{name}"] = gr
    out["clip.images"] = images
    out["clip.labels"] = labels
    out["clip.loss"] = loss.detach().reshape(1)


def dinov2(out):
    from transformers import Dinov2ForImageClassification

    model = Dinov2ForImageClassification.from_pretrained(
        os.path.join(ROOT, "dinov2", "hf-dinov2"), attn_implementation="eager"
    ).double()
    model.eval()
    x = load_file(os.path.join(ROOT, "dinov2", "expected.safetensors"))["tiny.pixel_values"]
    labels = torch.tensor([1, 4, 0])
    logits = model(pixel_values=x.double()).logits
    loss = F.cross_entropy(logits, labels, label_smoothing=SMOOTHING)
    named = [(n, p) for n, p in model.named_parameters() if "mask_token" not in n]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    # transformers 5 renames the attention's modules when it loads; the gradients are stored
    # under the checkpoint's (and soup's) names.
    on_disk = set(load_file(os.path.join(ROOT, "dinov2", "hf-dinov2", "model.safetensors")))
    renames = [("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"),
               ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense")]
    for (name, _), gr in zip(named, grads):
        for new, old in renames:
            name = name.replace(new, old)
        assert name in on_disk, name
        out[f"dinov2.grad.{name}"] = gr
    out["dinov2.labels"] = labels
    out["dinov2.loss"] = loss.detach().reshape(1)


def main():
    torch.set_num_threads(1)
    out = {}
    clip(out)
    dinov2(out)
    dst = os.path.join(ROOT, "backward")
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dst, "expected.safetensors"))
    print(len(out), "tensors,", os.path.getsize(os.path.join(dst, "expected.safetensors")), "bytes")


if __name__ == "__main__":
    main()
