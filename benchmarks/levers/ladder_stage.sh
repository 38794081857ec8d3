#!/usr/bin/env bash
# Issue #21's ladder stage (docs/levers.md): the verify preset's rungs (pointer T=16, lagged_digits N=5,
# recall K=2) at its base point (1x budget: 450 steps, d_model 64), 3 seeds, every mechanism of the study,
# one after another into one folder (a ladder sweep holds its --out: one command at a time).
set -euo pipefail
OUT=${OUT:-runs/levers}
PY=${PY:-python}
L="--preset verify --axes none --seeds 3 --out $OUT/ladder --workers 1 --threads 1 --no-checkpoints"
ea() { $PY -m expressive_attention.cli "$@"; }
ea ladder $L --kinds dpa,ea --variants saturating,exp_squared --gate off,on   # dpa, dpa+gate, ea, ea+gate, ea-exp_squared(+gate)
ea ladder $L --kinds dpa,ea --variants saturating --ea-heads 2                # ea[h2]
ea ladder $L --kinds dpa,ea --variants saturating --layer-kinds first         # ea[first] (dpa-ea on the 2-layer model)
ea ladder $L --kinds dpa,ea --variants exp_squared --scales learned@-1.1513   # ea-exp_squared+gain@-1.1513
ea ladder $L --kinds dpa,ea --variants power4,power6,power8                   # ea-power4/6/8
ea ladder $L --kinds dpa,ea --variants exp_odd                                # the odd control
