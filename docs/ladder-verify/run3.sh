#!/bin/bash
# Session 2: the rest of the verify sweep, one worker (the other core runs the real-text study):
# size axis for dpa/ea first (phase 4), then the full preset (what is left: ea-squared). Frozen code 9e7582d.
set -u
cd .
export PYTHONPATH=<a checkout of 9e7582d>/src
PY=python
OUT=runs/ladder-verify
date -u +"start %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset $OUT/presets/4-size.json --out $OUT --workers 1
date -u +"done 4-size %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset verify --out $OUT --workers 1
date -u +"end %FT%TZ"; uptime
