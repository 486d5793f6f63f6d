#!/usr/bin/env bash
# Installs OmniLong into ./.venv (Python 3.10-3.13) and FFmpeg when missing and installable.
# Extras (pyproject.toml): always test and eval (matplotlib, for the evaluations' heatmaps); more,
# comma-separated: OMNILONG_EXTRAS=wandb bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q "libavcodec\.so"; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing FFmpeg (torchcodec needs its shared libraries)"
    (apt-get install -y -q ffmpeg || (apt-get update -q && apt-get install -y -q ffmpeg)) >/dev/null
  else
    echo "setup: warning: FFmpeg shared libraries not found; video decoding needs them (e.g. sudo apt-get install ffmpeg)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
EXTRAS=test,eval${OMNILONG_EXTRAS:+,$OMNILONG_EXTRAS}
# constraints.txt: the exact versions CI tests (pyproject.toml gives ranges for library users).
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
echo "setup: done (.venv, extras: $EXTRAS); run commands after: source .venv/bin/activate"
