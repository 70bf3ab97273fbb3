#!/usr/bin/env bash
# AlexNet 1W1A (binary weights and activations) on ImageNet, trained with VISPA as the authors train it: 4 GPUs under torchrun, 256
# images per GPU, the lr scaled by 256 x 4 / 256 = 4 (peak 2), one run (published: 51.1).
#
#   DATA_ROOT=~/data/imagenet bash benchmark/Benchmark_imagenet_alexnet1w1a.sh           # GPUs 0-3
#   GPUS="0 1 2 3 4 5 6 7" SEEDS="2020 2024" bash benchmark/Benchmark_imagenet_alexnet1w1a.sh  # two runs at once
#   LOADER=dali-gpu bash benchmark/Benchmark_imagenet_alexnet1w1a.sh                      # NVIDIA DALI decoding on the GPU
#
# ImageNet is read from {DATA_ROOT}/train/<wnid>/*.JPEG and {DATA_ROOT}/val/<wnid>/*.JPEG (the
# README says how to lay it out). Logs: $RESULTS_DIR/<run name>.txt, checkpoints in
# $RESULTS_DIR/<run name>/ (alexnet_1w1a_imagenet_seed=2020_benchmark_K=2_S=100_L=40_wd=1e-5_lr=0.5_cos_epochs=100). A run that has a checkpoint is resumed.
set -euo pipefail

# The recipe (config.py holds every value of it). Any of its settings can be changed by an
# environment variable: K S L LR WD LR_DECAY WARMUP_EPOCHS EPOCHS BATCH WIDTH LOADER WORKERS,
# and the runner's SEEDS (default: 2020 2024 1314 512 2333), GPUS (default: "0 1 2 3 4"), NPROC,
# DATA_ROOT (default: ./datasets; ImageNet ./datasets/imagenet) and RESULTS_DIR (default: ./results);
# run_seeds.py describes them.
export RECIPE=alexnet_1w1a_imagenet
# What this script changes: one run (seed 2020) on 4 GPUs under torchrun, as the authors run it
export NPROC=${NPROC:-4}
export GPUS=${GPUS:-"0 1 2 3"}
export SEEDS=${SEEDS:-2020}

exec python3 "$(dirname "${BASH_SOURCE[0]}")/../run_seeds.py" "$@"
