"""`nbdgw` with an optional os._exit at the end (FAST_EXIT=1), for the os._exit idea:

python ab.py '{"normal": [PY, "exit_ab.py", "nbd", "copy", URI, "null:"],
               "os._exit": ["env", "FAST_EXIT=1", PY, "exit_ab.py", "nbd", "copy", URI, "null:"]}' N
"""

import os
import sys

from gateway.cli import main

rc = main()
if os.environ.get("FAST_EXIT"):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
sys.exit(rc)
