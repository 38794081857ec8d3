#!/bin/bash
# After phase 4-size of run3.sh: stop run3 (it would go on with EA squared), run the learning-rate check
# (docs/ladder.md), then the rest of the verify preset (EA squared). Finished runs are never lost.
set -u
cd .
until grep -q "done 4-size" ladder-verify/sweep3.log; do sleep 5; done
R3=$(pgrep -f "ladder-verify/run3.sh")
for p in $R3; do pkill -TERM -P $p; kill $p; done
sleep 5
export PYTHONPATH=<a checkout of 9e7582d>/src
PY=python
date -u +"lrcheck start %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset ladder-lrcheck/preset.json --out ladder-lrcheck --workers 1
date -u +"lrcheck done %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset verify --out ladder-verify --workers 1
date -u +"end %FT%TZ"; uptime
