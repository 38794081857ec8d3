#!/bin/bash
# Session 2, restarted: torch's default 2 threads per run were ~100x slower on the oversubscribed machine
# (OpenMP waits for a descheduled thread); one thread (OMP_NUM_THREADS=1) from here on. Same configs.
# Order: the size axis for dpa/ea, the learning-rate check (docs/ladder.md), then the rest (EA squared).
set -u
cd .
export PYTHONPATH=<a checkout of 9e7582d>/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=python
date -u +"start %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset ladder-verify/presets/4-size.json --out ladder-verify --workers 1
date -u +"done 4-size %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset ladder-lrcheck/preset.json --out ladder-lrcheck --workers 1
date -u +"lrcheck done %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset verify --out ladder-verify --workers 1
date -u +"end %FT%TZ"; uptime
