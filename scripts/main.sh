#!/usr/bin/env bash
# The main job on the embedded default: train a JumpReLU SAE on the real
# Gemma 3 270M's layer-6 residual stream over Shakespeare, then evaluate it
# on held-out text. Creates or reuses .venv first; rerunning resumes (or, if
# the run is complete, re-evaluates). Extra flags go to `gemscope train`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/gemscope" train \
  --config=experiments/jumprelu_270m.py --workdir=out/main "$@"
