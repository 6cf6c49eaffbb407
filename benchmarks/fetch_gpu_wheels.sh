#!/usr/bin/env bash
# Wheels for the lent GPU machines (no package index there; torch, transformers and accelerate are installed,
# diffusers, peft and bitsandbytes are not): run here, from the repository root, before a device call that
# carries `.whl` (ignored by git; ~50 MB with the repository under the 64 MiB a call may carry).
#   bash benchmarks/fetch_gpu_wheels.sh && <device run: bash benchmarks/gpu_checks.sh "$OUT", carry [".whl"]>
# benchmarks/gpu_checks.sh installs them into /tmp/site there. Versions: this project's tested ones.
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2 bitsandbytes==0.50.2
du -sh .whl && ls .whl
