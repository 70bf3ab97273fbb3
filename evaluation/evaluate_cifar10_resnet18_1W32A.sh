#!/usr/bin/env bash
# Evaluate a binary ResNet18 (1W32A) on the CIFAR-10 test set: loss, top-1 and top-5 of the
# L-sample protocol (L=40: logits averaged over 40 sampled networks) and the top-1 of
# the mean network sign(M).
#
#   bash evaluation/evaluate_cifar10_resnet18_1W32A.sh                    # seed 2020 of the benchmark script's runs
#   bash evaluation/evaluate_cifar10_resnet18_1W32A.sh path/to/model_best.pth.tar   # another file: ours, or the authors'
#
# The authors' files load in every layout their code wrote (with or without the unused
# `.sample` tensors), K read from the file; this project's checkpoints too. Loading is
# strict and reads data only (torch.load, weights_only=True).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKPOINT=${1:-$HERE/../results/resnet18_1w32a_cifar10_seed=2020_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500/model_best.pth.tar}
# ---- each setting can be overridden by an environment variable of the same name
L=${L:-40}                         # samples per test image
DATA_ROOT=${DATA_ROOT:-}           # default: where the run was trained (a checkpoint of ours), else ./datasets
GPU=${GPU:-}                       # a CUDA device index or "cpu" (default: GPU 0 if there is one)

exec python3 "$HERE/../main.py" --evaluate "$CHECKPOINT" --model resnet18 --dataset cifar10 \
    -L "$L" ${DATA_ROOT:+--data-root "$DATA_ROOT"} ${GPU:+--gpus "$GPU"}
