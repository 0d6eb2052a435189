import collections,sys
tot=collections.Counter(); self_=collections.Counter(); n=0
for line in open(sys.argv[1]):
    stack,_,c=line.rpartition(' '); c=int(c); n+=c
    frames=stack.split(';')
    self_[frames[-1]]+=c
    for f in set(frames): tot[f]+=c
print(n)
for f,c in self_.most_common(25): print(f"{c/n:6.1%} {f[:150]}")
print("--- cumulative")
for f,c in tot.most_common(40): print(f"{c/n:6.1%} {f[:150]}")
