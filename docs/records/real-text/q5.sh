#!/usr/bin/env bash
# Session 4 queue worker (issue #9, the study's remainder): takes one job file at a time from queue/todo
# (under flock) and runs it with `ea lm` (one thread) from the frozen checkout of 873a1bd. A job file holds
# lines "corpus label lr seeds steps"; lr "sel" = the lr selected for that label on seed 0 at 300 steps
# (read when the line runs, so a chain's stage-2 line lands before its stage-3 line). Two workers share the queue.
set -uo pipefail
cd <a checkout of 873a1bd>
export PYTHONPATH=<a checkout of 873a1bd>/src OMP_NUM_THREADS=1
PY=python
Q=runs/text/queue; OUT=runs/text
sel() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][sys.argv[2]]['lr'])" $OUT/$1-300/lm_summary.json "$2"; }
while true; do
  job=$(flock $Q/.lock bash -c "f=\$(ls $Q/todo | head -1); [ -n \"\$f\" ] && mv $Q/todo/\$f $Q/doing/\$f && echo \$f")
  [ -z "$job" ] && break
  ok=1
  while read -r c label lr seeds steps; do
    [ -z "$c" ] && continue
    [ "$lr" = sel ] && lr=$(sel $c $label)
    scale=fixed; m=$label; case $m in *+gain) scale=learned; m=${m%+gain};; esac
    case $m in dpa) kind=dpa variant=saturating;; ea) kind=ea variant=saturating;; ea-*) kind=ea variant=${m#ea-};; esac
    ev=25; [ "$steps" = 1200 ] && ev=100
    date -u +"job $job: $c $label lr $lr seeds $seeds steps $steps start %FT%TZ"
    $PY -m expressive_attention.cli lm --threads 1 --corpus $c --kinds $kind --variants $variant --scales $scale \
        --out $OUT/$c-$steps --lr $lr --seeds $seeds --steps $steps --eval-every $ev < /dev/null || ok=0
  done < $Q/doing/$job
  if [ $ok = 1 ]; then mv $Q/doing/$job $Q/done/$job; else mv $Q/doing/$job $Q/failed/$job; fi
  date -u +"job $job end %FT%TZ"
done
