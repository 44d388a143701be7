"""Makes the Llama golden fixtures of soup-models/tests/golden/llama/ with transformers, once; CI
compares soup against them without Python (soup-models/tests/llama.rs). Run by hand:

    python3 -m venv venv && venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        numpy==2.4.6 safetensors==0.8.0
    venv/bin/python make_llama.py
    venv/bin/python make_llama.py check-soup OUT TEXT...   # a language-model soup in transformers

What it writes (a few hundred kB), three tiny random causal language models saved by
`save_pretrained` (every parameter perturbed, so that no RMSNorm weight is 1 and no bias 0):
- gqa/: `LlamaForCausalLM`, 4 query heads over 2 key/value heads, tied embeddings, rope_theta
  100,000, rms_norm_eps 1e-5;
- biases/: `LlamaForCausalLM` with `attention_bias` and `mlp_bias`, a head of its own, 2 heads over
  1 key/value head of width 12 (`head_dim` given, not hidden / heads);
- qwen2/: `Qwen2ForCausalLM` (biases on q, k and v only), tied embeddings;
and expected.safetensors: for each, `<name>.tokens` (3 × 9 ids, int64), `<name>.logits`
(transformers' logits, 3 × 9 × vocabulary) and `<name>.loss` (its mean next-token cross-entropy
with labels = the ids).
"""
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "llama")

MODELS = {
    "gqa": (LlamaForCausalLM, LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=64, tie_word_embeddings=True)),
    "biases": (LlamaForCausalLM, LlamaConfig(
        vocab_size=47, hidden_size=20, intermediate_size=28, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=12, attention_bias=True,
        mlp_bias=True, max_position_embeddings=64, tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1000000.0, tie_word_embeddings=True)),
}


def main():
    print("transformers", transformers.__version__, "torch", torch.__version__)
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    for i, (name, (cls, config)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = cls(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(os.path.join(OUT, name), safe_serialization=True)
        g = torch.Generator().manual_seed(100 + i)
        tokens = torch.randint(0, config.vocab_size, (3, 9), generator=g)
        with torch.no_grad():
            out = model(input_ids=tokens, labels=tokens)
        expected[f"{name}.tokens"] = tokens
        expected[f"{name}.logits"] = out.logits.float().contiguous()
        expected[f"{name}.loss"] = out.loss.float().reshape(1)
        print(name, "loss", out.loss.item(), "max |logit|", out.logits.abs().max().item())
    save_file(expected, os.path.join(OUT, "expected.safetensors"))


def check_soup(out, texts):
    """Loads a language-model directory written by `soup mix` (or any soup command) with
    AutoModelForCausalLM and AutoTokenizer, as a user would: no missing or unexpected keys; prints
    the mean next-token loss of each text, to compare with `soup eval` on the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, bad
    model.eval()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        print(f"{type(model).__name__} {len(ids[0])} tokens {ids[0].tolist()}: loss {loss:.6f}")


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 2 and sys.argv[1] == "check-soup":
        check_soup(sys.argv[2], sys.argv[3:])
    else:
        main()
