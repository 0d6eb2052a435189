"""Side-by-side benchmarks of nbdgw against nbdcopy, nbdinfo and qemu-nbd: ``python -m bench``.

``harness`` measures and reports, ``fixtures`` builds the cached images, ``procs`` runs peers and
tools, ``suites`` and ``gateway_suites`` say what is compared with what, ``workers`` is our side
(run in a fresh interpreter per measurement).
"""
