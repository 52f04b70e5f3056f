#!/usr/bin/env bash
# Creates (or reuses) the virtualenv that runs circuit-tracer 0.5.0 as the
# anchor for tests/test_circuit_tracer.py and
# benchmarks/circuits_vs_circuit_tracer.py (DESIGN.md section 8).
#
# Usage: scripts/circuit_tracer_env.sh    prints the env's python on stdout
#   CIRCUIT_TRACER_VENV=/some/dir  where the env lives (default:
#                                  .venv-circuit-tracer in the repository
#                                  root, which git ignores)
#   PYTHON=python3.11              the interpreter to build it from
#
# Install order, as measured: torch==2.13.0 (the CPU build) first, then
# `circuit-tracer==0.5.0 torch==2.13.0 transformers==4.57.3 nnsight==0.7.0
# "huggingface-hub<1.0"` in one resolve, then uninstall torchvision and
# torchaudio (nothing circuit-tracer runs imports them). circuit-tracer asks
# for transformers <= 4.57.3 (so it cannot share the project's transformers
# 5.x env) and nnsight >= 0.6; nnsight 0.8.x moved a module circuit-tracer
# imports, hence the pin. transformer-lens is left to the resolver. Resolves
# to transformer-lens 3.2.1, huggingface-hub 0.36.2, numpy 2.4.6. A fresh
# build took 154 s here (2 cores, wheels from the local mirror; 1.6 GB).
#
# Idempotent: a stamp inside the env records a hash of the install steps and
# the interpreter version, written only after `import circuit_tracer` works;
# while it matches, a rerun returns at once. Otherwise the env is rebuilt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CIRCUIT_TRACER_VENV:-$ROOT/.venv-circuit-tracer}"
STAMP="$VENV/.gemscope-env-stamp"

die() { echo "circuit_tracer_env.sh: error: $*" >&2; exit 1; }
say() { echo "circuit_tracer_env.sh: $*" >&2; }

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11
  else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter '$PYTHON'"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "'$PYTHON' does not run"

STEP1='torch==2.13.0'
STEP2='circuit-tracer==0.5.0 torch==2.13.0 transformers==4.57.3 nnsight==0.7.0 huggingface-hub<1.0'
STEP3='uninstall torchvision torchaudio'
WANT="$(printf '%s\n%s\n%s\npython %s\n' "$STEP1" "$STEP2" "$STEP3" \
  "$PY_VERSION" | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]
}

if up_to_date; then echo "$VENV/bin/python"; exit 0; fi

LOCK="${TMPDIR:-/tmp}/gemscope-circuit-tracer-env-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
flock 9
if up_to_date; then echo "$VENV/bin/python"; exit 0; fi

START=$SECONDS
say "building $VENV (Python $PY_VERSION, circuit-tracer 0.5.0; a few minutes)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet torch==2.13.0 \
  || die "pip install torch==2.13.0 failed"
"${PIP[@]}" install --quiet circuit-tracer==0.5.0 torch==2.13.0 \
  transformers==4.57.3 nnsight==0.7.0 "huggingface-hub<1.0" \
  || die "pip install circuit-tracer==0.5.0 failed"
"${PIP[@]}" uninstall --quiet --yes torchvision torchaudio >/dev/null 2>&1 || true

SMOKE_TEST='
import importlib.metadata as md
import torch, transformers, nnsight, circuit_tracer
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder import load_transcoder_set
assert md.version("circuit-tracer") == "0.5.0", md.version("circuit-tracer")
assert md.version("nnsight") == "0.7.0", md.version("nnsight")
assert transformers.__version__ == "4.57.3", transformers.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
'
if ! SMOKE="$("$VENV/bin/python" -c "$SMOKE_TEST" 2>&1)"; then
  echo "$SMOKE" >&2
  die "the new env cannot import circuit_tracer (see the traceback above)"
fi
printf '%s\n' "$WANT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
say "built $VENV in $((SECONDS - START)) s ($(du -sh "$VENV" | cut -f1))"
echo "$VENV/bin/python"
