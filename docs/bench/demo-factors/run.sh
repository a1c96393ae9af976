#!/bin/bash
# usage: run.sh NAME [extra train args...]; env VIS_* passes through
name=$1; shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=1
mkdir -p ${RUNS:-/tmp/d1/runs}; rm -rf ${RUNS:-/tmp/d1/runs}/$name
/usr/bin/time -f "wall %e s" ${PY:-.venv/bin/python} $(dirname "$0")/exp.py train --out ${RUNS:-/tmp/d1/runs}/$name --rules full_finetune --source mnist --steps 1500 --train-per-task 1500 --eval-per-task 100 --eval-every 500 --save-every 500 "$@" > ${RUNS:-/tmp/d1/runs}/$name.log 2>&1
