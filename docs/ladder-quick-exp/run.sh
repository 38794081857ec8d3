#!/bin/bash
# #9 item 4: the quick ladder with the best EA-family candidate (ea-exp_squared) as the EA kind, against DPA, 3 seeds.
# Main's code (exp_squared on the fused CPU kernel). Started at nice 10 beside the last stage-4 jobs of the real-text study.
cd .
date -u +"start %FT%TZ"; uptime
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/ea ladder --preset quick --kinds dpa,ea --variants exp_squared --seeds 3 --out runs/ladder-quick-exp --workers 2 --threads 1
date -u +"end %FT%TZ"; uptime
