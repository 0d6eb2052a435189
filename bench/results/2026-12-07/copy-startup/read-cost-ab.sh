#!/bin/sh
# ../gateway-ideas/read-cost.py (CPU per 64 KiB READ of the asyncio client, best of 5) from two
# checkouts, alternating and swapping the order each round: read-cost-ab.sh OLD NEW ROUNDS FILE
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
i=0
while [ "$i" -lt "$3" ]; do
    if [ $((i % 2)) -eq 0 ]; then order="$1 $2"; else order="$2 $1"; fi
    for t in $order; do
        printf '%s ' "$t"
        (cd "$t" && "$py" "$here/../gateway-ideas/read-cost.py" "$4")
    done
    i=$((i + 1))
done
