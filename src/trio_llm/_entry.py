"""The ``trio-llm`` command's entry point: light, so a Ctrl-C during start-up is one line.

Importing the command (trio, httpx2, rich, the whole client) takes a noticeable fraction of
a second; a Ctrl-C in that time would otherwise end in a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

_EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-llm`` command (see :func:`trio_llm._cli.main`); return its status."""
    try:
        from ._cli import main as run
    except KeyboardInterrupt:
        print("trio-llm: interrupted", file=sys.stderr, flush=True)
        return _EXIT_INTERRUPTED
    return run(argv)
