#!/usr/bin/env bash
# The GPU rows of doc/validation/sections.md, in one call on a machine with a
# CUDA device (at most 7 minutes): the GPU tests, the default
# prior's simulation on the GPU and on the same machine's CPU, and the
# default posterior's held-out calibration and inference rate on the GPU.
#
#     bash benchmarks/gpu_rows.sh [LOG_FOLDER]
#
# Each step has its own time limit, so that a slow one leaves the others
# their rows; each step's whole output goes to LOG_FOLDER/<step>.log
# (default: the current folder) and its last lines to the terminal.
set -u
logs=$(realpath "${1:-.}")
mkdir -p "$logs"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $limit s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    grep -v -e "it/s]" -e "s/it]" "$logs/$name.log" | tail -n "${TAIL:-30}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step gpu_tests 100 $python -m pytest -q -m gpu -p no:cacheprovider \
    tests/posterior/test_posterior.py tests/reconst/test_reconst.py \
    tests/sim/test_forward.py tests/sim/test_solvers.py
cd benchmarks
step throughput_cuda 100 $python prior_throughput.py --n 256 --batch_size 256 \
    --device cuda
step calibration_cuda 150 $python posterior_calibration.py --default --n_test 300 \
    --throughput 200000 --device cuda
step throughput_cpu 60 $python prior_throughput.py --n 64 --device cpu
