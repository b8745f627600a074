#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py says what it runs): ≤ 7 minutes on one GPU (286 s on an H200), each
# result printed as it ends. It uses the interpreter's own torch and torchvision and installs
# nothing: the package runs from this checkout. PYTHON=... picks the interpreter.
#   tools/gpu_check.sh             on a machine with a GPU
#   tools/gpu_check.sh --dry-run   the plumbing on the CPU (what CI and the tests run)
#   tools/gpu_check.sh --only a,d  some checks only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" tools/gpu_check.py "$@"
