#!/bin/bash
# The Makefile's backbone line with ONE factor changed (docs/bench/demo-factors/README.md), from the repository root:
#   bench/demo_factors/run.sh NAME [extra train args...]     env: VIS_* (see exp.py), RUNS=dir, PY=python
# Writes RUNS/NAME (the run) and RUNS/NAME.log; RUNS defaults to bench/out/demo-factors.
set -euo pipefail
name=${1:?usage: bench/demo_factors/run.sh NAME [train options]}; shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1
RUNS=${RUNS:-bench/out/demo-factors}; mkdir -p "$RUNS"; rm -rf "${RUNS:?}/$name"
/usr/bin/time -f "wall %e s" "${PY:-.venv/bin/python}" "$(dirname "$0")/exp.py" train --out "$RUNS/$name" --rules full_finetune --source mnist --steps 1500 --train-per-task 1500 --eval-per-task 100 --eval-every 500 --save-every 500 "$@" > "$RUNS/$name.log" 2>&1
