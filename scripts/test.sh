#!/usr/bin/env bash
# Set up (idempotent) and run the test suite.
#   bash scripts/test.sh            ruff + the whole suite on the newest allowed releases (.venv), then the core and
#                                   trainer-contract tests on the oldest allowed ones (.venv-oldest, scripts/oldest.txt)
#   bash scripts/test.sh ARGS...    pytest ARGS in .venv only
# BUPO_TEST_OLDEST=0 skips the oldest-versions pass (it says so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
versions='import importlib.metadata as m; print(", ".join(f"{d} {m.version(d)}" for d in ("torch", "transformers", "trl", "accelerate", "datasets")))'
echo "== newest allowed: $(.venv/bin/python -c "$versions")"
.venv/bin/python -m ruff check src tests benchmarks
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
fi
rc=0
.venv/bin/python -m pytest -n 2 --dist loadgroup || rc=$?

if [ "${BUPO_TEST_OLDEST:-1}" = 0 ]; then
  echo "== oldest allowed versions: not tested (BUPO_TEST_OLDEST=0)"
  exit $rc
fi
# the oldest releases: a second venv, re-installed only when pyproject.toml or scripts/oldest.txt change
stamp=.venv-oldest/.bupo-oldest-stamp
hash=$(cat pyproject.toml scripts/oldest.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$hash" ]; then
  [ -x .venv-oldest/bin/python ] || "${PYTHON:-python3}" -m venv .venv-oldest
  .venv-oldest/bin/python -m pip install -q --upgrade pip
  .venv-oldest/bin/python -m pip install -q torch==2.13.0  # the CPU build first, so no CUDA build is pulled in
  .venv-oldest/bin/python -m pip install -q -c scripts/oldest.txt -e ".[dev]"
  echo "$hash" > "$stamp"
fi
echo "== oldest allowed: $(.venv-oldest/bin/python -c "$versions")"
old_rc=0
.venv-oldest/bin/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider \
  tests/test_internal.py tests/test_trl_contract.py tests/test_training.py tests/test_recipes.py || old_rc=$?
[ $rc -ne 0 ] && exit $rc
exit $old_rc
