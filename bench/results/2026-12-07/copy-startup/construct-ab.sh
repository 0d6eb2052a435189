#!/bin/sh
# construct.py from two checkouts, alternating: construct-ab.sh OLD NEW ROUNDS
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
i=0
while [ "$i" -lt "$3" ]; do
    for t in "$1" "$2"; do
        echo "== $t"
        PYTHONPATH="$t" "$py" "$here/construct.py"
    done
    i=$((i + 1))
done
