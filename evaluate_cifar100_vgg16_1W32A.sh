#!/usr/bin/env bash
# Evaluate a binary VGG16 (1W32A) on the CIFAR-100 test set: loss, top-1 and top-5
# of the L-sample protocol (L=40: logits averaged over 40 sampled networks) and the top-1
# of the mean network sign(M).
#
#   bash evaluate_cifar100_vgg16_1W32A.sh                      # the authors' released checkpoint
#   bash evaluate_cifar100_vgg16_1W32A.sh results/<run>/model_best.pth.tar   # one of this project's
#
# The authors' files load in every layout their code wrote (with or without the unused
# `.sample` tensors; VGG16 also without Z), K read from the file; this project's
# checkpoints too. Loading is strict and reads data only (torch.load, weights_only=True).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKPOINT=${1:-$HERE/pretrained/vgg16_1w32A_model_best.pth.tar}
# ---- each setting can be overridden by an environment variable of the same name
L=${L:-40}                         # samples per test image
DATA_ROOT=${DATA_ROOT:-}           # default: where the run was trained (a checkpoint of ours), else ./datasets
GPU=${GPU:-}                       # a CUDA device index or "cpu" (default: GPU 0 if there is one)

if [[ ! -f $CHECKPOINT ]]; then
    echo "error: $CHECKPOINT not found. The released checkpoints come with the authors' release of the paper's code: put resnet18_1w32A_model_best.pth.tar and vgg16_1w32A_model_best.pth.tar in $HERE/pretrained/ (or give a checkpoint's path as the argument)" >&2
    exit 1
fi
exec python3 "$HERE/main.py" --evaluate "$CHECKPOINT" --model vgg16 --dataset cifar100 \
    -L "$L" ${DATA_ROOT:+--data-root "$DATA_ROOT"} ${GPU:+--gpus "$GPU"}
