#!/bin/bash
# cpu.sh (CPU of the client, the gateway, qemu-nbd) for main's and this branch's backup --full,
# in turn, into /dev/shm (tmpfs: no disk) and /tmp (the disk).
D=$(cd "$(dirname "$0")" && pwd)
for r in 1 2; do
  for out in /dev/shm/speed/out.img /tmp/speed/out.img; do
    echo "main, into $out:"; (cd /work/main && OUT=$out $D/cpu.sh .venv/bin/nbdgw backup --full --target 127.0.0.1:50917 disk $out)
    echo "branch, into $out:"; OUT=$out $D/cpu.sh .venv/bin/nbdgw backup --full --target 127.0.0.1:50917 disk $out
  done
done
