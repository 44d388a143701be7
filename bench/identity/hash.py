"""sha256 of every file under a directory, for bench/identity/run.sh: report.json without its
timing and RSS keys, report.md without its RSS line (they differ between runs)."""
import hashlib, json, os, sys
root = sys.argv[1]
TIMING = ("timing", "seconds", "time", "rss", "elapsed", "duration", "rate", "wall", "when", "date", "peak")
def clean(v):
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items() if not any(t in k.lower() for t in TIMING)}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v
for dp, dn, fn in sorted(os.walk(root)):
    dn.sort()
    for f in sorted(fn):
        p = os.path.join(dp, f)
        b = open(p, 'rb').read()
        if f == 'report.md':
            b = b'\n'.join(l for l in b.split(b'\n') if not l.startswith(b'Peak RSS'))
        if f.endswith('.json'):
            try:
                b = json.dumps(clean(json.loads(b)), sort_keys=True).encode()
            except Exception:
                pass
        print(hashlib.sha256(b).hexdigest()[:16], os.path.relpath(p, root))
