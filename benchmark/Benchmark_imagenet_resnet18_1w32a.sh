#!/usr/bin/env bash
# ResNet18 1W32A on ImageNet, trained with VISPA as the authors train it: 4 GPUs under torchrun, 256
# images per GPU, the lr scaled by 256 x 4 / 256 = 4 (peak 0.4), one run (published: 68.2).
#
#   DATA_ROOT=~/data/imagenet bash benchmark/Benchmark_imagenet_resnet18_1w32a.sh           # GPUs 0-3
#   GPUS="0 1 2 3 4 5 6 7" SEEDS="2020 2024" bash benchmark/Benchmark_imagenet_resnet18_1w32a.sh  # two runs at once
#   LOADER=dali-gpu bash benchmark/Benchmark_imagenet_resnet18_1w32a.sh                      # NVIDIA DALI decoding on the GPU
#
# ImageNet is read from {DATA_ROOT}/train/<wnid>/*.JPEG and {DATA_ROOT}/val/<wnid>/*.JPEG (the
# README says how to lay it out). Logs: $RESULTS_DIR/<run name>.txt, checkpoints in
# $RESULTS_DIR/<run name>/ (resnet18_1w32a_imagenet_seed=2020_benchmark_K=4_S=100_L=40_wd=5e-5_lr=0.1_cos_epochs=200). A run that has a checkpoint is resumed.
set -euo pipefail

# The recipe (config.py holds every value of it). Any of its settings can be changed by an
# environment variable: K S L LR WD LR_DECAY WARMUP_EPOCHS EPOCHS BATCH WIDTH LOADER WORKERS,
# and the runner's SEEDS (default: 2020 2024 1314 512 2333), GPUS (default: "0 1 2 3 4"), NPROC,
# DATA_ROOT (default: ./datasets; ImageNet ./datasets/imagenet) and RESULTS_DIR (default: ./results);
# run_seeds.py describes them.
export RECIPE=resnet18_1w32a_imagenet
# What this script changes: one run (seed 2020) on 4 GPUs under torchrun, as the authors run it
export NPROC=${NPROC:-4}
export GPUS=${GPUS:-"0 1 2 3"}
export SEEDS=${SEEDS:-2020}

exec python3 "$(dirname "${BASH_SOURCE[0]}")/../run_seeds.py" "$@"
