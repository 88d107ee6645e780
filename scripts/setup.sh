#!/usr/bin/env bash
# Idempotent set-up: .venv with CPU torch 2.13.0 (taken first, so no CUDA build is pulled in) and bupo.
#   bash scripts/setup.sh        bupo alone (what `bupo demo` needs)
#   bash scripts/setup.sh dev    bupo + the test tools (pytest, ruff, Triton for its CPU interpreter)
# Re-running is cheap: it re-installs only when pyproject.toml changed or dev tools are newly asked for.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-run}
case "$mode" in run|dev) ;; *) echo "usage: setup.sh [run|dev]" >&2; exit 2 ;; esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.bupo-setup-stamp
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
# a dev install also serves a plain run
if [ "$have" != "$hash dev" ] && [ "$have" != "$hash $mode" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
  if [ "$mode" = dev ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  echo "$hash $mode" > "$stamp"
fi
