#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with rrstem and its test tools.
# torch is pinned to the CPU build first; an unpinned torch would pull a multi-GB CUDA build.
# On a GPU machine, install the CUDA build of torch you want into .venv before or after; rrstem uses it via --device.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/rrstem --help >/dev/null
echo "rrstem installed in $(pwd)/.venv: run .venv/bin/rrstem demo"
