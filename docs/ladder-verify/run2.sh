#!/bin/bash
# The verify sweep in phases (same configs as `--preset verify`, another order, so that the budget
# question for DPA vs EA-saturating is answered first on a loaded machine): frozen code 9e7582d.
set -u
cd .
export PYTHONPATH=<a checkout of 9e7582d>/src
PY=python
OUT=runs/ladder-verify
date -u +"start %FT%TZ"; uptime
for ph in 1-pointer-budget 2-lagged-budget 3-recall-budget 4-size; do
  $PY -m expressive_attention.cli ladder --preset $OUT/presets/$ph.json --out $OUT --workers 2
  date -u +"done $ph %FT%TZ"; uptime
done
$PY -m expressive_attention.cli ladder --preset verify --out $OUT --workers 2   # the rest: ea-squared
date -u +"end %FT%TZ"; uptime
