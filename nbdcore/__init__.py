"""nbdcore: a pure-Python NBD library.

A sans-I/O protocol core (bytes in, events out) for both roles, thin asyncio layers over it
(``nbdcore.aio``), and disk and bitmap storage for the server (``nbdcore.storage``).
"""
