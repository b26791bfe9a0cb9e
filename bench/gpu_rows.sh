#!/usr/bin/env bash
# The GPU rows of docs/performance.md, and the CUDA-only tests, in one run on a CUDA machine.
#
#     PYTHON=python3 bash bench/gpu_rows.sh [quick]
#
# Runs the CUDA tests (CUDA-graph capture, the flash kernel) and every GPU benchmark row. Uses
# $PYTHON (default python3) as it is: it must have a CUDA build of torch and kernelhub installed
# (`pip install -e ".[dev]"`); `make` would install the CPU build instead. `quick` skips
# transformers' compiled rows and the MoE kernel rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0  # real Triton kernels (the test conftest otherwise turns the interpreter on)
$PY -c "import torch, kernelhub" 2>/dev/null || { echo "$PY cannot import torch and kernelhub; set PYTHON" >&2; exit 1; }
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: these rows need one'"
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

# A failing step is reported and the next one runs: device time is scarce, one failure should not
# cost every later row.
failed=()
step() {
    local title=$1; shift
    echo; echo "== $title"
    "$@" || failed+=("$title")
}
quick=$([ "${1:-}" = quick ] && echo 1 || true)

step "CUDA tests: captured graphs give eager's tokens; the flash kernel on CUDA" \
    $PY -m pytest -q -p no:cacheprovider tests/test_compiled_generate.py hub_kernels/flash-attention/tests -k cuda
step "Hub kernels vs eager, % of copy bandwidth (rmsnorm target >= 80%), flash prefill vs sdpa (>= 0.8x)" \
    $PY bench/kernel_speed.py --device cuda --hidden 4096 8192
step "Compiled decode with CUDA graphs vs eager (and transformers' compiled generate)" \
    $PY bench/compile.py --device cuda --batches 1 8 64 --dtypes bfloat16 --repeat 3 ${quick:+--no-transformers}
step "Continuous batching, flash vs sdpa" $PY bench/batching.py --gpu --device cuda
if [ -z "$quick" ]; then
    step "MoE: Triton kernel vs grouped_mm" $PY bench/experts.py --skip-model --skip-layer --repeat 5
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf '\nfailed: %s\n' "${failed[@]}" >&2
    exit 1
fi
