"""Makes the class-name golden fixture of soup-models/tests/golden/labels/ with transformers, once;
CI compares soup against it without Python (soup-models/tests/classes.rs). Run by hand:

    python3 -m venv venv && venv/bin/pip install transformers==5.24.0   # no torch needed
    venv/bin/python make_labels.py              # writes hf-named/config.json
    venv/bin/python make_labels.py check DIR    # a soup model directory with class names

What it writes: hf-named/config.json, the configuration transformers' `save_pretrained` writes for
the tiny DINOv2 classifier of ../dinov2/hf-dinov2 (5 classes) with the names in NAMES as its
`id2label`. The test pairs it with that fixture's weights: soup must read the names back, and
write `id2label` and `label2id` exactly as transformers does.

`check DIR` loads DIR's config.json (written by soup) with transformers' AutoConfig and prints
the names transformers sees; it fails unless they are DIR's class names in order.
"""
import json
import sys
from pathlib import Path

from transformers import AutoConfig, Dinov2Config

HERE = Path(__file__).resolve().parent
# Names with spaces, punctuation, a digit string and non-ASCII text: what a folder can be named.
NAMES = ["T-shirt/top", "Ankle boot", "10", "café crème", "n01440764"]


def make():
    base = json.loads((HERE.parent / "dinov2" / "hf-dinov2" / "config.json").read_text())
    keep = ["hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size",
            "image_size", "num_channels", "layerscale_value", "layer_norm_eps", "hidden_act",
            "qkv_bias", "use_mask_token"]
    config = Dinov2Config(
        **{k: base[k] for k in keep},
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
        architectures=["Dinov2ForImageClassification"],
    )
    out = HERE / "hf-named"
    config.save_pretrained(out)
    print(f"wrote {out / 'config.json'}")


def check(directory):
    config = AutoConfig.from_pretrained(directory)
    names = [config.id2label[i] for i in range(config.num_labels)]
    print(f"transformers {config.model_type}: {config.num_labels} labels: {names}")
    assert config.label2id == {n: i for i, n in enumerate(names)}, config.label2id
    return names


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        check(sys.argv[2])
    else:
        make()
