#!/usr/bin/env bash
# Issue #21's study, stage 1 (docs/levers.md, pre-registered): writes the queue QUEUE/jobs for
# benchmarks/levers/worker.sh: line 1 the ladder stage (ladder_stage.sh, one worker, one thread), then the
# text screen: every mechanism at 300 steps, seed 0, on both corpora, lr 2e-3 first, then 4e-3, then 1e-3.
# Every line is one `ea` command; outputs under OUT (default runs/levers).
#   benchmarks/levers/stage1.sh QUEUE [OUT]
set -euo pipefail
Q=${1:?usage: stage1.sh QUEUE_DIR [OUT]}
OUT=${2:-runs/levers}
mkdir -p "$Q"
here=$(cd "$(dirname "$0")" && pwd)
MECHANISMS=(
    "--kinds dpa"                                                        # S0 dpa
    "--kinds dpa --gate on"                                              # S1 dpa+gate
    "--kinds ea --variants power4"                                       # C1 ea-power4
    "--kinds ea --variants power6"                                       # C2 ea-power6
    "--kinds ea --variants power8"                                       # C3 ea-power8
    "--kinds ea --variants exp_squared --scales learned@-1.1513"         # C4 ea-exp_squared+gain@-1.1513
    "--kinds ea --variants exp_odd"                                      # C5 ea-exp_odd (the odd control)
    "--kinds ea --variants saturating --gate on"                         # C6 ea+gate
    "--kinds ea --variants exp_squared --gate on"                        # C7 ea-exp_squared+gate
    "--kinds ea --variants saturating --ea-heads 2"                      # C8 ea[h2]
    "--kinds ea --variants saturating --layer-kinds first"               # C9 ea[first]
)
{
    echo "!OUT=$OUT bash $here/ladder_stage.sh"
    for lr in 2e-3 4e-3 1e-3; do
        for c in prose code; do
            for m in "${MECHANISMS[@]}"; do
                echo "lm --threads 1 --corpus $c --lr $lr --seeds 0 --steps 300 --out $OUT/$c-300 $m"
            done
        done
    done
} > "$Q/jobs"
wc -l < "$Q/jobs"
