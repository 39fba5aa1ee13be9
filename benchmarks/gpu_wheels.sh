#!/usr/bin/env bash
# Wheels that benchmarks/gpu_suite.py needs on the GPU machine, downloaded here into .whl/.
#
# That machine (Python 3.12, x86-64, no registry access) has torch, transformers, accelerate,
# safetensors, huggingface-hub and pytest, but not diffusers. Carried, pure Python, --no-deps:
#   diffusers  the pinned range's tested version (pyproject: >=0.42,<0.43);
#   peft       the tested version too: the machine's own peft is of unknown version, and diffusers'
#              LoRA loading (naive PEFT variant, export test) depends on it.
# Not carried: diffusers' other requirements are on the machine (importlib_metadata is imported
# only on Python < 3.8); pytest is there. Ray and webdataset are neither needed nor carried.
#
#   bash benchmarks/gpu_wheels.sh     # -> .whl/ (~7 MB), ignored by git via .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
PEFT_VERSION=${PEFT_VERSION:-0.21.2}
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "diffusers==${DIFFUSERS_VERSION}" "peft==${PEFT_VERSION}"
ls -l .whl
du -sh .whl
