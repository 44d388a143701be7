"""Makes the golden fixtures of soup-models/tests/golden/ecosystem/ with the real libraries, once;
CI compares soup against them without Python (soup-models/tests/ecosystem.rs,
soup-cli/tests/interop.rs). Run by hand:

    python3 -m venv venv && venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        open_clip_torch==3.3.0 pillow==13.0.0 numpy==2.4.6 safetensors==0.8.0
    venv/bin/python make_ecosystem.py            # writes ecosystem/
    venv/bin/python make_ecosystem.py check OUT MEMBER...  # a uniform soup OUT in transformers
    venv/bin/python make_ecosystem.py check-standin model_0.pt  # a `cargo xtask standin zoo` file

What it writes (tiny random models, seeded; a few hundred kB in all):
- hf-clipmodel/: a full `CLIPModel` (text tower included) with a `classification_head`, saved by
  `save_pretrained` (transformers 5.x writes the whole vision config with its default
  `projection_dim` 512; the model's is the top-level 24).
- hf-vision/: the same vision tower + head as `CLIPVisionModelWithProjection`; variants
  hf-vision-sharded/ (model.safetensors.index.json), hf-vision-bin/ (pytorch_model.bin),
  hf-vision-fp16/, hf-vision-bf16/.
- openai-64.pt, openai-48h12.pt: model-soups-style state dicts (`model.*` = an open_clip CLIP with
  QuickGELU, text tower included, plus `classification_head.*`), storages tagged `cuda:0` as a
  GPU-side save is. openai-64.pt has heads of width 64 (OpenAI's rule); openai-48h12.pt has 4 heads
  of width 12, which no rule can infer from the tensors.
- images/: PNG and JPEG images of odd sizes (RGB, grey, 4:2:0 and 4:4:4 JPEG).
- expected.safetensors: what the libraries compute: per image the Pillow-decoded pixels
  (`decoded.NAME`), the 32 px inputs of OpenAI's `preprocess` (torchvision `Resize(32, BICUBIC)` +
  `CenterCrop(32)` on PIL images, `openai.NAME`, u8) and of transformers' `CLIPImageProcessorPil`
  (`hf.NAME`, u8 before rescaling; `hf_pixel_values`, normalised, images in sorted order); the
  features and logits of every model on `hf_pixel_values`.
"""
import io
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import open_clip
import torch
import torchvision.transforms as T
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ecosystem")
SIDE = 32
CLASSES = 5


def vision_kwargs():
    return dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                image_size=SIDE, patch_size=8, hidden_act="quick_gelu")


class Head:
    """model-soups' classifier: a linear head on L2-normalised projected image features."""

    def add_head(self, config):
        self.classification_head = torch.nn.Linear(config.projection_dim, CLASSES)

    def logits(self, pixel_values):
        f = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return f, self.classification_head(f / f.norm(dim=-1, keepdim=True))


class ClipWithHead(Head, CLIPModel):
    """A full CLIPModel fine-tuned as model-soups does."""

    def __init__(self, config):
        super().__init__(config)
        self.add_head(config)


class VisionWithHead(Head, CLIPVisionModelWithProjection):
    def __init__(self, config):
        super().__init__(config)
        self.add_head(config)


def make_images(d):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(7)

    def photo(h, w, c):
        y, x = np.mgrid[0:h, 0:w]
        base = [128 + 100 * np.sin(x / (3 + k) + y / (5 + 2 * k) + k) for k in range(c)]
        img = np.stack(base, -1) + rng.normal(0, 25, (h, w, c))
        return np.clip(img, 0, 255).astype(np.uint8)

    # Sizes: down- and up-sampling, both orientations, a long side of 32 + 3 (OpenAI's centre crop
    # rounds 1.5 to 2, transformers' floors it to 1), an exact fit.
    specs = [("rgb-37x53.png", 53, 37, 3), ("grey-61x29.png", 29, 61, 1),
             ("rgb-100x41.png", 41, 100, 3), ("rgb-20x27.png", 27, 20, 3),
             ("rgb-32x35.png", 35, 32, 3), ("rgb-32x32.png", 32, 32, 3),
             ("rgb-419x95.png", 95, 419, 3)]
    for name, h, w, c in specs:
        a = photo(h, w, c)
        Image.fromarray(a[..., 0] if c == 1 else a).save(os.path.join(d, name))
    for name, h, w, c, sub in [("rgb420-73x50.jpg", 50, 73, 3, 2), ("rgb444-45x66.jpg", 66, 45, 3, 0),
                               ("grey-39x58.jpg", 58, 39, 1, 0)]:
        a = photo(h, w, c)
        Image.fromarray(a[..., 0] if c == 1 else a).save(os.path.join(d, name), quality=90,
                                                          subsampling=sub)
    return sorted(os.listdir(d))


def tag_cuda(path):
    """Rewrites the storage locations of a torch.save archive from 'cpu' to 'cuda:0'."""
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i.filename)) for i in z.infolist()]
    old, new = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            z.writestr(info, data)


def openai_pt(path, width, head_width, seed):
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=width, head_width=head_width, mlp_ratio=2.0,
                                           patch_size=8, image_size=SIDE)
    text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = open_clip.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    head = torch.nn.Linear(24, CLASSES)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"classification_head.{k}": v for k, v in head.state_dict().items()})
    torch.save(state, path)
    tag_cuda(path)

    def logits(x):
        f = model.encode_image(x)
        return f, head(f / f.norm(dim=-1, keepdim=True))
    return logits


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    torch.manual_seed(0)
    expected = {}

    names = make_images(os.path.join(OUT, "images"))
    openai_tf = T.Compose([T.Resize(SIDE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIDE)])
    hf_proc = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    hf_raw = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                   do_rescale=False, do_normalize=False)
    pixel_values = []
    for n in names:
        img = Image.open(os.path.join(OUT, "images", n))
        rgb = img.convert("RGB")
        expected[f"decoded.{n}"] = torch.from_numpy(np.array(rgb)).contiguous()
        expected[f"openai.{n}"] = torch.from_numpy(np.array(openai_tf(img).convert("RGB"))).contiguous()
        raw = hf_raw(images=rgb, return_tensors="np")["pixel_values"][0]  # 3 × H × W, 0..255
        expected[f"hf.{n}"] = torch.from_numpy(np.round(raw).astype(np.uint8).transpose(1, 2, 0)).contiguous()
        pixel_values.append(hf_proc(images=rgb, return_tensors="pt")["pixel_values"][0])
    pixel_values = torch.stack(pixel_values)
    expected["hf_pixel_values"] = pixel_values.contiguous()

    # A full CLIPModel + head, as transformers saves it.
    config = CLIPConfig(vision_config=vision_kwargs(),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8),
                        projection_dim=24)
    full = ClipWithHead(config).eval()
    full.save_pretrained(os.path.join(OUT, "hf-clipmodel"))
    with torch.no_grad():
        f, l = full.logits(pixel_values)
    expected["hf-clipmodel.features"], expected["hf-clipmodel.logits"] = f, l

    # CLIPVisionModelWithProjection + head, and its variants.
    vconfig = CLIPVisionConfig(projection_dim=24, **vision_kwargs())
    vision = VisionWithHead(vconfig).eval()
    vision.save_pretrained(os.path.join(OUT, "hf-vision"))
    with torch.no_grad():
        f, l = vision.logits(pixel_values)
    expected["hf-vision.features"], expected["hf-vision.logits"] = f, l
    vision.save_pretrained(os.path.join(OUT, "hf-vision-sharded"), max_shard_size="60KB")
    bin_dir = os.path.join(OUT, "hf-vision-bin")
    os.makedirs(bin_dir)
    torch.save(vision.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    vconfig.save_pretrained(bin_dir)
    for dtype, name in [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]:
        half = VisionWithHead(vconfig).eval()
        half.load_state_dict(vision.state_dict())
        half.to(dtype).save_pretrained(os.path.join(OUT, f"hf-vision-{name}"))
        with torch.no_grad():
            f, l = half.to(torch.float32).logits(pixel_values)  # the rounded weights, in f32
        expected[f"hf-vision-{name}.features"], expected[f"hf-vision-{name}.logits"] = f, l

    # model-soups-style OpenAI .pt files from open_clip.
    for name, width, head_width, seed in [("openai-64", 64, 64, 1), ("openai-48h12", 48, 12, 2)]:
        logits = openai_pt(os.path.join(OUT, f"{name}.pt"), width, head_width, seed)
        with torch.no_grad():
            f, l = logits(pixel_values)
        expected[f"{name}.features"], expected[f"{name}.logits"] = f, l

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "open_clip": open_clip.__version__, "pillow": Image.__version__, "numpy": np.__version__}
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"),
              metadata={"versions": json.dumps(versions, sort_keys=True), "images": json.dumps(names)})
    print("wrote", OUT, versions)


def check(out, members):
    """Loads a soup output directory as transformers' users would and compares its logits on the
    golden pixel values with those of PyTorch's own average of the member directories (a uniform
    soup of them): `make_ecosystem.py check OUT MEMBER_DIR...`."""
    from safetensors.torch import load_file
    model = VisionWithHead.from_pretrained(out).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    pil = CLIPImageProcessorPil.from_pretrained(out)
    print(type(proc).__name__, type(pil).__name__, pil.size, pil.crop_size, pil.resample)
    px = load_file(os.path.join(OUT, "expected.safetensors"))["hf_pixel_values"]
    weights = [load_file(os.path.join(m, "model.safetensors")) for m in members]
    mean = {k: sum(w[k].float() for w in weights) / len(weights) for k in weights[0]}
    ref = VisionWithHead(model.config).eval()
    ref.load_state_dict(mean, strict=False)
    with torch.no_grad():
        diff = (model.logits(px)[1] - ref.logits(px)[1]).abs().max().item()
    print("max |logits(from_pretrained(OUT)) - logits(PyTorch average)|:", diff)


def check_standin(path):
    """Loads a stand-in checkpoint of `cargo xtask standin zoo` (no `--config`) as model-soups
    loads its own: `model.*` into OpenAI's ViT-B/32 (open_clip's `ViT-B-32-quickgelu`) with only
    the deleted text transformer missing, `classification_head.*` into a Linear(512, 1000):
    `make_ecosystem.py check-standin model_0.pt`."""
    sd = torch.load(path, weights_only=True, map_location="cpu")
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    inner = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(inner, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("transformer.") for k in missing), missing
    head = torch.nn.Linear(512, 1000)
    head.load_state_dict({"weight": sd["classification_head.weight"], "bias": sd["classification_head.bias"]})
    print(f"{path}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters; "
          f"{len(missing)} text-transformer tensors missing (deleted by ModelWrapper), nothing unexpected")


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 3 and sys.argv[1] == "check-standin":
        check_standin(sys.argv[2])
    else:
        main()
