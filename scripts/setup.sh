#!/usr/bin/env bash
# Create ./.venv and install qpass with everything it needs, on a fresh machine (CPU, Python 3.11).
# torch 2.14.1 is pinned (gptqmodel 7.x needs it); pip takes it from this machine's local wheel cache.
# autoawq 0.2.9 is deprecated upstream and pins old dependencies: it is installed with --no-deps;
# its WQLinear_GEMM layer imports and runs with the torch/transformers installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

LAST_LINE=$SECONDS
say() { echo "$(date +%H:%M:%S) setup: $*"; LAST_LINE=$SECONDS; }  # a line per step: set-up takes a few minutes

pip_quiet() {  # pip, quiet on success (a line after 5 s without one while it works), full log on failure
  local log pid rc=0 start=$SECONDS
  log=$(mktemp)
  .venv/bin/python -m pip "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if kill -0 "$pid" 2>/dev/null && (( SECONDS - LAST_LINE >= 5 )); then
      say "  ... pip $1 still running ($((SECONDS - start)) s: $(grep -o '^\(Collecting\|Installing\|Building\)[^(]*' "$log" | tail -1 | cut -c1-70))"
    fi
  done
  wait "$pid" || rc=$?
  if (( rc != 0 )); then
    grep -v '^WARNING: Location' "$log" >&2
  fi
  rm -f "$log"
  return "$rc"
}

[ -x .venv/bin/python ] || { say "creating .venv ($PY)"; "$PY" -m venv .venv; }
say "installing pip, torch 2.14.1"
pip_quiet install --upgrade pip
pip_quiet install "torch==2.14.1"
say "installing qpass (editable) with transformers, gptqmodel, peft, optimum, pytest, matplotlib"
pip_quiet install -e ".[test,bench]"
say "installing autoawq 0.2.9 (--no-deps)"
pip_quiet install --no-deps "autoawq==0.2.9"
.venv/bin/python - <<'PY'
import importlib.metadata as md
print("qpass env ready:", ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "gptqmodel", "peft", "autoawq")))
PY
