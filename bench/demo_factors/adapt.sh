#!/bin/bash
# The demo's adaptation line (no --lr, no --rules: give them) from a backbone run, from the repository root:
#   BACKBONE=dir bench/demo_factors/adapt.sh NAME [extra train args...]     env: RUNS=dir
# BACKBONE: a 3,000-step backbone run directory (default demo/backbone). Writes RUNS/NAME and RUNS/NAME.log;
# RUNS defaults to bench/out/demo-factors.
set -euo pipefail
name=${1:?usage: BACKBONE=dir bench/demo_factors/adapt.sh NAME [train options]}; shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1
RUNS=${RUNS:-bench/out/demo-factors}; mkdir -p "$RUNS"; rm -rf "${RUNS:?}/$name"
/usr/bin/time -f "wall %e s" .venv/bin/vlpet-fx train --out "$RUNS/$name" --init-from "${BACKBONE:-demo/backbone}" --source fashion-mnist --steps 1500 --train-per-task 1500 --eval-per-task 100 --eval-every 500 --save-every 500 "$@" > "$RUNS/$name.log" 2>&1
