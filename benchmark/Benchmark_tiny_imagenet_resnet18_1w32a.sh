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

# The recipe (config.py holds every value of it). Any of its settings can be changed by an
# environment variable: K S L LR WD LR_DECAY WARMUP_EPOCHS EPOCHS BATCH WIDTH LOADER WORKERS,
# and the runner's SEEDS (default: 2020 2024 1314 512 2333), GPUS (default: "0 1 2 3 4"), NPROC,
# DATA_ROOT (default: ./datasets; ImageNet ./datasets/imagenet) and RESULTS_DIR (default: ./results);
# run_seeds.py describes them.
export RECIPE=resnet18_1w32a_tiny-imagenet

exec python3 "$(dirname "${BASH_SOURCE[0]}")/../run_seeds.py" "$@"
