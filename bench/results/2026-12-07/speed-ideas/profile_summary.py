"""The summary of a ``py-spy record -f raw`` profile: the frames where samples were taken
(self), then the frames on the stack (cumulative), as shares of all samples."""

import collections
import sys

total: collections.Counter[str] = collections.Counter()
own: collections.Counter[str] = collections.Counter()
samples = 0
with open(sys.argv[1]) as f:
    for line in f:
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
print(samples)
for frame, n in own.most_common(25):
    print(f"{n / samples:6.1%} {frame[:150]}")
print("--- cumulative")
for frame, n in total.most_common(40):
    print(f"{n / samples:6.1%} {frame[:150]}")
