"""Progress bars with an ETA on stderr (tqdm), for the long loops: sensitivity and block passes,
evaluation windows, generated tokens.

Quiet when stderr is not a terminal (logs, CI, pipes): tqdm's ``disable=None``. ``CMPQ_PROGRESS=0``
turns them off everywhere; ``enabled=False`` turns one off (e.g. generation while its text streams
to the same terminal). Bars do not stay on screen once done (``leave=False``): the log lines that
follow say what happened.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> tqdm:
    """A bar over ``total`` steps; call ``update(n)`` and ``close()`` (or use it as a context manager)."""
    off = not enabled or os.environ.get("CMPQ_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=True if off else None)
