#!/usr/bin/env bash
# Evaluate "BiRealNet" (the authors' resnet18_1w1a_recu, 1W1A) on the ImageNet validation set (50,000 images): loss, top-1 and top-5
# of the L-sample protocol (L=40: logits averaged over 40 sampled networks) and the top-1 of
# the mean network sign(M), on one GPU or on NPROC under torchrun (the ranks share the
# validation set; every image counts once).
#
#   DATA_ROOT=~/data/imagenet bash evaluation/evaluate_imagenet_birealnet_1W1A.sh            # seed 2020 of the benchmark's run
#   NPROC=4 bash evaluation/evaluate_imagenet_birealnet_1W1A.sh path/to/model_best.pth.tar   # another file, on 4 GPUs
#
# The authors' files load in every layout their code wrote (with or without the unused
# `.sample` tensors), K read from the file; this project's checkpoints too. Loading is
# strict and reads data only (torch.load, weights_only=True).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKPOINT=${1:-$HERE/../results/birealnet18_1w1a_imagenet_seed=2020_benchmark_K=2_S=100_L=40_wd=1e-5_lr=0.5_cos_epochs=200/model_best.pth.tar}
# ---- each setting can be overridden by an environment variable of the same name
L=${L:-40}                         # samples per test image
DATA_ROOT=${DATA_ROOT:-}           # default: where the run was trained (a checkpoint of ours), else ./datasets/imagenet
GPU=${GPU:-}                       # one process: a CUDA device index or "cpu" (default: GPU 0)
NPROC=${NPROC:-1}                  # processes (GPUs) under torchrun
LOADER=${LOADER:-torchvision}      # torchvision, dali-gpu or dali-cpu

ARGS=(--evaluate "$CHECKPOINT" --model birealnet18 --dataset imagenet -L "$L"
      --loader "$LOADER" --eval-batch-size 256 ${DATA_ROOT:+--data-root "$DATA_ROOT"})
if (( NPROC > 1 )); then
    exec python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$HERE/../main.py" "${ARGS[@]}" \
        ${GPU:+--gpus "$GPU"}
fi
exec python3 "$HERE/../main.py" "${ARGS[@]}" ${GPU:+--gpus "$GPU"}
