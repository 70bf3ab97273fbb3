#!/usr/bin/env bash
# Everything a machine with a CUDA GPU should run once (one command, to fit a short lease):
#   1. the whole test suite on this machine's CPU and GPU (the authors' golden data on the
#      GPU, the fast paths against the plain ones, the device augmentation, random states);
#   2. a short training run on the GPU, stopped by SIGTERM and resumed, beside the same
#      run uninterrupted; its packed export evaluated on the GPU; two virtual ranks;
#   3. the speed tables: speed/cifar.py, five runs sharing the GPU, the ImageNet
#      networks and loaders.
# Everything is printed and written to OUT_DIR/gpu_check.log (default results/gpu_check,
# or $OUT where that is set). The tables go into speed/README.md, naming the card.
#
#   bash speed/gpu_check.sh [OUT_DIR]
#   GPU=cpu bash speed/gpu_check.sh      # the same steps on the CPU (slow), to try the script
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-results/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
gpu=${GPU:-0}
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT

step() { echo; echo "## $*  ($(date +%T))"; }

# Train until metrics.csv has $2 epochs, then SIGTERM (a clean stop at the next step).
stop_after() {
    local csv=$1 epochs=$2 pid=$3
    while kill -0 "$pid" 2>/dev/null; do
        if [ -f "$csv" ] && [ "$(($(wc -l < "$csv") - 1))" -ge "$epochs" ]; then
            kill -TERM "$pid"
            break
        fi
        sleep 0.2
    done
    wait "$pid"
}

{
    step "machine"
    echo "$(nproc) CPU cores"
    if [ "$gpu" != cpu ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        $python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name($gpu))" || exit 1
    fi

    step "1. the test suite (with its CUDA variants)"
    $python -m pytest -q -p no:cacheprovider tests -n 8 --dist worksteal

    step "2. a run on the GPU: uninterrupted, and stopped after epoch 2 then resumed"
    $python main.py --demo > /dev/null  # writes results/demo_data (on the CPU)
    common=(--dataset cifar10 --data-root results/demo_data --model resnet18 --width 16 -K 4 -L 4
            --lr 0.1 -b 64 --warmup-epochs 1 --epochs 4 --seed 0 --gpus "$gpu" --results-dir "$runs")
    $python main.py "${common[@]}" --save whole > /dev/null
    $python main.py "${common[@]}" --save stopped > /dev/null &
    stop_after "$runs/stopped/metrics.csv" 2 $!
    echo "stopped with exit status $? after $(($(wc -l < "$runs/stopped/metrics.csv") - 1)) epochs"
    $python main.py --resume "$runs/stopped" --data-root results/demo_data --gpus "$gpu" > /dev/null
    for run in whole stopped; do
        echo "$run:"
        grep "^Epoch" "$runs/$run.txt" | sed 's/|[^|]*s$//'
        tail -n 1 "$runs/$run.txt"
    done
    echo "(cudnn.benchmark: the two may differ in the last digits; on the CPU they are identical)"

    step "2b. the packed export of that run, evaluated on the GPU"
    $python main.py --export "$runs/whole/model_best.pth.tar" --out "$runs/whole.bnn"
    $python main.py --evaluate "$runs/whole.bnn" --dataset cifar10 --data-root results/demo_data --gpus "$gpu"
    best=$(tail -n 1 "$runs/whole.txt" | sed 's/.*(epoch \([0-9]*\)\/.*/\1/')
    echo "the log's mean-net Prec@1 of that epoch ($best): $(grep "^Epoch $best/" "$runs/whole.txt" |
        sed 's/.*mean-net Prec@1 \([0-9.]*\).*/\1/')"

    step "2c. two virtual ranks on the GPU"
    $python main.py "${common[@]}" --epochs 2 --virtual-ranks 2 --save ranks > /dev/null
    tail -n 1 "$runs/ranks.txt"

    step "3. speed: the CIFAR-100 recipes, three modes"
    device=$([ "$gpu" = cpu ] && echo cpu || echo "cuda:$gpu")
    $python speed/cifar.py --device "$device"
    step "3b. five ResNet18 runs sharing the GPU"
    $python speed/cifar.py --device "$device" --concurrent 5
    step "3c. the ImageNet networks and loaders"
    $python speed/imagenet.py --device "$device" --workers "$(nproc)"
    step "done"
} 2>&1 | tee "$out/gpu_check.log"
