#!/usr/bin/env bash
# The test suite. Creates or reuses .venv (and the gemma-library reference
# environment .venv-gemma, from its test). Extra flags go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -rs "$@"
