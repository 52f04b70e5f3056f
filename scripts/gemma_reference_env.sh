#!/usr/bin/env bash
# Creates (or reuses) the virtualenv that runs Google DeepMind's `gemma`
# library as an independent reference for tests/test_gemma_library.py.
#
# Usage: scripts/gemma_reference_env.sh      prints the env's python on stdout
#   GEMMA_VENV=/some/dir  overrides where the env lives (default: .venv-gemma
#                         in the repository root, which git ignores)
#   PYTHON=python3.11     the interpreter to build it from
#
# gemma 3.3.0 is the newest release that installs on Python 3.11, and it only
# imports with kauldron 1.3.0, jax/jaxlib 0.9.2, flax 0.12.6 and typeguard
# 4.4.4; kauldron in turn imports tensorflow (and through it keras,
# tensorboard, matplotlib, pandas, ...) whether or not it is used. Their
# declared dependency trees are far larger still (tensorflow_datasets,
# xmanager, opencv, scikit-learn, ...) and pip's resolver backtracks on them
# for tens of minutes, so every distribution is pinned below and installed
# with --no-deps: the list is the closure of what the reference actually
# imports plus the declared requirements of jax, flax, orbax and gemma.
#
# Idempotent: a stamp inside the env records a hash of the pinned list and
# the interpreter version; while it matches, a rerun does nothing. On any
# mismatch, or after an interrupted build (no stamp), the env is rebuilt from
# scratch. Main caveat: about 2.4 GB on disk (tensorflow alone is 1.3 GB);
# the first build downloads a few hundred MB of wheels unless pip's cache
# has them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GEMMA_VENV:-$ROOT/.venv-gemma}"
STAMP="$VENV/.gemscope-env-stamp"

die() { echo "gemma_reference_env.sh: error: $*" >&2; exit 1; }
say() { echo "gemma_reference_env.sh: $*" >&2; }

# Every wheel is cp311 or pure Python; the set was settled on CPython 3.11.
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11
  else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter '$PYTHON'"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "'$PYTHON' does not run"
[[ "$PY_VERSION" == "3.11" ]] \
  || die "'$PYTHON' is Python $PY_VERSION; the pinned set needs 3.11 (set PYTHON=)"

# Installed first, so that the one sdist below (promise, needed by
# tensorflow_datasets) builds with these rather than whatever is newest.
BUILD_REQUIREMENTS="setuptools==65.5.0 wheel==0.45.1"
REQUIREMENTS="$(cat <<'EOF'
gemma==3.3.0
kauldron==1.3.0
jax==0.9.2
jaxlib==0.9.2
flax==0.12.6
typeguard==4.4.4
tensorflow_cpu==2.21.0
absl-py==2.5.1
aiofiles==25.1.0
array_record==0.8.6
astunparse==1.6.3
certifi==2026.10.18
charset-normalizer==3.5.2
chex==0.1.92
cloudpickle==3.1.2
clu==0.0.12
cycler==0.12.1
dataclasses-json==0.6.7
einops==0.8.2
etils==1.15.0
flatbuffers==25.12.19
fonttools==4.68.0
fsspec==2026.9.0
gast==0.7.0
grain==0.2.18
h5py==3.16.0
humanize==4.17.0
idna==3.20
immutabledict==4.3.1
ipython==9.18.1
jaxtyping==0.3.11
keras==3.15.1
kiwisolver==1.5.1
lark==1.3.1
markdown-it-py==4.3.0
marshmallow==3.26.2
matplotlib==3.11.2
mdurl==0.1.2
mediapy==1.2.7
ml_collections==1.1.0
ml_dtypes==0.6.0
msgpack==1.2.4
mypy_extensions==1.2.0
namex==0.1.0
numpy==2.4.6
opt_einsum==3.4.0
optax==0.2.8
optree==0.20.0
orbax-checkpoint==0.12.8
orbax-export==0.0.8
packaging==26.3
pandas==3.1.1
pillow==13.0.0
portpicker==1.6.0
prometheus_client==0.26.0
promise==2.3
protobuf==7.36.2
psutil==7.2.2
Pygments==2.21.0
pyparsing==3.3.3
python-dateutil==4.0.0
pytz==2026.6
PyYAML==6.0.3
requests==2.34.2
rich==15.0.0
scipy==1.17.1
sentencepiece==0.2.3
simplejson==4.3.0
six==1.17.0
tensorboard==2.21.0
tensorflow-datasets==4.9.10
tensorflow-metadata==1.21.0
tensorstore==0.1.86
termcolor==3.3.0
toml==0.10.2
toolz==1.2.0
tqdm==4.70.1
traitlets==5.16.1
treescope==0.1.10
typing-inspect==0.9.0
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
uvloop==0.23.0
wadler_lindig==0.1.8
wrapt==2.5.2
zipp==4.1.2
EOF
)"
WANT="$(printf '%s\n%s\npython %s\n' "$BUILD_REQUIREMENTS" "$REQUIREMENTS" \
  "$PY_VERSION" | sha256sum | cut -d' ' -f1)"

up_to_date() {
  [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]
}

if up_to_date; then echo "$VENV/bin/python"; exit 0; fi

# Two test processes may ask at once: one builds, the other waits and reuses.
LOCK="${TMPDIR:-/tmp}/gemscope-gemma-env-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
flock 9
if up_to_date; then echo "$VENV/bin/python"; exit 0; fi

START=$SECONDS
say "building $VENV (Python $PY_VERSION, gemma 3.3.0; about a minute)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed"
REQ_FILE="$(mktemp "${TMPDIR:-/tmp}/gemma-requirements.XXXXXX")"
trap 'rm -f "$REQ_FILE"' EXIT
printf '%s\n' "$REQUIREMENTS" > "$REQ_FILE"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check
     --no-deps --only-binary=:all:)
# shellcheck disable=SC2086  # the list is space-separated on purpose
"${PIP[@]}" $BUILD_REQUIREMENTS \
  || die "pip install of $BUILD_REQUIREMENTS into $VENV failed"
"${PIP[@]}" --no-binary=promise --no-build-isolation -r "$REQ_FILE" \
  || die "pip install into $VENV failed (see pip's output above)"

# The stamp is only written once the library imports and builds a model, so
# a broken env is never taken for a finished one.
SMOKE_TEST='
import gemma
from gemma import gm
import orbax.checkpoint
model = gm.nn.Gemma3_270M()
assert gemma.__version__ == "3.3.0", gemma.__version__
'
# tensorflow logs to stderr on import; shown only if the import fails.
if ! SMOKE="$(TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu \
              "$VENV/bin/python" -c "$SMOKE_TEST" 2>&1)"; then
  echo "$SMOKE" >&2
  die "the new env cannot import gemma (see the traceback above)"
fi
printf '%s\n' "$WANT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
say "built $VENV in $((SECONDS - START)) s ($(du -sh "$VENV" | cut -f1))"
echo "$VENV/bin/python"
