#!/usr/bin/env bash
# GPT-2 124M on one GPU, in at most 8 minutes of wall time on one H100/H200: the paper's overfit table
# (AdamW, Lion, SophiaG, Adam-mini; one global rate against layer-wise rates, 3 rates each) and a
# held-out check (AdamW single, lwlr, fan_in, blockwise; 2 rates, 2 seeds), on the embedded Shakespeare in GPT-2 BPE.
# Run it once bench/gpu_check.sh has passed on the machine.
#
#     python -m data.shakespeare.prepare && bash bench/wheels.sh     # once, with network: the token files, the wheels
#     LWLR_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_science.sh   # on the GPU machine, with data/shakespeare
#     PYTHON=$(bash bench/replica.sh) OUT=/tmp/science bash bench/gpu_science.sh --rehearse   # here, gpt2-tiny
#     bash bench/gpu_science.sh --plan                                 # the plan and its predicted times only
#
# Results go to ${OUT:-bench/results/gpu}: summary.json (best loss of every optimizer x rule, the device,
# the commit), overfit-results.json and heldout-results.json (every run, as bench/overfit.py writes
# them; `python -m bench.overfit_report FOLDER` draws table.md and the plots from a folder holding one
# as results.json), and a log per part. Runs $PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_kit science "$@"
