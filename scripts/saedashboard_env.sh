#!/usr/bin/env bash
# Creates (or reuses) the virtualenv that runs SAEDashboard 0.8.0 as the anchor
# for benchmarks/dashboard_vs_saedashboard.py (DESIGN.md section 9).
#
# Usage: scripts/saedashboard_env.sh     prints the env's python on stdout
#   SAEDASHBOARD_VENV=/some/dir  where the env lives (default: .venv-saedashboard
#                                in the repository root, which git ignores)
#   PYTHON=python3.11            the interpreter to build it from
#
# Install order, as measured (DESIGN.md section 9): torch==2.13.0 first, then
# `sae-dashboard==0.8.0 torch==2.13.0 "pyarrow<24"`, then uninstall torchvision
# and torchaudio. Letting pip resolve freely pulls a CUDA torch 2.14 through
# decode-clt and a pyarrow that needs numpy 2 while transformer-lens pins
# numpy < 2. Resolves to sae-lens 6.54.12, transformer-lens 2.17.0,
# transformers 4.56.2.
#
# Idempotent: a stamp inside the env records a hash of the install steps and
# the interpreter version, written only after `import sae_dashboard` works;
# while it matches, a rerun returns at once. Otherwise the env is rebuilt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAEDASHBOARD_VENV:-$ROOT/.venv-saedashboard}"
STAMP="$VENV/.gemscope-env-stamp"

die() { echo "saedashboard_env.sh: error: $*" >&2; exit 1; }
say() { echo "saedashboard_env.sh: $*" >&2; }

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11
  else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter '$PYTHON'"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "'$PYTHON' does not run"

STEP1='torch==2.13.0'
STEP2='sae-dashboard==0.8.0 torch==2.13.0 pyarrow<24'
STEP3='uninstall torchvision torchaudio'
WANT="$(printf '%s\n%s\n%s\npython %s\n' "$STEP1" "$STEP2" "$STEP3" \
  "$PY_VERSION" | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]
}

if up_to_date; then echo "$VENV/bin/python"; exit 0; fi

LOCK="${TMPDIR:-/tmp}/gemscope-saedashboard-env-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
flock 9
if up_to_date; then echo "$VENV/bin/python"; exit 0; fi

START=$SECONDS
say "building $VENV (Python $PY_VERSION, sae-dashboard 0.8.0; a few minutes)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet torch==2.13.0 \
  || die "pip install torch==2.13.0 failed"
"${PIP[@]}" install --quiet sae-dashboard==0.8.0 torch==2.13.0 "pyarrow<24" \
  || die "pip install sae-dashboard==0.8.0 failed"
"${PIP[@]}" uninstall --quiet --yes torchvision torchaudio >/dev/null 2>&1 || true

SMOKE_TEST='
import importlib.metadata as md
import torch, sae_dashboard, sae_lens, transformer_lens
from sae_dashboard.sae_vis_runner import SaeVisRunner
assert md.version("sae-dashboard") == "0.8.0", md.version("sae-dashboard")
assert torch.__version__.startswith("2.13.0"), torch.__version__
'
if ! SMOKE="$("$VENV/bin/python" -c "$SMOKE_TEST" 2>&1)"; then
  echo "$SMOKE" >&2
  die "the new env cannot import sae_dashboard (see the traceback above)"
fi
printf '%s\n' "$WANT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
say "built $VENV in $((SECONDS - START)) s ($(du -sh "$VENV" | cut -f1))"
echo "$VENV/bin/python"
