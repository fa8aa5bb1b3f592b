#!/usr/bin/env bash
# The main job: set up (if needed), then SFT + GRPO on a tiny model on CPU (about 2 minutes on 2 cores).
# Extra arguments go to `python -m cs336_alignment demo` (e.g. --out runs/demo2 grpo_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m cs336_alignment demo "$@"
