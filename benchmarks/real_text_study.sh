#!/usr/bin/env bash
# The real-text study of issue #9 in its pre-registered order (docs/real-text.md): every stage is one
# `ea lm` command appending to OUT/<corpus>-<steps>/results.jsonl, so rerunning this script resumes
# where it stopped (finished runs are skipped). Usage: benchmarks/real_text_study.sh [OUT] (default runs/text)
set -euo pipefail
OUT=${1:-runs/text}
PY=${PYTHON:-python}
EA="$PY -m expressive_attention.cli lm --threads 1"
BASE="--kinds dpa,ea --variants saturating,squared,power,exp_squared"  # dpa, ea, ea-squared, ea-power4, ea-exp_squared
GAIN="--kinds dpa,ea --variants exp_squared,saturating --scales learned"  # dpa+gain, ea-exp_squared+gain, ea+gain

summary() {  # $1 folder, $2 python expression over r = the summary's results (label -> best row)
  $PY -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print($2)" "$1/lm_summary.json"
}
labels() { summary "$1" "' '.join(r)"; }
selected_lr() { summary "$1" "r['$2']['lr']"; }  # the lr selected for mechanism $2 (lowest on seed 0)
best_of() {  # the mechanism with the lowest mean: softmax ($2 = dpa) or EA family ($2 = ea)
  summary "$1" "min((k for k in r if k.startswith('dpa') == ('$2' == 'dpa')), key=lambda k: r[k]['mean'])"
}
run_one() {  # $1 corpus, $2 folder, $3 mechanism label, then extra arguments
  local c=$1 out=$2 label=$3 kind variant scale=fixed
  shift 3
  case $label in *+gain) scale=learned; label=${label%+gain};; esac
  case $label in dpa) kind=dpa variant=saturating;; ea) kind=ea variant=saturating;; ea-*) kind=ea variant=${label#ea-};; esac
  $EA --corpus "$c" --kinds $kind --variants $variant --scales $scale --out "$out" "$@"
}

# 1. every mechanism at lr 2e-3, seed 0, on both corpora (300 steps, the default budget); then the learned gains
for c in prose code; do $EA --corpus $c $BASE --lr 2e-3 --seeds 0 --out $OUT/$c-300; done
for c in prose code; do $EA --corpus $c $GAIN --lr 2e-3 --seeds 0 --out $OUT/$c-300; done
# 2. the other learning rates, seed 0
for c in prose code; do
  $EA --corpus $c $BASE --lr 1e-3,4e-3 --seeds 0 --out $OUT/$c-300
  $EA --corpus $c $GAIN --lr 1e-3,4e-3 --seeds 0 --out $OUT/$c-300
done
# 3. seeds 0,1,2 at each mechanism's selected lr
for c in prose code; do
  for label in $(labels $OUT/$c-300); do
    run_one $c $OUT/$c-300 "$label" --lr "$(selected_lr $OUT/$c-300 "$label")" --seeds 0,1,2
  done
done
# 4. the 4x budget (1200 steps) for the best softmax and the best EA-family mechanism, each at its selected lr
for c in prose code; do
  for label in "$(best_of $OUT/$c-300 dpa)" "$(best_of $OUT/$c-300 ea)"; do
    run_one $c $OUT/$c-1200 "$label" --lr "$(selected_lr $OUT/$c-300 "$label")" --seeds 0,1,2 --steps 1200 --eval-every 100
  done
done
# 5. the paper's EA and EA squared (the issue names them at both budgets) at 1200 steps, each at its selected lr
for c in prose code; do
  for label in ea ea-squared; do
    run_one $c $OUT/$c-1200 "$label" --lr "$(selected_lr $OUT/$c-300 "$label")" --seeds 0,1,2 --steps 1200 --eval-every 100
  done
done
