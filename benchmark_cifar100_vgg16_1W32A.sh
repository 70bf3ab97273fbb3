#!/usr/bin/env bash
# Binary VGG16 (1W32A) on CIFAR-100, trained with VISPA: the authors'
# recipe for five seeds, one run per GPU slot, then a table of the results (mean ± std over
# the seeds; published: 72.09 ± 0.17).
#
#   bash benchmark_cifar100_vgg16_1W32A.sh                   # GPUs 0-4, one seed each
#   bash benchmark_cifar100_vgg16_1W32A.sh 0 1               # two GPUs; the other seeds queue
#   GPUS="0 0 0 0 0" bash benchmark_cifar100_vgg16_1W32A.sh  # all five seeds at once on GPU 0
#   GPUS="cpu cpu" SEEDS="1 2" EPOCHS=2 WARMUP_EPOCHS=1 WIDTH=8 L=2 bash benchmark_cifar100_vgg16_1W32A.sh
#
# Logs: $RESULTS_DIR/<run name>.txt (the last line is the best accuracy), checkpoints in
# $RESULTS_DIR/<run name>/. Runs are named after the recipe and their settings
# (vgg16_1w32a_cifar100_seed=2020_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500; a width, batch or warm-up other than the recipe's is added at the end). Runs
# that have a checkpoint are resumed and finished ones are skipped, so after an
# interruption the same command carries on.
set -euo pipefail

# The recipe (config.py holds every value of it). Any of its settings can be changed by an
# environment variable: K S L LR WD LR_DECAY WARMUP_EPOCHS EPOCHS BATCH WIDTH LOADER WORKERS,
# and the runner's SEEDS (default: 2020 2024 1314 512 2333), GPUS (default: "0 1 2 3 4"), NPROC,
# DATA_ROOT (default: ./datasets; ImageNet ./datasets/imagenet) and RESULTS_DIR (default: ./results);
# run_seeds.py describes them.
export RECIPE=vgg16_1w32a_cifar100

exec python3 "$(dirname "${BASH_SOURCE[0]}")/run_seeds.py" "$@"
