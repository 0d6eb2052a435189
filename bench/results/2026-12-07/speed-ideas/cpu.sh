#!/bin/bash
# usage: run.sh CMD... ; prints wall, client user/sys, gateway cpu, qemu cpu
GW=$(cat /tmp/speed/gw.pid); Q=$(pgrep -f "k /tmp/speed/q.sock")
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
g0=$(cpu $GW); q0=$(cpu $Q)
/usr/bin/time -f "wall %e user %U sys %S" "$@" 2>&1 | grep -v "^full backup" | tail -2
g1=$(cpu $GW); q1=$(cpu $Q)
echo "gateway cpu $(( (g1-g0) ))cs qemu cpu $(( (q1-q0) ))cs"
rm -rf ${OUT:-/tmp/speed/out.img}*
