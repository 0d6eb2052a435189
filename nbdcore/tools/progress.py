"""The one progress line of every long command (``nbd copy``, ``backup``, ``restore``...).

It counts bytes to do (data to copy, not the disk's size: an incremental backup of a 1 TiB disk
with 2 GiB dirty is 2 GiB of work) and shows what is done, the rate and the time left. When the
amount to do is not known in advance it shows what is done and how far through the disk the
command is. Drawn on stderr at most 5 times a second, and only when asked or when stderr is a
terminal, so pipes and logs get nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """``done`` of ``total`` bytes (``total`` None: unknown), with rate and ETA."""

    def __init__(
        self,
        total: int | None,
        *,
        verb: str = "copied",
        enabled: bool | None = None,
        stream: TextIO | None = None,
        done: int = 0,
        interval: float = 0.2,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.verb = verb
        self.done = done
        self.position: float | None = None  # fraction of the disk walked, when total is unknown
        self.interval = interval
        self._start_done = done  # the rate counts this run's bytes only (a resume starts > 0)
        self._t0 = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int, *, position: float | None = None, force: bool = False) -> None:
        """``done`` bytes so far; ``position``: how far through the disk (0..1), if known."""
        self.done = done
        if position is not None:
            self.position = position
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()
            self._drawn = True

    def line(self, now: float | None = None) -> str:
        elapsed = max((time.monotonic() if now is None else now) - self._t0, 1e-6)
        rate = (self.done - self._start_done) / elapsed
        parts = []
        if self.total:
            pct = 100.0 * min(self.done, self.total) / self.total
            parts.append(f"{human_bytes(self.done)} of {human_bytes(self.total)} {self.verb}")
            parts.append(f"{pct:5.1f}%")
        else:
            parts.append(f"{human_bytes(self.done)} {self.verb}")
            if self.position is not None:
                parts.append(f"at {100.0 * self.position:.1f}% of the disk")
        parts.append(f"{human_bytes(rate)}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {human_duration((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def close(self) -> None:
        """The final line (drawn whatever the interval), then a newline."""
        if self.enabled:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()
