"""An OpenAI-compatible gateway in front of one :class:`trio_llm.Client`.

Many apps call one gateway process, which enforces one concurrency cap, one rate limit and
one retry policy towards the upstream provider::

    async with open_client(base_url=UPSTREAM, model="gpt-4o-mini") as client:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(serve, client, port=8000))

Needs the ``serve`` extra (``pip install 'trio-llm[serve]'``: FastAPI and Hypercorn).
Command line: ``trio-llm serve --upstream URL``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import GenerationRecord as GenerationRecord
    from ._app import create_app as create_app
    from ._runner import serve as serve

__all__ = ["GenerationRecord", "create_app", "serve"]

_HOMES = {"GenerationRecord": "._app", "create_app": "._app", "serve": "._runner"}


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `trio-llm --help` (which loads the `serve` command's
    # flags from this package) works without the optional FastAPI and Hypercorn.
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value
