#!/usr/bin/env bash
# Queue worker for stage 4 (1200 steps): takes one job file at a time from queue/todo (under flock), runs that one
# (corpus, mechanism, lr, seed) with `ea lm` into OUT/<corpus>-1200, moves it to queue/done. Two workers share the queue.
set -uo pipefail
cd <a checkout of 873a1bd>
export PYTHONPATH=<a checkout of 873a1bd>/src
PY=python
Q=runs/text/queue; OUT=runs/text
while true; do
  job=$(flock $Q/.lock bash -c "f=\$(ls $Q/todo | head -1); [ -n \"\$f\" ] && mv $Q/todo/\$f $Q/doing/\$f && echo \$f")
  [ -z "$job" ] && break
  read c label lr seed < $Q/doing/$job
  scale=fixed; m=$label; case $m in *+gain) scale=learned; m=${m%+gain};; esac
  case $m in dpa) kind=dpa variant=saturating;; ea) kind=ea variant=saturating;; ea-*) kind=ea variant=${m#ea-};; esac
  date -u +"job $job ($c $label lr $lr seed $seed) start %FT%TZ"
  if $PY -m expressive_attention.cli lm --threads 1 --corpus $c --kinds $kind --variants $variant --scales $scale \
      --out $OUT/$c-1200 --lr $lr --seeds $seed --steps 1200 --eval-every 100; then mv $Q/doing/$job $Q/done/$job
  else mv $Q/doing/$job $Q/failed/$job; fi
  date -u +"job $job end %FT%TZ"
done
