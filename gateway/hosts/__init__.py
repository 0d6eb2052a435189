"""The disk hosts behind the exports, one module per kind: NBD hosts and their connection pools
(:mod:`pool`: qemu-nbd, nbdkit, ``nbdgw nbd serve``, the embedded host) and the point-in-time
snapshots of nbdcore hosts (:mod:`snapshots`)."""
