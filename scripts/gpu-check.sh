#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU (and no network): the CUDA tests (`pytest -m cuda`) and the GPU
# benchmark (`benchmarks/run.py --device cuda`), in under 8 minutes; prints the benchmark's tables.
#
# The GPU image has torch (2.11), triton, numpy and pytest, not gptqmodel, autoawq, optimum or a recent PEFT.
# Build their wheels first, on a machine with the network, from the project root (../shared/gpu/wheels.sh):
#
#     echo /.whl/ >> .git/info/exclude; bash ../shared/gpu/wheels.sh .whl
#
# then carry .whl to the GPU machine and run, from the project root there:
#
#     bash scripts/gpu-check.sh
#
# Environment: OUT (folder for the results; default /tmp/qpass-gpu), BUDGET_S (default 470: the whole check),
# TESTS_S (default 230: the tests' share), BENCH_ARGS (extra benchmark arguments, e.g. "--configs qpass,peft_eager").
# Compiled forwards never build a DynamicCache (torch 2.11 there fails in dynamo's guards on it): the tests and
# the benchmark pass use_cache=False or a StaticCache.
# mm-cuda (qpass's fused dequant-GEMM, on request only): the tests check it (tests/test_cuda.py, `test_mm_*`), and
# the benchmark's qpass_mm_cuda row ("qpass, mm-cuda (fused dequant-GEMM)") times prefill and the train step next
# to qpass's (torch-dequant); the mm-cuda comparison lines are repeated at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget="${BUDGET_S:-470}"
out="${OUT:-/tmp/qpass-gpu}"
mkdir -p "$out"
say() { echo "$(date +%H:%M:%S) gpu-check: $*"; }

if [ -f .whl/install.sh ]; then
  say "installing the carried wheels (.whl)"
  bash .whl/install.sh || { say "wheel install failed"; exit 1; }
  export PYTHONPATH="$(cat .whl/site)${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')" \
  || exit 1

say "pytest -m cuda (at most ${TESTS_S:-230} s)"
timeout "${TESTS_S:-230}" python3 -m pytest -m cuda -q -p no:cacheprovider -rs tests/test_cuda.py \
  2>&1 | tee "$out/pytest-cuda.log" | tail -40
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 124 ] && say "the tests ran out of their time (TESTS_S); see $out/pytest-cuda.log"

left=$((budget - (SECONDS - start)))
if (( left < 60 )); then
  say "no time left for the benchmark ($left s)"
  exit "${tests_rc:-1}"
fi
say "benchmarks/run.py --device cuda (at most $left s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "$left" python3 benchmarks/run.py --device cuda --repeats 5 --warmup 1 --out "$out/bench" ${BENCH_ARGS:-} \
  > "$out/bench.log" 2> "$out/bench.err"
bench_rc=$?
cat "$out/bench.log"
[ "$bench_rc" = 0 ] || { say "benchmark exit status $bench_rc; last lines of its stderr:"; tail -20 "$out/bench.err"; }
say "mm-cuda (fused dequant-GEMM) vs torch-dequant, prefill and train step:"
grep -E "mm-cuda|qpass_mm_cuda" "$out/bench.log" || say "no mm-cuda rows (qpass_mm_cuda not run)"
say "done in $((SECONDS - start)) s (tests: exit $tests_rc, benchmark: exit $bench_rc); results in $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
