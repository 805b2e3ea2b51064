#!/usr/bin/env bash
# The pure-Python peer libraries a bare GPU image lacks (and, without network, cannot fetch), as wheels in
# .whl/ (git-ignored), for the GPU scripts to install there: copy .whl with the checkout. Versions as
# requirements-dev.txt pins them; their only dependency, torch, is in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    lion-pytorch==0.2.5 sophia-opt==0.2.2 adam-mini==1.1.1 2> >(grep -v "^WARNING: Location" >&2)
ls .whl
