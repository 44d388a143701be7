"""Golden fixtures of mergekit's data-free merges, for issue [data-free].

    python -m venv venv && venv/bin/pip install mergekit==0.1.5   # transformers 5.x, torch
    venv/bin/python make_mergekit.py

What it writes under mergekit/ (a few hundred kB):
- models/odd: the same llama with a narrower MLP (a zoo that does not match).
- models/base, models/m1 … m3: tiny random `LlamaForCausalLM` models saved by transformers
  (`save_pretrained`, safetensors). m_k is the base plus a perturbation of its own, so the task
  vectors disagree in sign here and there; its own head (`tie_word_embeddings` false), RMSNorm
  weights of 16 elements (fewer than 100), and projections of 128 to 384 elements, so that a
  density of 0.3 keeps a count that rounds (0.3 × 16 = 4.8).
- configs/<name>.yml: mergekit configurations, one per method and config form, with the
  models' paths relative to configs/ (`../models/m1`); example-*.yml are two of mergekit's own
  examples (../LICENSE.mergekit, mergekit's licence) with the fixtures' paths for models, and refused/ holds a third,
  which uses `slices`.
- out/<name>/model.safetensors: what `mergekit-yaml` wrote for each (CPU, float32; mergekit's
  examples in float16). out/<name>-stable-sort/: the half-precision configurations again with torch's
  argsort made stable, since half-precision magnitudes tie and the unstable sort keeps an
  unspecified one.
- versions.json: the versions of mergekit, transformers and torch that made them.

DARE and DELLA draw their masks with torch's generator, which cannot be matched: their configs
here are at density 1 (nothing dropped), the arithmetic around the mask (soup's verify tests
check the masks' statistics and the arithmetic with a given mask).
"""
import json
import os
import shutil
import subprocess
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "mergekit")

CONFIG = LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

THREE = """models:
  - model: ../models/m1
    parameters: {m1}
  - model: ../models/m2
    parameters: {m2}
  - model: ../models/m3
    parameters: {m3}
"""

CONFIGS = {
    "linear": THREE.format(m1="{weight: 0.5}", m2="{weight: 0.3}", m3="{weight: 0.2}")
    + "merge_method: linear\ndtype: float32\n",
    "linear-raw": THREE.format(m1="{weight: 0.6}", m2="{weight: 0.6}", m3="{weight: -0.2}")
    + "merge_method: linear\nparameters:\n  normalize: false\ndtype: float32\n",
    "task-arithmetic": THREE.format(m1="{weight: 1.0}", m2="{weight: 0.5}", m3="{weight: 0.7}")
    + "merge_method: task_arithmetic\nbase_model: ../models/base\n"
    "parameters:\n  lambda: 0.6\ndtype: float32\n",
    "ties": THREE.format(m1="{weight: 1.0, density: 0.3}", m2="{weight: 0.8, density: 0.5}",
                         m3="{weight: 0.6, density: 0.7}")
    + "merge_method: ties\nbase_model: ../models/base\ndtype: float32\n",
    "ties-raw": THREE.format(m1="{weight: 1.0, density: 0.3}", m2="{weight: 1.0, density: 0.3}",
                             m3="{weight: 1.0, density: 0.3}")
    + "merge_method: ties\nbase_model: ../models/base\n"
    "parameters:\n  normalize: false\ndtype: float32\n",
    # A gradient over the layers, and a value by tensor-name filter.
    "ties-gradient": """models:
  - model: ../models/m1
    parameters:
      density: [0.2, 0.5, 0.9]
      weight:
        - filter: self_attn
          value: 0.7
        - value: 1.0
  - model: ../models/m2
    parameters:
      density: 0.5
      weight: [1.0, 0.4]
merge_method: ties
base_model: ../models/base
dtype: float32
""",
    "breadcrumbs": THREE.format(m1="{weight: 1.0, density: 0.8, gamma: 0.1}",
                                m2="{weight: 0.5, density: 0.6, gamma: 0.05}",
                                m3="{weight: 0.7, density: 0.9, gamma: 0.2}")
    + "merge_method: breadcrumbs\nbase_model: ../models/base\ndtype: float32\n",
    "breadcrumbs-ties": THREE.format(m1="{weight: 1.0, density: 0.8, gamma: 0.1}",
                                     m2="{weight: 0.5, density: 0.6, gamma: 0.05}",
                                     m3="{weight: 0.7, density: 0.9, gamma: 0.2}")
    + "merge_method: breadcrumbs_ties\nbase_model: ../models/base\ndtype: float32\n",
    "dare-linear-full": THREE.format(m1="{weight: 1.0, density: 1.0}", m2="{weight: 0.5, density: 1.0}",
                                     m3="{weight: 0.7, density: 1.0}")
    + "merge_method: dare_linear\nbase_model: ../models/base\ndtype: float32\n",
    "dare-ties-full": THREE.format(m1="{weight: 1.0, density: 1.0}", m2="{weight: 0.5, density: 1.0}",
                                   m3="{weight: 0.7, density: 1.0}")
    + "merge_method: dare_ties\nbase_model: ../models/base\ndtype: float32\n",
    "della-full": THREE.format(m1="{weight: 1.0, density: 1.0}", m2="{weight: 0.5, density: 1.0}",
                               m3="{weight: 0.7, density: 1.0}")
    + "merge_method: della\nbase_model: ../models/base\ndtype: float32\n",
    "della-linear-full": THREE.format(m1="{weight: 1.0, density: 1.0}",
                                      m2="{weight: 0.5, density: 1.0}",
                                      m3="{weight: 0.7, density: 1.0}")
    + "merge_method: della_linear\nbase_model: ../models/base\ndtype: float32\n",
    # mergekit computes in the configuration's dtype: weights and λ that are not powers of two.
    "ties-float16": THREE.format(m1="{weight: 0.8, density: 0.3}", m2="{weight: 0.6, density: 0.5}",
                                 m3="{weight: 0.35, density: 0.7}")
    + "merge_method: ties\nbase_model: ../models/base\nparameters:\n  lambda: 0.7\n"
    "dtype: float16\n",
    "task-arithmetic-bfloat16": THREE.format(m1="{weight: 0.8}", m2="{weight: 0.6}",
                                             m3="{weight: 0.35}")
    + "merge_method: task_arithmetic\nbase_model: ../models/base\nparameters:\n"
    "  lambda: 0.7\n  normalize: true\ndtype: bfloat16\n",
    "model-stock": THREE.format(m1="{}", m2="{}", m3="{}")
    + "merge_method: model_stock\nbase_model: ../models/base\ndtype: float32\n",
    "slerp": """models:
  - model: ../models/base
  - model: ../models/m1
merge_method: slerp
base_model: ../models/base
parameters:
  t:
    - filter: mlp
      value: [0.0, 0.5, 1.0]
    - value: 0.3
dtype: float32
""",
    "nuslerp": """models:
  - model: ../models/m1
    parameters: {weight: 0.3}
  - model: ../models/m2
    parameters: {weight: 0.7}
merge_method: nuslerp
dtype: float32
""",
}

# Two configurations of mergekit's own examples directory (mergekit commit a6e4028, LGPL-3.0:
# LICENSE.mergekit), as they are but for the models' names, replaced by the fixtures' paths.
EXAMPLES = {
    # examples/ties.yml
    "example-ties": """models:
  - model: ../models/m1
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ../models/m2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: ../models/m3
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ../models/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    # examples/linear.yml
    "example-linear": """models:
  - model: ../models/m1
    parameters:
      weight: 1.0
  - model: ../models/m2
    parameters:
      weight: 0.3
  - model: ../models/m3
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
}

# examples/gradient-slerp.yml: `slices`, which soup refuses by name (not run by mergekit here).
REFUSED = {
    "example-gradient-slerp": """slices:
  - sources:
      - model: ../models/base
        layer_range: [0, 3]
      - model: ../models/m1
        layer_range: [0, 3]
# or, the equivalent models: syntax:
# models:
#   - model: ../models/base
#   - model: ../models/m1
merge_method: slerp
base_model: ../models/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
}
CONFIGS.update(EXAMPLES)


def models():
    torch.manual_seed(0)
    base = LlamaForCausalLM(CONFIG)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base.save_pretrained(os.path.join(OUT, "models", "base"))
    for k in (1, 2, 3):
        m = LlamaForCausalLM(CONFIG)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        m.save_pretrained(os.path.join(OUT, "models", f"m{k}"))
    # A model whose MLP is narrower: merging it with the others must be refused.
    odd = LlamaForCausalLM(LlamaConfig(**{**CONFIG.to_dict(), "intermediate_size": 20}))
    odd.save_pretrained(os.path.join(OUT, "models", "odd"))


def stable_sort(name):
    """mergekit's merge of configs/<name>.yml with torch.argsort made stable, in
    out/<name>-stable-sort/."""
    import yaml
    import mergekit.sparsify
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    unstable = torch.argsort

    def argsort(x, dim=-1, descending=False, stable=False):
        return unstable(x, dim=dim, descending=descending, stable=True)

    mergekit.sparsify.torch.argsort = argsort
    cwd = os.getcwd()
    os.chdir(os.path.join(OUT, "configs"))
    try:
        with open(f"{name}.yml") as f:
            config = MergeConfiguration.model_validate(yaml.safe_load(f))
        out = os.path.join(OUT, "out", f"{name}-stable-sort")
        run_merge(config, out, options=MergeOptions(allow_crimes=True, copy_tokenizer=False))
    finally:
        os.chdir(cwd)
        mergekit.sparsify.torch.argsort = unstable
    for f in os.listdir(out):
        if not f.endswith(".safetensors"):
            os.remove(os.path.join(out, f))
    print(name, "stable sort", sorted(os.listdir(out)))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    models()
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    os.makedirs(os.path.join(OUT, "configs"))
    os.makedirs(os.path.join(OUT, "refused"))
    for name, text in REFUSED.items():
        with open(os.path.join(OUT, "refused", f"{name}.yml"), "w") as f:
            f.write(text)
    for name, text in CONFIGS.items():
        path = os.path.join(OUT, "configs", f"{name}.yml")
        with open(path, "w") as f:
            f.write(text)
        out = os.path.join(OUT, "out", name)
        subprocess.run([mergekit_yaml, path, out, "--no-cuda", "--allow-crimes",
                        "--no-copy-tokenizer"], check=True,
                       cwd=os.path.join(OUT, "configs"))
        # Only the weights are the fixture: mergekit's card and config are not compared.
        for f in os.listdir(out):
            if not f.endswith(".safetensors"):
                os.remove(os.path.join(out, f))
        print(name, sorted(os.listdir(out)))
    # Half-precision magnitudes tie, and torch's unstable argsort keeps an unspecified one of
    # the tied entries: the half-precision configurations again with a stable sort (ties kept
    # in index order).
    for name, text in CONFIGS.items():
        if "dtype: float16" in text or "dtype: bfloat16" in text:
            stable_sort(name)
    import mergekit.config  # noqa: F401
    from importlib.metadata import version
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump({"mergekit": version("mergekit"), "transformers": transformers.__version__,
                   "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
