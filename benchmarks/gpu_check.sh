#!/usr/bin/env bash
# Every GPU figure from one command: bash benchmarks/gpu_check.sh [--only SECTION ...] [--dry-run] [--out FILE]
# A thin wrapper over benchmarks/gpu_check.py (see its docstring); uses .venv when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
