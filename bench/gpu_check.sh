#!/usr/bin/env bash
# The GPU check: an acceptance check for a fresh GPU machine (one H100/H200; about 8 minutes, --budget=SECONDS).
#
#     bash bench/wheels.sh                                     # once, with network: the peer libraries as wheels in .whl/
#     LWLR_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh   # on the GPU machine, with .whl
#     PYTHON=$(bash bench/replica.sh) OUT=/tmp/kit bash bench/gpu_check.sh --rehearse   # here, on CPU
#     bash bench/gpu_check.sh --plan                           # the plan and its predicted times only
#
# Parts, each under its own time cap, in this order: environment (device, driver, versions, commit,
# measured copy bandwidth and bf16 matmul rate), correctness on CUDA (the optimizer reference tests with
# the kernels compiled, the fused loss, lwlr on CUDA against CPU), optimizers (bench_optim.py, gpt2 and
# gpt2-large), train (train.py per optimizer, compiled, bf16, checkpoint and resume), torchrun (the DDP
# path at world size 1, and its resume), throughput (bench_train.py on gpt2 and the lwlr measurement).
# Results go to ${OUT:-bench/results/gpu}: summary.json (every figure with its unit, the device, the
# commit; rewritten as each part ends) and one <part>.log each. bench/gpu_kit.py is the runner.
# Runs $PYTHON (default python3). Exits non-zero if a part failed or was cut.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_kit check "$@"
