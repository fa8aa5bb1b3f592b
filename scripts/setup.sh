#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch and this package (+ dev extras).
# Idempotent: a second run only checks. Choose the torch build with TORCH_SPEC, e.g.
#   TORCH_SPEC=torch bash scripts/setup.sh        # your platform's default build (CUDA on Linux)
# Default: torch==2.13.0, the CPU wheel this project's CI machines provide.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! python -c "import cs336_alignment, pytest, pytest_timeout, matplotlib" 2>/dev/null || [ -n "${CI:-}" ]; then
  pip install -q -e ".[dev]"
fi
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
