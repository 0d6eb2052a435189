#!/usr/bin/env bash
# CPU of `python -c pass` in the bench's venv (pip install -e: setuptools' import finder, run
# by a .pth at every start) and with that .pth replaced by a plain path entry, as a non-editable
# install would be. Run from the checkout; puts the .pth back.
set -euo pipefail
SP=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
PTH=$(ls "$SP"/__editable__.nbdgw-*.pth)
stat() { perf stat -r 60 -x, -e task-clock "$@" 2>&1 >/dev/null | grep task-clock | cut -d, -f1; }
for round in 1 2 3; do
    echo "round $round: editable finder: $(stat .venv/bin/python -c pass) ms"
    mv "$PTH" "$PTH.off"
    echo "$PWD" > "$SP/zz-plain-path.pth"
    echo "round $round: plain path .pth: $(stat .venv/bin/python -c pass) ms"
    rm "$SP/zz-plain-path.pth"
    mv "$PTH.off" "$PTH"
done
cat /proc/loadavg
