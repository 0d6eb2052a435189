#!/bin/bash
# alternate.sh ROUNDS: nbdcopy, main's `nbdgw backup $EXTRA`, this branch's, in turn. The gateway
# at $TARGET (default 127.0.0.1:50917) serves the qemu-nbd at $SOCK (default /tmp/speed/q.sock);
# outputs go to $OUT and $NC (default /tmp/speed/). "ratio" is nbdcopy's seconds over ours: for
# an incremental, multiply it by dirty/disk bytes (10% for incremental-10pct.qcow2).
cd /work/wt-speed || exit 1
SOCK=${SOCK:-/tmp/speed/q.sock}; TARGET=${TARGET:-127.0.0.1:50917}
OUT=${OUT:-/tmp/speed/out.img}; NC=${NC:-/tmp/speed/nc.raw}
for _ in $(seq "$1"); do
  s=$(date +%s.%N); nbdcopy "nbd+unix:///disk?socket=$SOCK" "$NC"; e=$(date +%s.%N); rm -f "$NC"
  nc=$(echo "$e - $s" | bc)
  s=$(date +%s.%N); (cd /work/main && .venv/bin/nbdgw backup $EXTRA --target "$TARGET" disk "$OUT" >/dev/null); e=$(date +%s.%N); rm -f "$OUT"*
  mn=$(echo "$e - $s" | bc)
  s=$(date +%s.%N); .venv/bin/nbdgw backup $EXTRA --target "$TARGET" disk "$OUT" >/dev/null; e=$(date +%s.%N); rm -f "$OUT"*
  us=$(echo "$e - $s" | bc)
  echo "nbdcopy $nc main $mn ours $us  ratio-main $(echo "scale=2; $nc/$mn" | bc) ratio-ours $(echo "scale=2; $nc/$us" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
done
