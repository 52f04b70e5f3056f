#!/usr/bin/env bash
# The main job on the embedded default: real Gemma 3 270M on real text.
# Creates or reuses .venv first. Extra flags go to `gemscope demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/gemscope" demo "$@"
