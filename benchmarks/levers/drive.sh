#!/usr/bin/env bash
# Keeps issue #21's study moving (docs/levers.md) without a person watching: every minute it appends the
# final stage's jobs to the queue once `study.py select` has its finalists, the size step's once `study.py
# report` has its candidate (each once: QUEUE/final.added, QUEUE/size.added), and keeps WORKERS queue workers
# running while the queue has unclaimed lines (a worker exits when it finds none). Run from the study's
# checkout (the frozen copy), e.g.
#   STUDY=/path/to/main/benchmarks/levers PY=.venv/bin/python WORKERS=2 bash $STUDY/drive.sh runs/levers/queue runs/levers
set -uo pipefail
Q=${1:?usage: drive.sh QUEUE OUT}; OUT=${2:?usage: drive.sh QUEUE OUT}
PY=${PY:-python}; WORKERS=${WORKERS:-2}
STUDY=${STUDY:-$(dirname "$0")}
log() { echo "$(date -u +%FT%TZ) drive: $*" >> "$Q/log"; }
while true; do
    if [ ! -e "$Q/final.added" ] && $PY "$STUDY/study.py" final "$Q" --out "$OUT" > "$Q/final.out" 2>&1; then
        touch "$Q/final.added"; log "final stage appended ($(cat "$Q/final.out"))"
    fi
    if [ -e "$Q/final.added" ] && [ ! -e "$Q/size.added" ] && $PY "$STUDY/study.py" size "$Q" --out "$OUT" > "$Q/size.out" 2>&1; then
        touch "$Q/size.added"; log "size step appended ($(cat "$Q/size.out"))"
    fi
    claimed=$(cat "$Q/claimed" 2>/dev/null); claimed=${claimed:-0}
    total=$(grep -c . "$Q/jobs")
    running=$(pgrep -fc "worker.sh $Q" || true)
    if [ "$claimed" -lt "$total" ] && [ "$running" -lt "$WORKERS" ]; then
        PY=$PY nohup bash "$STUDY/worker.sh" "$Q" > /dev/null 2>&1 &
        log "worker started ($((running + 1)) of $WORKERS)"
    fi
    sleep 60
done
