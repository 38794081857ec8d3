#!/usr/bin/env bash
# A queue worker for issue #21's study (docs/levers.md). QUEUE/jobs holds one `ea` command line a line
# (without the leading `ea`, e.g. `lm --threads 1 --corpus prose --kinds dpa --lr 2e-3 --seeds 0 --out OUT`);
# each worker claims the next line not yet claimed (QUEUE/claimed, a line count, under flock), runs it from
# the current directory with $PY -m expressive_attention.cli, and logs start, end and exit status to
# QUEUE/log. A line starting with "!" is a shell command instead (run with bash). Several workers share a queue; lines may be appended while they run. Every `ea lm` / `ea ladder`
# call skips the runs its --out already holds, so rerunning a queue from line 1 resumes it.
#
#   benchmarks/levers/worker.sh QUEUE     (PY defaults to python; run two of them on two cores)
set -uo pipefail
Q=${1:?usage: worker.sh QUEUE_DIR}
PY=${PY:-python}
export OMP_NUM_THREADS=1
touch "$Q/claimed" "$Q/log"
while true; do
    n=$(flock "$Q/claimed" bash -c '
        n=$(cat "$1"); n=${n:-0}; total=$(grep -c . "$2" || true)
        if [ "$n" -lt "$total" ]; then echo $((n + 1)) > "$1"; echo $((n + 1)); fi' _ "$Q/claimed" "$Q/jobs")
    [ -z "$n" ] && break
    line=$(grep . "$Q/jobs" | sed -n "${n}p")
    echo "$(date -u +%FT%TZ) start $n: ea $line" >> "$Q/log"
    t0=$(date +%s)
    if [ "${line:0:1}" = "!" ]; then
        PY=$PY bash -c "${line:1}" < /dev/null > "$Q/out-$n.txt" 2>&1
    else
        # shellcheck disable=SC2086  # the line is a command line: word splitting is what we want
        $PY -m expressive_attention.cli $line < /dev/null > "$Q/out-$n.txt" 2>&1
    fi
    status=$?
    echo "$(date -u +%FT%TZ) end $n: status $status, $(( $(date +%s) - t0 )) s" >> "$Q/log"
done
