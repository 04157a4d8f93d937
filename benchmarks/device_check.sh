#!/usr/bin/env bash
# One prepared run for a machine with a GPU (the `device` tool): CUDA kernel tests, then the GPU
# kernel benchmark.  Builds the CUDA extension on first import (~2 min); prints everything.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 -c "import mct_fx.kernels as k; print('backend', k.backend())"
python3 -m pytest -q -p no:cacheprovider tests/test_kernel_ops.py tests/test_kernels.py -x 2>&1 | tail -15
python3 benchmarks/kernels.py --device cuda --sizes 1e6,1e7,1e8,1e9
