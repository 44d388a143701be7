"""MEHL+'s per-tensor alpha against its models' spread, and the outputs with extreme blocks reset
(for the study of MEHL+'s extreme α under distribution shift; needs numpy and safetensors).

usage: alpha_study.py RUN_DIR OUT_DIR THRESHOLD
RUN_DIR: a soup mix output (coefficients.json, model.safetensors); the models are read from
coefficients.json. Writes OUT_DIR, a copy of the soup in which every block whose |alpha| exceeds
THRESHOLD takes the uniform soup's tensor, and prints a table of the blocks.
"""
import json, shutil, sys
from pathlib import Path
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

run, out, threshold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
coef = json.loads((run / "coefficients.json").read_text())
models, blocks, alpha = coef["models"], coef["blocks"], np.array(coef["alpha"])  # blocks x models
def load(path):
    f = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    with safe_open(str(f), "numpy") as s:
        return {k: s.get_tensor(k) for k in s.keys()}, s.metadata()
zoo = [load(m)[0] for m in models]
soup, meta = load(run)
rows = []
for l, name in enumerate(blocks):
    stack = np.stack([z[name].astype(np.float64) for z in zoo])
    mean = stack.mean(0)
    norms = [np.linalg.norm(t - mean) for t in stack]
    rel = [n / max(np.linalg.norm(mean), 1e-30) for n in norms]
    a = alpha[l]
    rows.append((name, a.min(), a.max(), int((a < 0).sum()), float(np.median(norms)),
                 float(np.median(rel)), float(min(rel)), mean.size))
rows.sort(key=lambda r: -max(abs(r[1]), abs(r[2])))
# median norm: the median over models of ||theta_i - mean||, the norm of a unit direction's
# denominator (MEHL's center is a soup near the mean); rel: that norm over ||mean||.
print(f"{'block':<58} {'alpha min':>10} {'alpha max':>10} {'neg':>4} {'median norm':>11} {'median rel':>11} {'min rel':>9} {'size':>8}")
for r in rows:
    print(f"{r[0]:<58} {r[1]:>10.3f} {r[2]:>10.3f} {r[3]:>4} {r[4]:>11.2e} {r[5]:>11.2e} {r[6]:>9.2e} {r[7]:>8}")
import statistics
big = [r for r in rows if max(abs(r[1]), abs(r[2])) > threshold]
small = [r for r in rows if max(abs(r[1]), abs(r[2])) <= threshold]
for label, group in [(f"|alpha| > {threshold}", big), (f"|alpha| <= {threshold}", small)]:
    if group:
        print(f"{label}: {len(group)} blocks, median direction norm {statistics.median(r[4] for r in group):.2e}, "
              f"median size {statistics.median(r[7] for r in group):.0f}")
extreme = [l for l, name in enumerate(blocks) if np.abs(alpha[l]).max() > threshold]
total = sum(zoo[0][blocks[l]].size for l in range(len(blocks)))
print(f"\n{len(extreme)} of {len(blocks)} blocks have |alpha| > {threshold}: {sum(zoo[0][blocks[l]].size for l in extreme)} of {total} parameters")
shutil.copytree(run, out, dirs_exist_ok=True)
new = dict(soup)
for l in extreme:
    name = blocks[l]
    new[name] = np.mean([z[name].astype(np.float64) for z in zoo], axis=0).astype(soup[name].dtype)
save_file(new, str(out / "model.safetensors"), metadata=meta)
