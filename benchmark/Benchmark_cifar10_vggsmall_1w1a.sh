#!/usr/bin/env bash
# Fully binary VGG-Small (1W1A: binary weights and activations) on CIFAR-10, trained with VISPA: the authors'
# recipe for five seeds, one run per GPU slot, then a table of the results (mean ± std over
# the seeds; published: 92.7 ± 0.1). The authors' own script runs seed 2020 alone (the
# five seeds commented out): SEEDS=2020 to compare with that run.
#
#   bash benchmark/Benchmark_cifar10_vggsmall_1w1a.sh                   # GPUs 0-4, one seed each
#   bash benchmark/Benchmark_cifar10_vggsmall_1w1a.sh 0 1               # two GPUs; the other seeds queue
#   GPUS="0 0 0 0 0" bash benchmark/Benchmark_cifar10_vggsmall_1w1a.sh  # all five seeds at once on GPU 0
#   GPUS="cpu cpu" SEEDS="1 2" EPOCHS=2 WIDTH=8 L=2 bash benchmark/Benchmark_cifar10_vggsmall_1w1a.sh
#
# Logs: $RESULTS_DIR/<run name>.txt (the last line is the best accuracy), checkpoints in
# $RESULTS_DIR/<run name>/. Runs are named after the recipe and their settings
# (vgg_small_1w1a_cifar10_seed=2020_benchmark_K=4_S=100_L=40_wd=1e-5_lr=0.5_cos_epochs=600; a width, batch or warm-up other than the recipe's is added at the end). Runs
# that have a checkpoint are resumed and finished ones are skipped, so after an
# interruption the same command carries on.
set -euo pipefail

# ---- the recipe (config.py holds it; these are its values); each setting can be overridden by
# ---- an environment variable of the same name
export RECIPE=vgg_small_1w1a_cifar10
export K=${K:-4}                          # rank of the covariance factor Z
export S=${S:-100}                        # scale: r ~ N(0, I_K / S)
export L=${L:-40}                         # samples per test image
export LR=${LR:-0.5}
export WD=${WD:-1e-5}
export LR_DECAY=${LR_DECAY:-cos}          # per iteration, after a linear warm-up
export WARMUP_EPOCHS=${WARMUP_EPOCHS:-5}
export EPOCHS=${EPOCHS:-600}
export BATCH=${BATCH:-256}
export WIDTH=${WIDTH:-128}                 # 128 = the paper's network
export SEEDS=${SEEDS:-"2020 2024 1314 512 2333"}
export GPUS=${GPUS:-"0 1 2 3 4"}          # slots: CUDA device indices or "cpu"; arguments override it
export DATA_ROOT=${DATA_ROOT:-./datasets}
export RESULTS_DIR=${RESULTS_DIR:-./results}

exec python3 "$(dirname "${BASH_SOURCE[0]}")/../run_seeds.py" "$@"
