#!/usr/bin/env bash
# Session 2 (after priority.sh stage A): the same pre-registered stages, another order (the candidates first), so that the
# verdict-bearing seeds land before the CPU time of this session runs out; then the full script resumes the rest.
set -euo pipefail
cd <a checkout of 873a1bd>
export PYTHONPATH=<a checkout of 873a1bd>/src
PY=python
OUT=runs/text
EA="$PY -m expressive_attention.cli lm --threads 1"
date -u +"start %FT%TZ"
# A2. prose, stage 3 for the two learned-gain mechanisms that could still be the best (dpa+gain, ea-exp_squared+gain, lr 2e-3)
$EA --corpus prose --kinds dpa --variants saturating --scales learned --lr 2e-3 --seeds 0,1,2 --out $OUT/prose-300
$EA --corpus prose --kinds ea --variants exp_squared --scales learned --lr 2e-3 --seeds 0,1,2 --out $OUT/prose-300
date -u +"done A2 %FT%TZ"
# B. code, stage 2 for the same three
$EA --corpus code --kinds dpa,ea --variants exp_squared,saturating --lr 1e-3,4e-3 --seeds 0 --out $OUT/code-300
date -u +"done B %FT%TZ"
# C. code, stage 3 for the same three at their selected lr (lowest bpb on seed 0 of the three lrs)
sel() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][sys.argv[2]]['lr'])" $OUT/code-300/lm_summary.json "$1"; }
$EA --corpus code --kinds dpa --variants saturating --lr "$(sel dpa)" --seeds 0,1,2 --out $OUT/code-300
$EA --corpus code --kinds ea --variants exp_squared --lr "$(sel ea-exp_squared)" --seeds 0,1,2 --out $OUT/code-300
$EA --corpus code --kinds ea --variants saturating --lr "$(sel ea)" --seeds 0,1,2 --out $OUT/code-300
date -u +"done C %FT%TZ"
# D. everything else in the script's order (finished runs are skipped)
PYTHON=$PY bash benchmarks/real_text_study.sh $OUT
date -u +"end %FT%TZ"
