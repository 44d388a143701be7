"""The language-model step of `soup-models/examples/lm_step_bench.rs` in PyTorch, for side-by-side
benchmarks: transformers' LlamaForCausalLM at SmolLM2-135M's shape (30 layers, width 576, 9 heads
over 3 key/value heads, vocabulary 49,152, tied embeddings), randomly initialised, the mean
next-token cross-entropy of random tokens, autograd, an in-place SGD update.

    python bench/lm_torch.py --batch 4 --seq 256 --rounds 3 [--threads 2]

prints one JSON line per phase (forward, backward, step) with every timed round and the median,
then the peak RSS, in the format of `lm_step_bench`. Used by `cargo xtask bench --torch --only
lm`; never part of CI.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).float().train()
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 49152, (a.batch, a.seq), generator=g)
    times = {"forward": [], "backward": [], "step": []}
    for r in range(a.rounds + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad, alpha=1e-6)
                p.grad = None
        t3 = time.perf_counter()
        if r > 0:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["step"].append(t3 - t0)
    n = sum(p.numel() for p in params)
    for phase, v in times.items():
        print(json.dumps({"bench": "lm-step", "params": n, "batch": a.batch, "seq": a.seq,
                          "threads": torch.get_num_threads(), "phase": phase,
                          "seconds": [round(s, 4) for s in v],
                          "median_s": statistics.median(v)}))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bench": "lm-step", "peak_rss_bytes": rss}))


if __name__ == "__main__":
    main()
