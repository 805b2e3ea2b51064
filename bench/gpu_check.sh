#!/usr/bin/env bash
# One command for whoever has a GPU: the optimizer reference tests on CUDA (the Triton kernels compiled,
# not interpreted), the kernel report, the optimizer benchmark and the training-step benchmark.
#
#     bash bench/gpu_check.sh
#
# Writes bench/results/gpu-check-<device>.md (device, versions, commit, each part's output and exit
# code) beside the benchmarks' own result files, and exits non-zero if any part failed. Until someone
# runs it, every GPU figure in this repository is a prediction (bench/results/kernels.md).
set -uo pipefail
cd "$(dirname "$0")/.."

device=$(python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2>/dev/null) || {
    echo "gpu_check: torch sees no CUDA device; run this on a GPU machine" >&2
    exit 1
}
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9' '-' | sed 's/-\+/-/g; s/^-//; s/-$//')
report="bench/results/gpu-check-$slug.md"
mkdir -p bench/results
failed=0

part() {  # part TITLE COMMAND...: run it, keep the tail of its output and its exit code
    local title=$1
    shift
    echo "## $title"
    echo
    echo '```'
    echo "\$ $*"
    "$@" >/tmp/gpu_check_part.log 2>&1
    local code=$?
    tail -n 60 /tmp/gpu_check_part.log
    echo '```'
    echo "exit code $code"
    echo
    [ "$code" -eq 0 ] || failed=1
}

{
    echo "# GPU check on $device"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    python -c "import torch, triton; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    echo
    part "Optimizer reference tests on CUDA" env LWLR_TEST_DEVICE=cuda python -m pytest -q tests/test_optim.py
    part "Kernel report (static)" python bench/kernel_report.py --check
    part "Optimizer step benchmark" python bench/bench_optim.py
    part "Training step benchmark" python bench/bench_train.py
    echo "gpu_check: $([ "$failed" -eq 0 ] && echo 'every part passed' || echo 'a part FAILED')"
} | tee "$report"

echo "wrote $report" >&2
# The pipeline ran in a subshell: read the outcome back from the report.
grep -q "^gpu_check: every part passed" "$report"
