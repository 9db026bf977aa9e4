"""What the fake server keeps for the Batch APIs: files, batches, route holds, the clock.

Everything lives in memory, per server instance, for the server's lifetime: uploaded files
and the output files of batches are kept whole as ``bytes`` (a 100,000-line file is one
blob, never a list of parsed lines), and batch records hold counters and ids only.

Batches run as tasks in the server's own nursery (``BatchStore.nursery``), so they stop
with the server; their waits are ``trio.sleep`` calls, which a ``MockClock`` skips.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, final
from urllib.parse import parse_qs

import attrs
import trio

from ._types import BadRequest

if TYPE_CHECKING:
    from ._config import FakeLLMConfig

logger = logging.getLogger("trio_llm.testing")

FILES = "/v1/files"
BATCHES = "/v1/batches"
MESSAGE_BATCHES = "/v1/messages/batches"
# Route templates of the Batch APIs (keys of ``requests_by_endpoint``), with their methods.
BATCH_ROUTES: dict[str, tuple[bytes, ...]] = {
    FILES: (b"POST", b"GET"),
    FILES + "/{file_id}": (b"GET",),
    FILES + "/{file_id}/content": (b"GET",),
    BATCHES: (b"POST", b"GET"),
    BATCHES + "/{batch_id}": (b"GET",),
    BATCHES + "/{batch_id}/cancel": (b"POST",),
    MESSAGE_BATCHES: (b"POST", b"GET"),
    MESSAGE_BATCHES + "/{message_batch_id}": (b"GET",),
    MESSAGE_BATCHES + "/{message_batch_id}/results": (b"GET",),
    MESSAGE_BATCHES + "/{message_batch_id}/cancel": (b"POST",),
}
_ID = r"([^/]+)"
_PATTERNS = [
    (re.compile("^" + re.sub(r"\{\w+\}", _ID, template) + "$"), template)
    for template in BATCH_ROUTES
]
# Every route a hold may name.
KNOWN_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/messages", *BATCH_ROUTES}
)
# Lines answered between two checkpoints (and two progress updates) of a batch.
CHUNK_LINES = 500


def match_batch_route(path: str) -> tuple[str, str | None] | None:
    """Return the route template of a Batch API path and the id in it (None: not one)."""
    for pattern, template in _PATTERNS:
        match = pattern.match(path)
        if match:
            return template, match.group(1) if match.groups() else None
    return None


def new_id(prefix: str) -> str:
    """Return a fresh object id such as ``batch_3f2a...``."""
    return prefix + os.urandom(12).hex()


def iter_lines(blob: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (line number from 1, line) for each non-blank line of a JSONL blob."""
    start = 0
    number = 0
    size = len(blob)
    while start < size:
        end = blob.find(b"\n", start)
        if end < 0:
            end = size
        number += 1
        line = blob[start:end]
        if line.strip():
            yield number, line
        start = end + 1


def count_lines(blob: bytes) -> int:
    """Count the non-blank lines of a JSONL blob."""
    return sum(1 for _ in iter_lines(blob))


@attrs.frozen
class BatchRequest:
    """One request to a Batch API route."""

    method: bytes
    path: str
    target: bytes
    headers: Iterable[tuple[bytes, bytes]]
    body: bytes

    @property
    def object_id(self) -> str:
        """The id in the path (``/v1/batches/{batch_id}``)."""
        route = match_batch_route(self.path)
        assert route is not None
        assert route[1] is not None
        return route[1]

    def query(self, name: str) -> str | None:
        """Return one query parameter (the last one given), or None."""
        _, _, query = self.target.partition(b"?")
        values = parse_qs(query.decode("latin-1")).get(name)
        return values[-1] if values else None

    def header(self, name: bytes) -> bytes | None:
        """Return one request header (lowercase name), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def parse_multipart(content_type: bytes | None, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Parse a ``multipart/form-data`` body into {name: (filename, content)}.

    Raises:
        BadRequest: It is not a well-formed multipart body.
    """
    kind, _, params = (content_type or b"").partition(b";")
    if kind.strip().lower() != b"multipart/form-data":
        raise BadRequest("The request must be multipart/form-data (fields 'file' and 'purpose').")
    boundary = b""
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary":
            boundary = value.strip(b'"')
    if not boundary:
        raise BadRequest("The multipart/form-data content type has no boundary.")
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    parts: dict[str, tuple[str | None, bytes]] = {}
    while position >= 0:
        position += len(delimiter)
        if body.startswith(b"--", position):
            return parts
        head_end = body.find(b"\r\n\r\n", position)
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if head_end < 0 or end < 0:
            break
        name, filename = _disposition(body[position:head_end])
        if name is not None:
            parts[name] = (filename, body[head_end + 4 : end])
        position = end + 2
    raise BadRequest("The multipart/form-data body is malformed.")


def _disposition(head: bytes) -> tuple[str | None, str | None]:
    """Return the field name and file name of a part's ``Content-Disposition``."""
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        fields: dict[str, str] = {}
        for param in value.split(b";")[1:]:
            name, _, raw = param.strip().partition(b"=")
            fields[name.decode("latin-1").lower()] = raw.strip(b'"').decode("utf-8", "replace")
        return fields.get("name"), fields.get("filename")
    return None, None


@final
class RouteHold:
    """Answers to one route wait (after their work is done) until ``release()``.

    Get one with ``FakeLLMServer.hold("POST /v1/batches")``. A held request has had its
    effect (the batch exists, the file is stored); only its answer waits, so a test can kill
    a client while the answer is in flight.

    With ``partial`` set, a held answer first sends its head and that share of its body
    (cut after a newline, so a JSONL body gives whole lines), then waits.

    Attributes:
        route: The held route, ``"METHOD /template"``.
        partial: The share of the body sent before waiting (None: nothing is sent).
        waiting: Answers waiting right now.
        arrived: Requests that reached the hold so far.
    """

    def __init__(
        self, route: str, partial: float | None, on_release: Callable[[RouteHold], None]
    ) -> None:
        self.route = route
        self.partial = partial
        self.waiting = 0
        self.arrived = 0
        self._released = trio.Event()
        self._arrival = trio.Event()
        self._on_release = on_release

    async def wait_arrived(self, count: int = 1) -> None:
        """Wait until ``count`` requests in all have reached the hold.

        Cancellation leaves the hold unchanged.
        """
        while self.arrived < count:
            await self._arrival.wait()

    async def pass_through(self) -> None:
        """Wait here until released (the server's side: one call per held answer)."""
        if self._released.is_set():
            return
        self.waiting += 1
        self.arrived += 1
        self._arrival.set()
        self._arrival = trio.Event()
        try:
            await self._released.wait()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        """Let the waiting answers go and stop holding the route."""
        self._released.set()
        self._on_release(self)


@attrs.define
class StoredFile:
    """An uploaded file or a batch's output file, kept whole in memory."""

    id: str
    data: bytes
    filename: str
    purpose: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        """Render the OpenAI file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@attrs.define
class LineFate:
    """What happens to one batch line: answered, refused with a 400, or expired."""

    error: bool = False
    expired: bool = False


class BatchStore:
    """The Batch API state of one fake server: files, batches, holds and the epoch clock."""

    def __init__(self) -> None:
        self.files: dict[str, StoredFile] = {}
        # Both in creation order (lists read them newest first).
        self.batches: dict[str, Any] = {}
        self.message_batches: dict[str, Any] = {}
        self.holds: dict[str, RouteHold] = {}
        self.nursery: trio.Nursery | None = None
        self._wall_start = time.time()
        self._trio_start: float | None = None

    def epoch(self) -> float:
        """Seconds since the Unix epoch, advancing with trio's clock (a MockClock too)."""
        now = trio.current_time()
        if self._trio_start is None:
            self._trio_start = now
        return self._wall_start + (now - self._trio_start)

    def start(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a batch's processing in the server's nursery."""
        assert self.nursery is not None, "the server is not running"
        self.nursery.start_soon(_guarded, fn, *args)

    def add_file(self, data: bytes, filename: str, purpose: str) -> StoredFile:
        """Store a file and return it."""
        stored = StoredFile(new_id("file-"), data, filename, purpose, int(self.epoch()))
        self.files[stored.id] = stored
        return stored

    def hold(self, route: str, partial: float | None = None) -> RouteHold:
        """Hold the answers of ``route`` (``"POST /v1/batches"``) until released."""
        method, _, template = route.partition(" ")
        if method not in ("GET", "POST") or template not in KNOWN_ROUTES:
            raise ValueError(
                f"unknown route {route!r}: expected 'METHOD /template', e.g. 'POST /v1/batches'"
            )
        if route in self.holds:
            raise ValueError(f"{route} is already held")
        if partial is not None and not 0.0 <= partial < 1.0:
            raise ValueError(f"partial must be from 0 to below 1, got {partial!r}")
        hold = RouteHold(route, partial, self._forget)
        self.holds[route] = hold
        return hold

    def _forget(self, hold: RouteHold) -> None:
        if self.holds.get(hold.route) is hold:
            del self.holds[hold.route]


async def _guarded(fn: Callable[..., Awaitable[None]], *args: object) -> None:
    try:
        await fn(*args)
    except Exception:
        # As for a connection: one broken batch must not take the server down.
        logger.exception("fake LLM server: unexpected error while processing a batch")


def rfc3339(epoch: float | None) -> str | None:
    """Render epoch seconds as an RFC 3339 UTC timestamp (Anthropic's format)."""
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def line_fate(config: FakeLLMConfig, custom_id: str, draw: Callable[[], float]) -> LineFate:
    """Decide one batch line's fate from the config's knobs (draws only for set rates)."""
    if custom_id in config.batch_error_ids:
        return LineFate(error=True)
    if config.batch_error_rate and draw() < config.batch_error_rate:
        return LineFate(error=True)
    if config.batch_line_expire_rate and draw() < config.batch_line_expire_rate:
        return LineFate(expired=True)
    return LineFate()


async def sleep_unless(event: trio.Event, seconds: float) -> None:
    """Sleep ``seconds`` (trio time), waking early when ``event`` is set."""
    with trio.move_on_after(seconds):
        await event.wait()
