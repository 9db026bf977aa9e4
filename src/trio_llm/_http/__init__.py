"""trio-llm's own HTTP/1.1 transport for httpx2: trio sockets, llhttp, an O(1) keep-alive pool.

Why not httpx2's default transport: its pool rescans every connection each time it assigns
one, so its CPU cost per request grows with the requests in flight (0.7 ms at 64, 4.3 ms at
1,000 on loopback). Here each origin has a pool whose idle connections sit on a LIFO stack:
taking one and giving it back are O(1), whatever the number of connections.

The shape of one exchange::

    TrioTransport.open_response (the one entry: trio-llm's client, and
    handle_async_request, httpx2's interface)                           _transport.py
      ├─ pool: pop an idle connection (closed by the server? expired? drop it, pop again),
      │        or reserve a slot for a new one, or wait (FIFO) for one   _pool.py
      │        to be handed over                                                PoolTimeout
      ├─ connect (TCP, TLS) if needed        _connection.py     ConnectError/ConnectTimeout
      ├─ send the request head and body (pre-formatted; h11 validates it once per URL and
      │        header set, and frames streamed bodies)                  WriteError/WriteTimeout
      ├─ read up to the response head (httptools, else h11:
      │        _parsers.py; its meaning: _head.py)   ReadError/ReadTimeout/RemoteProtocolError
      │    └─ a reused connection that ends before one byte arrives is stale: close it and
      │       send once more on a fresh connection (only if the body is in memory)
      └─ HTTPResponse: read() or receive_some() the body (_body.py: content-length,
         chunked, until close; chunked through llhttp with httptools): to the end, and the
         connection goes back to the pool; close() before the end closes it _response.py

Per-phase timeouts (pool, connect, write, read) are cancel scopes where each phase runs;
a deadline for the whole request is the caller's own cancel scope around it. Low-level
errors become httpx2's at each place I/O happens (``_connection.map_exceptions``). No task
is started per connection, and no background task at all: everything happens in the task
that makes the request. Content decoding (gzip, deflate, ...) is left to httpx2, which does
it from the ``content-encoding`` header. The response parser is httptools (llhttp) when it
is installed and h11 otherwise; ``TRIO_LLM_HTTP_PARSER=h11`` (or ``httptools``) forces one
(``_parsers.py``). Measurements: ``docs/performance.md``.
"""

from ._response import BodyTooLarge as BodyTooLarge
from ._response import HTTPResponse as HTTPResponse
from ._transport import TrioTransport as TrioTransport

__all__ = ["BodyTooLarge", "HTTPResponse", "TrioTransport"]
