"""Blocking I/O layers over the sans-I/O protocol core (see nbdcore.sync.client)."""
