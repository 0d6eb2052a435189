#!/bin/bash
# CPU seconds (user+sys) of nbdcopy and of `nbdgw nbd copy` with a few --requests/--connections,
# and qemu-nbd's CPU (centiseconds) for each, reading the 2 GiB data.raw behind qemu-nbd -r.
cd /work/wt-speed || exit 1
U="nbd+unix:///disk?socket=/tmp/speed/q.sock"; Q=$(pgrep -f "k /tmp/speed/q.sock")
for r in 1 2; do
  for cfg in "nbdcopy" "8 2" "16 2" "4 2" "8 1"; do
    q0=$(awk '{print $14+$15}' /proc/$Q/stat)
    if [ "$cfg" = nbdcopy ]; then
      o=$( { /usr/bin/time -f "%e s wall, %U+%S cpu" nbdcopy --connections=2 --threads=2 --requests=64 --request-size=262144 $U null: ; } 2>&1 )
    else
      set -- $cfg
      o=$( { /usr/bin/time -f "%e s wall, %U+%S cpu" .venv/bin/nbdgw nbd copy --requests $1 --connections $2 --no-progress $U null: ; } 2>&1 )
    fi
    q1=$(awk '{print $14+$15}' /proc/$Q/stat)
    echo "requests/connections=$cfg: $o, qemu-nbd $((q1-q0)) cs, load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
