#!/bin/bash
# usage: run.sh TREE PORT [N] [worker args...]; needs qemu-nbd on /tmp/exp/q.sock
TREE=$1; PORT=$2; N=${3:-3}; shift 3
cd $TREE
PY=/work/main/.venv/bin/python
if ! ss -ltn | grep -q ":$PORT "; then
  PYTHONPATH=$TREE $PY -m gateway serve --listen 127.0.0.1:$PORT --export "disk=nbd+unix:///disk?socket=/tmp/exp/q.sock" --data-dir /tmp/exp/gw-$PORT > /tmp/exp/gw-$PORT.log 2>&1 &
  echo $! > /tmp/exp/gw-$PORT.pid
  sleep 2
fi
GPID=$(cat /tmp/exp/gw-$PORT.pid)
for i in $(seq $N); do
  g0=$(awk '{print $14+$15}' /proc/$GPID/stat); q0=$(awk '{print $14+$15}' /proc/$(pgrep -f "q.sock" | head -1)/stat)
  out=$(PYTHONPATH=$TREE $PY -m bench.workers stream-extents 127.0.0.1:$PORT --context base:allocation --include-data "$@")
  g1=$(awk '{print $14+$15}' /proc/$GPID/stat); q1=$(awk '{print $14+$15}' /proc/$(pgrep -f "q.sock" | head -1)/stat)
  echo "$TREE $out gw_cpu=$((g1-g0))cs qemu_cpu=$((q1-q0))cs"
done
