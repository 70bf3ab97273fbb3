#!/usr/bin/env bash
# Binary ResNet18 (1W32A) on Tiny-ImageNet (200 classes, 64x64 images, the stem strided by 2),
# trained with VISPA: the authors' recipe for five seeds, one run per GPU slot, then a table
# of the results (mean ± std over the seeds; published: 58.98 ± 0.28). The authors' own
# script runs seed 512 alone: SEEDS=512 to compare with that run.
#
#   bash download_data.sh tiny-imagenet             # once: ./datasets/tiny-imagenet-200
#   bash benchmark/Benchmark_tiny_imagenet_resnet18_1w32a.sh                   # GPUs 0-4, one seed each
#   GPUS="0 0 0 0 0" bash benchmark/Benchmark_tiny_imagenet_resnet18_1w32a.sh  # all five seeds at once on GPU 0
#
# The images are decoded once and cached beside the dataset (1.2 GB for the training set),
# then kept on the GPU and augmented there (RandomResizedCrop(64) + flip). Logs:
# $RESULTS_DIR/<run name>.txt, checkpoints in $RESULTS_DIR/<run name>/ (resnet18_1w32a_tiny-imagenet_seed=2020_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500).
# Runs that have a checkpoint are resumed and finished ones are skipped.
set -euo pipefail

# ---- the recipe (config.py holds it; these are its values); each setting can be overridden by
# ---- an environment variable of the same name
export RECIPE=resnet18_1w32a_tiny-imagenet
export K=${K:-8}                          # rank of the covariance factor Z
export S=${S:-100}                        # scale: r ~ N(0, I_K / S)
export L=${L:-40}                         # samples per test image
export LR=${LR:-0.1}
export WD=${WD:-5e-4}
export LR_DECAY=${LR_DECAY:-cos}          # per iteration, after a linear warm-up
export WARMUP_EPOCHS=${WARMUP_EPOCHS:-5}
export EPOCHS=${EPOCHS:-500}
export BATCH=${BATCH:-256}
export WIDTH=${WIDTH:-64}                 # 64 = the paper's network
export SEEDS=${SEEDS:-"2020 2024 1314 512 2333"}
export GPUS=${GPUS:-"0 1 2 3 4"}          # slots: CUDA device indices or "cpu"; arguments override it
export DATA_ROOT=${DATA_ROOT:-./datasets}
export RESULTS_DIR=${RESULTS_DIR:-./results}

exec python3 "$(dirname "${BASH_SOURCE[0]}")/../run_seeds.py" "$@"
