"""Settings and input counting shared by the fuzz tests.

Short by default (CI): ``NBDGW_FUZZ_EXAMPLES`` examples per test (default 40). ``scripts/fuzz
--long`` raises it (default 20000) and prints how many inputs every target was fed.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("NBDGW_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # The long run explores; CI replays the saved failures first like any hypothesis test.
    derandomize=False,
)

TRIED: collections.Counter[str] = collections.Counter()


def tried(target: str, n: int = 1) -> None:
    """Count ``n`` inputs fed to ``target``."""
    TRIED[target] += n


def write_counts() -> None:
    path = os.environ.get("NBDGW_FUZZ_COUNTS")
    if path:
        Path(path).write_text(json.dumps(dict(sorted(TRIED.items())), indent=1))
