#!/usr/bin/env bash
# Session 3, end: EA squared to 3 seeds at its selected lr on both corpora (the issue names it in the study);
# stage 2 (lrs 1e-3, 4e-3, seed 0) on code first. Two streams, one per corpus folder, one thread each.
set -uo pipefail
cd <a checkout of 873a1bd>
export PYTHONPATH=<a checkout of 873a1bd>/src
PY=python
OUT=runs/text
EA="$PY -m expressive_attention.cli lm --threads 1"
sel() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['results']['ea-squared']['lr'])" $OUT/$1-300/lm_summary.json; }
date -u +"start %FT%TZ"
( $EA --corpus prose --kinds ea --variants squared --lr "$(sel prose)" --seeds 0,1,2 --out $OUT/prose-300 > $OUT/sq-prose.log 2>&1 ) &
( $EA --corpus code --kinds ea --variants squared --lr 1e-3,4e-3 --seeds 0 --out $OUT/code-300 > $OUT/sq-code.log 2>&1
  $EA --corpus code --kinds ea --variants squared --lr "$(sel code)" --seeds 0,1,2 --out $OUT/code-300 >> $OUT/sq-code.log 2>&1 ) &
wait
date -u +"end %FT%TZ"
