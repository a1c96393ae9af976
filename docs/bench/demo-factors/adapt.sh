#!/bin/bash
# usage: adapt.sh NAME [extra train args...]: the demo adaptation line (no --lr, no --rules) from BACKBONE (a 3,000-step backbone run dir)
name=$1; shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1
RUNS=${RUNS:-/tmp/d1/runs}; mkdir -p $RUNS; rm -rf $RUNS/$name
/usr/bin/time -f "wall %e s" .venv/bin/vlpet-fx train --out $RUNS/$name --init-from ${BACKBONE:-demo/backbone} --source fashion-mnist --steps 1500 --train-per-task 1500 --eval-per-task 100 --eval-every 500 --save-every 500 "$@" > $RUNS/$name.log 2>&1
