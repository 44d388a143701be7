"""Writes the class lists of ImageNet's distribution shifts that soup carries (run once; the
outputs are committed beside this script):

- synsets.tsv: ImageNet-1k's 1,000 WordNet ids in the standard class order, each with its
  WordNet lemmas (timm's imagenet_synsets.txt and imagenet_synset_to_lemma.txt);
- imagenet_a.txt, imagenet_r.txt: the 200 classes of ImageNet-A and ImageNet-R, as WordNet ids
  in class order (timm's imagenet_a_indices.txt / imagenet_r_indices.txt, which equal the
  CLASS_SUBLIST of wise-ft's and model-soups' datasets/imagenet_a.py and imagenet_r.py);
- objectnet.tsv: ObjectNet's 113 classes that ImageNet shares, one per line, its image folder
  and the WordNet ids of the ImageNet classes it stands for, from wise-ft's objectnet_metadata
  (folder_to_objectnet_label.json, objectnet_to_imagenet_1k.json,
  pytorch_to_imagenet_2012_id.json, imagenet_to_label_2012_v2), as wise-ft's get_metadata()
  reads them.

Usage: python3 make_lists.py TIMM_WHEEL WISE_FT_OBJECTNET_METADATA_DIR
(timm 1.0.15 from PyPI; mlfoundations/wise-ft at 58b7a4b, src/datasets/objectnet_metadata).
"""
import json
import sys
import zipfile
from pathlib import Path

here = Path(__file__).parent
wheel, meta = zipfile.ZipFile(sys.argv[1]), Path(sys.argv[2])


def info(name):
    return wheel.read(f"timm/data/_info/{name}").decode()


synsets = info("imagenet_synsets.txt").split()
assert len(synsets) == 1000
lemmas = dict(line.split("\t", 1) for line in info("imagenet_synset_to_lemma.txt").splitlines())
(here / "synsets.tsv").write_text("".join(f"{s}\t{lemmas[s]}\n" for s in synsets))
for shift in ["a", "r"]:
    indices = [int(i) for i in info(f"imagenet_{shift}_indices.txt").split()]
    assert len(indices) == 200
    (here / f"imagenet_{shift}.txt").write_text("".join(synsets[i] + "\n" for i in indices))

folders = {v: k for k, v in json.loads((meta / "folder_to_objectnet_label.json").read_text()).items()}
objectnet = json.loads((meta / "objectnet_to_imagenet_1k.json").read_text())
pytorch = {v: k for k, v in json.loads((meta / "pytorch_to_imagenet_2012_id.json").read_text()).items()}
with open(meta / "imagenet_to_label_2012_v2") as f:
    imagenet = {line.strip(): int(pytorch[i]) for i, line in enumerate(f)}
groups = {folders[name]: [imagenet[n] for n in names.split("; ")] for name, names in objectnet.items()}
assert len(groups) == 113
(here / "objectnet.tsv").write_text(
    "".join(f"{k}\t{','.join(synsets[i] for i in groups[k])}\n" for k in sorted(groups))
)
