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

# ---- the recipe (config.py holds it; these are its values); each setting can be overridden by
# ---- an environment variable of the same name
export RECIPE=alexnet_1w1a_imagenet
export K=${K:-2}                          # rank of the covariance factor Z
export S=${S:-100}                        # scale: r ~ N(0, I_K / S)
export L=${L:-40}                         # samples per test image
export LR=${LR:-0.5}                      # before the scaling by batch x ranks / 256
export WD=${WD:-1e-5}
export LR_DECAY=${LR_DECAY:-cos}          # per iteration, after a linear warm-up
export WARMUP_EPOCHS=${WARMUP_EPOCHS:-5}
export EPOCHS=${EPOCHS:-100}
export BATCH=${BATCH:-256}                  # per GPU
export WIDTH=${WIDTH:-96}                  # 96 = the paper's network
export LOADER=${LOADER:-torchvision}          # torchvision, dali-gpu or dali-cpu (the authors': dali-cpu)
export WORKERS=${WORKERS:-8}                 # loader processes (DALI threads) per GPU
export SEEDS=${SEEDS:-2020}
export NPROC=${NPROC:-4}                   # GPUs per run (torchrun ranks)
export GPUS=${GPUS:-"0 1 2 3"}            # slots: CUDA device indices ("cpu": ranks on the CPU)
export DATA_ROOT=${DATA_ROOT:-./datasets/imagenet}
export RESULTS_DIR=${RESULTS_DIR:-./results}

exec python3 "$(dirname "${BASH_SOURCE[0]}")/../run_seeds.py" "$@"
