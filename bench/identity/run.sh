#!/usr/bin/env bash
# Byte-identity check of a refactor: `train`, `finetune` and `mix` with every method, for a tiny
# CLIP and a tiny DINOv2 on Fashion-MNIST, run by one `soup` binary into OUT_DIR (resumable: what
# exists is kept). Run it with the binary before and after a change, then compare:
#   bench/identity/run.sh OLD_SOUP old && bench/identity/run.sh NEW_SOUP new
#   python3 bench/identity/hash.py old > old.sha && python3 bench/identity/hash.py new > new.sha
#   diff old.sha new.sha    # empty: every output the same bytes, timings and RSS aside
# usage: run.sh SOUP_BIN OUT_DIR
set -euo pipefail
SOUP=$1; OUT=$2
DATA=/usr/share/datasets/fashion-mnist
mkdir -p "$OUT"; cd "$OUT"
echo '{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 1, "image_size": 28, "patch_size": 7, "projection_dim": 16}' > clip.json
echo '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2, "num_channels": 1, "image_size": 28, "patch_size": 7}' > dino.json
printf 'lr = [3e-4, 3e-3]\nepochs = [1, 1]\nbatch_size = 32\n' > search.toml
for arch in clip-vit dinov2-vit; do
  cfg=clip.json; [ $arch = dinov2-vit ] && cfg=dino.json
  d=$arch; mkdir -p $d
  [ -e $d/base.safetensors ] || $SOUP train --arch $arch --config $cfg --data $DATA --max-examples 300 --epochs 1 --lr 3e-3 --out $d/base.safetensors >/dev/null
  [ -e $d/zoo ] || $SOUP finetune --base $d/base.safetensors --data $DATA --max-examples 300 --count 3 --search search.toml --out $d/zoo >/dev/null
  for m in uniform greedy learned learned+ mehl mehl+; do
    [ -e $d/mix-$m ] || $SOUP mix --method $m --zoo $d/zoo --data $DATA --max-examples 300 --out $d/mix-$m --model-batch 2 --inner-epochs 1 --batch-size 100 >/dev/null
  done
  printf '[[model]]\npath = "zoo/model-00"\n\n[[model]]\npath = "zoo/model-01"\n' > $d/tasks.toml
  for m in task-arithmetic ties adamerging adamerging+; do
    [ -e $d/mt-$m ] || $SOUP mix --method $m --base $d/base.safetensors --zoo $d/tasks.toml --data $DATA,$DATA --max-examples 200 --out $d/mt-$m --inner-epochs 1 --batch-size 50 --model-batch 1 >/dev/null
  done
done
