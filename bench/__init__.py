"""Benchmark of backend_common workers vs Dynamo's own behind the real frontend.

Run it with ``python -m bench`` (``make bench``); see ``bench/__main__.py``.
"""

import sys
from pathlib import Path

# The runtime under test has one source, inside the template; it is not an installed
# package of this repository, so `python -m bench` puts it on the path itself.
_RUNTIME_SRC = str(Path(__file__).resolve().parent.parent / "template" / "src")
if _RUNTIME_SRC not in sys.path:
    sys.path.insert(0, _RUNTIME_SRC)
