#!/usr/bin/env bash
# Session 3, stream 1 (one thread). The pre-registered stages of docs/real-text.md, reordered so that the verdict
# (stage 4: the 4x budget for the best softmax and the best EA-family mechanism) lands within this session:
#  A. prose: dpa+gain at its selected lr 4e-3, seeds 1,2 (owed from session 2)
#  B. code, stage 2 for the two mechanisms that could still be the best of their side (dpa+gain, ea-exp_squared+gain)
#  C. code, stage 3 for those two at their selected lr
#  -> stage4.txt: per corpus, the best softmax and the best EA-family mechanism by mean (the script's best_of), and a
#     queue of one job per (corpus, mechanism, seed) that two workers (this stream and the ladder's, when it ends) share
#  D. stage 4 from the queue;  E. everything else in the script's order (finished runs are skipped)
set -euo pipefail
cd <a checkout of 873a1bd>
export PYTHONPATH=<a checkout of 873a1bd>/src
PY=python
OUT=runs/text
EA="$PY -m expressive_attention.cli lm --threads 1"
summary() { $PY -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print($2)" "$1/lm_summary.json"; }
sel() { summary "$OUT/$1-300" "r['$2']['lr']"; }
best_of() { summary "$OUT/$1-300" "min((k for k in r if k.startswith('dpa') == ('$2' == 'dpa')), key=lambda k: r[k]['mean'])"; }
run_one() {  # $1 corpus, $2 folder, $3 label, extra args
  local c=$1 out=$2 label=$3 kind variant scale=fixed; shift 3
  case $label in *+gain) scale=learned; label=${label%+gain};; esac
  case $label in dpa) kind=dpa variant=saturating;; ea) kind=ea variant=saturating;; ea-*) kind=ea variant=${label#ea-};; esac
  $EA --corpus "$c" --kinds $kind --variants $variant --scales $scale --out "$out" "$@"
}
date -u +"start %FT%TZ"
run_one prose $OUT/prose-300 dpa+gain --lr 4e-3 --seeds 0,1,2
date -u +"done A %FT%TZ"
$EA --corpus code --kinds dpa,ea --variants exp_squared,saturating --scales learned --lr 1e-3,4e-3 --seeds 0 --out $OUT/code-300
date -u +"done B %FT%TZ"
for label in dpa+gain ea-exp_squared+gain; do run_one code $OUT/code-300 $label --lr "$(sel code $label)" --seeds 0,1,2; done
date -u +"done C %FT%TZ"
Q=$OUT/queue; mkdir -p $Q/todo $Q/doing $Q/done $Q/failed; : > $OUT/stage4.txt.tmp
for c in prose code; do for side in ea dpa; do l=$(best_of $c $side); echo "$c $l $(sel $c $l)" >> $OUT/stage4.txt.tmp; done; done
n=0; for seed in 0 1 2; do while read c l lr; do n=$((n+1)); echo "$c $l $lr $seed" > $Q/todo/$(printf %02d $n)-$c-$l-s$seed; done < $OUT/stage4.txt.tmp; done
mv $OUT/stage4.txt.tmp $OUT/stage4.txt; cat $OUT/stage4.txt
bash $OUT/q4.sh
date -u +"done D (this worker) %FT%TZ"
PYTHON=$PY bash benchmarks/real_text_study.sh $OUT
date -u +"end %FT%TZ"
