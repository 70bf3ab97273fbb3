#!/usr/bin/env bash
# Binary VGG16 (1W32A) on CIFAR-100, trained with VISPA: the authors'
# recipe for five seeds, one run per GPU slot, then a table of the results (mean ± std over
# the seeds; published: 72.09 ± 0.17).
#
#   bash benchmark_cifar100_vgg16_1W32A.sh                   # GPUs 0-4, one seed each
#   bash benchmark_cifar100_vgg16_1W32A.sh 0 1               # two GPUs; the other seeds queue
#   GPUS="0 0 0 0 0" bash benchmark_cifar100_vgg16_1W32A.sh  # all five seeds at once on GPU 0
#   GPUS="cpu cpu" SEEDS="1 2" EPOCHS=2 WIDTH=8 L=2 bash benchmark_cifar100_vgg16_1W32A.sh
#
# Logs: $RESULTS_DIR/<run name>.txt (the last line is the best accuracy), checkpoints in
# $RESULTS_DIR/<run name>/. Runs are named after the recipe and their settings
# (vgg16_1w32a_cifar100_seed=2020_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500; a width, batch or warm-up other than the recipe's is added at the end). Runs
# that have a checkpoint are resumed and finished ones are skipped, so after an
# interruption the same command carries on.
set -euo pipefail

# ---- the recipe (config.py holds it; these are its values); each setting can be overridden by
# ---- an environment variable of the same name
export RECIPE=vgg16_1w32a_cifar100
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

exec python3 "$(dirname "${BASH_SOURCE[0]}")/./run_seeds.py" "$@"
