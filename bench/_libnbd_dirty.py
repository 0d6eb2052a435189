"""Dirty every other granule of an NBD export with pipelined WRITE_ZEROES (fixture builder).

Run by the system python with python3-libnbd on its path (not the project venv): qemu-io issues
one command at a time (about 4,000 a second), while a pipelined NBD client lets qemu-nbd take
tens of thousands a second, so a bitmap with millions of extents takes seconds, not half an hour.

usage: _libnbd_dirty.py URI GRANULE COUNT
"""

import sys

import nbd


def _retire(error: object) -> int:
    return 1


def main() -> None:
    uri, granule, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    h = nbd.NBD()
    h.connect_uri(uri)
    in_flight_max = 64
    sent = 0
    while sent < count or h.aio_in_flight() > 0:
        while sent < count and h.aio_in_flight() < in_flight_max:
            # Granule 2*i: dirty; 2*i+1 stays clean, so each granule is its own extent.
            # A completion callback returning 1 retires the command by itself.
            h.aio_zero(granule, 2 * sent * granule, completion=_retire)
            sent += 1
        h.poll(-1)
    h.flush()
    h.shutdown()


if __name__ == "__main__":
    main()
