#!/usr/bin/env bash
# The server's pure-Python dependencies that the GPU machine's image lacks (pygls, lsprotocol,
# cattrs, and an attrs new enough for them), and bitsandbytes, as wheels in .whl/ (ignored by git) for the device
# tool's `carry`. The GPU run in bench/NOTES.md installs them with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
  --platform any -d .whl pygls==2.1.1 lsprotocol==2025.0.0 cattrs==26.2.1 attrs==26.1.0
# bitsandbytes for bench/quantized_bench.py (43 MB: the carry limit is 64 MiB in all)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2
ls -l .whl
