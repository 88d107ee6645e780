#!/usr/bin/env bash
# The one command for a lent GPU machine: bash benchmarks/gpu_check.sh [SECTION]   (default: quick)
#
# The GPU image (python 3.12, torch 2.11 CUDA, transformers, accelerate, peft; no index to install from) lacks trl,
# datasets, deepspeed, math-verify, pebble and their own missing dependencies. They travel as wheels in .whl/ (git-
# ignored: the device run must carry it, carry=[".whl"]), made here on a CPU machine with PyPI in seconds by
#   bash benchmarks/gpu_check.sh wheels
# Then, on the lent machine: bash benchmarks/gpu_check.sh   (device run: carry [".whl"], timeout_s 480).
# This installs them into /tmp/site (nothing of the image is changed), runs `gpu_check.py SECTION` and leaves
# gpu_<section>.json, gpu_check.log and versions.txt in $OUT. `quick` = `core` (the internal policies' bf16 checks on
# a Qwen3-0.6B shape, ~20 s) then `launchers` (ZeRO-3 and FSDP2 through bupo train, each under its own timeout) in
# what is left of 5 minutes; its verdicts are printed even when a run times out.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then  # on a CPU machine with PyPI: the wheels the GPU image lacks (7 MB)
  set -e
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0 \
    latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 pebble==5.2.3 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps 'deepspeed==0.19.8' -w .whl  # an sdist: ops JIT-built if used
  ls .whl
  exit 0
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check: no wheels in .whl/: run 'bash benchmarks/gpu_check.sh wheels' on a CPU machine, then carry .whl" >&2
  exit 2
fi
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
python3 - > "$OUT/versions.txt" 2>&1 <<'EOF'
import importlib.metadata as m
import sys

print("python", sys.version.split()[0])
for name in ("torch", "transformers", "accelerate", "trl", "datasets", "deepspeed", "peft", "math-verify", "pebble"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
import bupo, deepspeed, math_verify, pebble, trl  # noqa: E401,F401  (fails here, with its reason, if a wheel is unusable)

print("imports ok; bupo from", bupo.__file__)
EOF
cat "$OUT/versions.txt"
timeout 420 python3 benchmarks/gpu_check.py "${1:-quick}" --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
