#!/bin/bash
# alt.sh ROUNDS : alternate nbdcopy, main's backup, ours
cd /work/wt-speed
for i in $(seq $1); do
  s=$(date +%s.%N); nbdcopy "nbd+unix:///disk?socket=/tmp/speed/q.sock" ${NC:-/tmp/speed/nc.raw}; e=$(date +%s.%N); rm -f ${NC:-/tmp/speed/nc.raw}
  nc=$(echo "$e - $s" | bc)
  s=$(date +%s.%N); (cd /work/main && .venv/bin/nbdgw backup ${EXTRA} --target 127.0.0.1:50917 disk ${OUT:-/tmp/speed/out.img} >/dev/null); e=$(date +%s.%N); rm -f ${OUT:-/tmp/speed/out.img}*
  mn=$(echo "$e - $s" | bc)
  s=$(date +%s.%N); .venv/bin/nbdgw backup ${EXTRA} ${OURS} --target 127.0.0.1:50917 disk ${OUT:-/tmp/speed/out.img} >/dev/null; e=$(date +%s.%N); rm -f ${OUT:-/tmp/speed/out.img}*
  us=$(echo "$e - $s" | bc)
  echo "nbdcopy $nc main $mn ours $us  ratio-main $(echo "scale=2; $nc/$mn" | bc) ratio-ours $(echo "scale=2; $nc/$us" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
done
