#!/bin/bash
# Stream 2 after the verify ladder (pid 7520, started by run6.sh, whose tail was replaced by this): wait for it,
# then work the stage-4 queue of the real-text study (text/q4.sh) with stream 1.
while kill -0 7520 2>/dev/null; do sleep 20; done
date -u +"ladder end %FT%TZ"; uptime
while [ ! -f runs/text/stage4.txt ]; do sleep 30; done
bash runs/text/q4.sh
date -u +"end %FT%TZ"; uptime
