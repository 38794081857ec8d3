#!/bin/bash
# Session 3, stream 2 (one thread): the rest of the verify preset (EA squared, 33 runs; same configs, same frozen code),
# then the real-text code stage 4 (labels fixed by stream 1 in text/stage4.txt after its stage C).
set -u
cd .
export PYTHONPATH=<a checkout of 9e7582d>/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=python
date -u +"start %FT%TZ"; uptime
$PY -m expressive_attention.cli ladder --preset verify --out ladder-verify --workers 1
date -u +"ladder end %FT%TZ"; uptime
while [ ! -f text/stage4.txt ]; do sleep 30; done
cd <a checkout of 873a1bd>
export PYTHONPATH=<a checkout of 873a1bd>/src
grep '^code ' runs/text/stage4.txt | while read c l lr; do
  scale=fixed; m=$l; case $m in *+gain) scale=learned; m=${m%+gain};; esac
  case $m in dpa) kind=dpa variant=saturating;; ea) kind=ea variant=saturating;; ea-*) kind=ea variant=${m#ea-};; esac
  $PY -m expressive_attention.cli lm --threads 1 --corpus code --kinds $kind --variants $variant --scales $scale --out runs/text/code-1200 --lr $lr --seeds 0,1,2 --steps 1200 --eval-every 100
done
date -u +"end %FT%TZ"; uptime
