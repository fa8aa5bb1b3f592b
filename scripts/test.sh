#!/usr/bin/env bash
# The tests: set up (if needed), then the whole offline suite on CPU (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
