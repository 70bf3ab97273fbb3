#!/usr/bin/env bash
# Binary ResNet18 (1W32A) on CIFAR-100 trained with VISPA: the paper's recipe for five
# seeds, one run per GPU slot, then a table of the results (mean ± std over the seeds).
#
#   bash benchmark_cifar100_resnet18_1W32A.sh                   # GPUs 0-4, one seed each
#   bash benchmark_cifar100_resnet18_1W32A.sh 0 1               # two GPUs; the other seeds queue
#   GPUS="0 0 0 0 0" bash benchmark_cifar100_resnet18_1W32A.sh  # all five seeds at once on GPU 0
#   GPUS="cpu cpu" SEEDS="1 2" EPOCHS=2 WIDTH=8 L=2 bash benchmark_cifar100_resnet18_1W32A.sh
#
# Logs: $RESULTS_DIR/<run name>.txt (the last line is the best accuracy), checkpoints in
# $RESULTS_DIR/<run name>/. Runs that have a checkpoint are resumed and finished ones are
# skipped, so after an interruption the same command carries on.
set -euo pipefail

# ---- the recipe; each setting can be overridden by an environment variable of the same name
K=${K:-8}                          # rank of the covariance factor Z
S=${S:-100}                        # scale: r ~ N(0, I_K / S)
L=${L:-40}                         # samples per test image
LR=${LR:-0.1}
WD=${WD:-5e-4}
LR_DECAY=${LR_DECAY:-cos}          # per iteration, after a linear warm-up
WARMUP_EPOCHS=${WARMUP_EPOCHS:-5}
EPOCHS=${EPOCHS:-500}
BATCH=${BATCH:-256}
WIDTH=${WIDTH:-64}                 # 64 = the paper's network
SEEDS=${SEEDS:-"2020 2024 1314 512 2333"}
GPUS=${GPUS:-"0 1 2 3 4"}          # slots: CUDA device indices or "cpu"; arguments override it
DATA_ROOT=${DATA_ROOT:-./datasets}
RESULTS_DIR=${RESULTS_DIR:-./results}

NAME="resnet18_1w32a_cifar100_seed={seed}_benchmark_K=${K}_S=${S}_L=${L}_wd=${WD}_lr=${LR}_${LR_DECAY}_epochs=${EPOCHS}"
# settings that differ from the paper's are named too, so such runs are never taken for it
[[ $WIDTH == 64 ]] || NAME+="_width=${WIDTH}"
[[ $BATCH == 256 ]] || NAME+="_batch=${BATCH}"
[[ $WARMUP_EPOCHS == 5 ]] || NAME+="_warmup=${WARMUP_EPOCHS}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec python3 "$HERE/run_seeds.py" \
    --name "$NAME" --seeds "$SEEDS" --slots "${*:-$GPUS}" --results_dir "$RESULTS_DIR" -- \
    --model resnet18 --dataset cifar100 --data_root "$DATA_ROOT" --width "$WIDTH" \
    -K "$K" --scale "$S" -L "$L" --lr "$LR" --wd "$WD" --lr_decay "$LR_DECAY" \
    --warmup_epochs "$WARMUP_EPOCHS" --epochs "$EPOCHS" -b "$BATCH"
