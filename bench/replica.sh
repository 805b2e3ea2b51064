#!/usr/bin/env bash
# A replica of a GPU machine's Python image (python 3.12, torch 2.11, Triton 3.6, nothing else installable),
# to rehearse bench/gpu_check.sh and bench/gpu_science.sh on a CPU machine before any GPU time is spent:
#
#     PYTHON=$(bash bench/replica.sh) OUT=/tmp/kit bash bench/gpu_check.sh --rehearse
#
# Builds once, into ${LWLR_REPLICA:-~/.cache/lwlr-replica} (outside the repository), and prints the path
# of its python on stdout. The image it copies runs python 3.12 with torch 2.11.0+cu130 and triton 3.6.0;
# the versions below are the ones it has. Only packages the image
# has go in: lion-pytorch, sophia-opt and adam-mini are NOT installed, as there, so the rehearsal proves
# they come from .whl (bench/wheels.sh). torch 2.11.0 for cp312 is the registry's CUDA build (a 530 MB
# wheel plus nvidia-* libraries, about 5 GB installed, a few minutes): it needs those libraries to import,
# and then runs on the CPU.
set -euo pipefail
venv=${LWLR_REPLICA:-$HOME/.cache/lwlr-replica}
image_packages=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 tiktoken==0.14.0 safetensors==0.8.0
                transformers==5.17.0 huggingface_hub==1.33.0 pytest matplotlib tqdm)

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    base=$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3
    [ -x "$base" ] || base=$(command -v python3.12) || {
        echo "replica: no python 3.12 found (pyenv 3.12.1 or python3.12 on PATH)" >&2
        exit 1
    }
    echo "replica: building $venv from $base (a few GB, a few minutes, once)" >&2
    rm -rf "$venv"
    "$base" -m venv "$venv"
    # The image installs from no registry; this machine's pip cap (/etc/xdg/pip) would refuse torch 2.11's
    # own pins of nothing, but keep it out of the way so the image's versions are what gets installed.
    PIP_CONSTRAINT= "$venv/bin/python" -m pip install -q --disable-pip-version-check "${image_packages[@]}" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
