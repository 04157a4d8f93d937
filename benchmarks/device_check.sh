#!/usr/bin/env bash
# One prepared run for a machine with a GPU (the `device` tool): build the CUDA kernels, run the
# GPU tests, then the GPU kernel benchmark, then the op property tests (CPU and CUDA draws).
# Every stage has its own time limit, so one that hangs still leaves the others' output.
# Logs go to $OUT (the device tool brings that folder back) or /tmp/mct_fx_device.
#
#     bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mct_fx_device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=16
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/mct_fx_ext}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0))"
nvcc --version | tail -1

echo "== build"
start=$(date +%s)
MCT_FX_KERNELS_VERBOSE=1 timeout 300 python3 -W always -c \
    "import mct_fx.kernels as k; print('backend', k.backend())" >"$OUT/build.log" 2>&1
echo "build rc $? in $(($(date +%s) - start)) s"
grep -E "backend|error|warn" "$OUT/build.log" | tail -20

echo "== GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider --durations=6 tests/test_cuda.py 2>&1 | tee "$OUT/tests_cuda.log" | tail -40

echo "== benchmark"
timeout 150 python3 benchmarks/kernels.py --device cuda --sizes 1e6,1e7,1e8,1e9 2>&1 | tee "$OUT/bench.log"

echo "== op property tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_ops.py tests/test_kernels.py 2>&1 \
    | tee "$OUT/tests_ops.log" | tail -25
