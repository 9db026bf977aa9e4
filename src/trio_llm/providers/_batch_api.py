"""The providers' Batch APIs, behind one small protocol: submit, find, poll, cancel, results.

A batch job (``run_batch(..., via="provider")``, ``batch/_via_provider.py``) speaks to a
:class:`BatchAPI`; each provider's wire format is its own module (``_openai_batch``,
``_anthropic_batch``). What comes back is neutral: a :class:`RemoteBatch` for a batch's
state, a :class:`ResultLine` for each request's outcome. Every HTTP call goes through the
client's one request lifecycle (``Client._api_call``): its connections, headers, retries,
deadline scope and error mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import attrs

from .. import _json
from .._errors import APIResponseError, ConfigurationError, parse_retry_after
from .._types import Usage

if TYPE_CHECKING:
    from .._attempt import Exchange
    from .._client import Client

__all__ = [
    "BatchAPI",
    "FileUploads",
    "RemoteBatch",
    "ResultLine",
    "batch_api_for",
    "json_reply",
    "json_reply_and_wait",
    "keep_open",
    "stream_lines",
]

#: What a job's metadata calls the job and the part (OpenAI keeps it on the batch).
JOB_KEY: Final = "trio_llm_job"
PART_KEY: Final = "trio_llm_part"

#: How far before the time a create began a listing is read back: the clocks of this
#: machine and of the provider may differ.
CLOCK_SKEW: Final = 600.0

_NO_USAGE: Final = Usage()


@final
@attrs.frozen(kw_only=True)
class RemoteBatch:
    """A batch at the provider, as the job needs to know it.

    Attributes:
        id: the provider's id (``batch_...``, ``msgbatch_...``).
        status: the provider's own word (OpenAI: ``validating``, ``in_progress``,
            ``finalizing``, ``completed``, ...; Anthropic: ``in_progress``, ``canceling``,
            ``ended``).
        ended: processing is over (completed, failed, expired, cancelled): its results,
            if any, can be fetched.
        outcome: for an ended batch, how: ``completed``, ``failed``, ``expired`` or
            ``cancelled``; ``None`` before.
        total: requests in the batch (0 while the provider has not counted them).
        done: requests processed so far, failed ones included.
        failed: requests that ended in an error (errored, expired, cancelled).
        created_at: when the provider created it (Unix time).
        results: where its results are: OpenAI's output and error file ids, or
            Anthropic's results URL.
        errors: why a batch ``failed`` as a whole (validation), one message each.
        metadata: its metadata (OpenAI), or empty.
        input_file_id: the uploaded input file (OpenAI), or ``None``.
    """

    id: str
    status: str
    ended: bool
    outcome: str | None = None
    total: int = 0
    done: int = 0
    failed: int = 0
    created_at: float = 0.0
    results: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    input_file_id: str | None = None


@final
@attrs.frozen(kw_only=True)
class ResultLine:
    """One request's outcome in a batch's results.

    Either the request got an HTTP answer (``status_code``, its ``body``: a reply or an
    error body), or it never ran (``error_code`` and ``error_message``: expired,
    cancelled, ...).
    """

    custom_id: str
    status_code: int | None = None
    body: Any = None
    request_id: str | None = None
    usage: Usage = _NO_USAGE
    error_code: str | None = None
    error_message: str | None = None


class FileUploads(Protocol):
    """A provider's file store, for Batch APIs whose batches name an uploaded file."""

    async def upload(self, name: str, lines: list[bytes]) -> str:
        """Upload ``lines`` as a file called ``name``; return its id."""
        ...

    async def find_upload(self, name: str, size: int, since: float) -> str | None:
        """Return the id of a file called ``name`` of ``size`` bytes uploaded after ``since``."""
        ...


class BatchAPI(Protocol):
    """One provider's Batch API. Methods that call the provider raise ``LLMError``\\ s.

    A job creates each batch in steps, recording its intent before each one, so that a
    process killed in between can find what it created (:meth:`FileUploads.find_upload`,
    :meth:`find_created`) instead of creating it twice.
    """

    @property
    def name(self) -> str:
        """The provider's name (``openai``, ``anthropic``)."""
        ...

    @property
    def max_lines(self) -> int:
        """The most requests one batch may hold (the provider's limit)."""
        ...

    @property
    def max_bytes(self) -> int:
        """The most bytes one batch may hold (the provider's limit)."""
        ...

    @property
    def files(self) -> FileUploads | None:
        """Where the lines are uploaded as a file before the batch is created; ``None``
        when the create request carries them itself."""
        ...

    def check_custom_id(self, custom_id: str) -> str | None:
        """Return why the API refuses ``custom_id``, or ``None``."""
        ...

    def group(self, url: str, model: str) -> tuple[str, str]:
        """Return the key of the lines that may share a batch (OpenAI: url and model)."""
        ...

    def line(self, custom_id: str, url: str, body: Mapping[str, Any]) -> bytes:
        """Return one request of a batch, encoded (a JSONL line, or a ``requests`` item)."""
        ...

    async def create(
        self, *, file_id: str | None, lines: list[bytes], url: str, metadata: Mapping[str, str]
    ) -> RemoteBatch:
        """Create a batch of ``lines`` (or of the uploaded file ``file_id``), in one attempt.

        Never retried here: a create whose answer was lost may have made the batch, so the
        caller looks for it (:meth:`find_created`) before creating it again.
        """
        ...

    async def find_created(
        self,
        *,
        metadata: Mapping[str, str],
        file_id: str | None,
        count: int,
        since: float,
        known: frozenset[str],
    ) -> RemoteBatch | None:
        """Find a batch created after ``since`` whose creation's answer was never read.

        OpenAI: by its metadata or its input file; Anthropic, whose batches carry no
        metadata: the earliest created after ``since`` holding ``count`` requests, not
        one of ``known``.
        """
        ...

    async def retrieve(self, batch_id: str) -> tuple[RemoteBatch, float | None]:
        """Return the batch's state, and the wait its ``Retry-After`` asks for, if any."""
        ...

    async def cancel(self, batch_id: str) -> RemoteBatch:
        """Ask the provider to cancel the batch; return its state."""
        ...

    async def results(self, batch: RemoteBatch, sink: Callable[[ResultLine], None]) -> None:
        """Read every result of an ended batch, in the provider's order, into ``sink``.

        Cancellation: the download stops; ``sink`` has had the lines read so far.
        """
        ...


async def json_reply(exchange: Exchange) -> dict[str, Any]:
    """Read a JSON object reply (a ``read`` for ``Client._api_call``)."""
    payload = await exchange.read_json()
    exchange.finish_api_call()
    return payload


async def json_reply_and_wait(exchange: Exchange) -> tuple[dict[str, Any], float | None]:
    """Read a JSON object reply, and the wait its ``Retry-After`` asks for (a poll's)."""
    retry_after = parse_retry_after(exchange.headers)
    return await json_reply(exchange), retry_after


async def keep_open(exchange: Exchange) -> Exchange:
    """Keep the exchange open: its body is read by :func:`stream_lines`."""
    return exchange


async def stream_lines(
    client: Client,
    url: str,
    on_line: Callable[[bytes], None],
    *,
    max_line: int,
) -> None:
    """Download ``url`` and hand each non-blank line of its body to ``on_line``.

    The body is read as it arrives, so a results file of any size takes O(one line) of
    memory. The retry policy applies until the response starts (no deadline: a large
    file takes its time); a failure later raises, and the caller may download again.

    Raises:
        APIResponseError: a line is longer than ``max_line`` bytes.
        APIConnectionError: the connection failed before the end.

    Cancellation: the connection is closed; ``on_line`` has had the lines read so far.
    """
    exchange = await client._api_call("GET", url, keep_open, download=True, no_deadline=True)
    try:
        pending = b""
        while data := await exchange.receive_some():
            pending += data
            lines = pending.split(b"\n") if b"\n" in data else [pending]
            pending = lines.pop()  # the start of a line not whole yet
            for line in (*lines, pending):
                if len(line) > max_line:
                    raise exchange.bad_reply(f"has a line longer than {max_line:,} bytes")
            for line in lines:
                if line.strip():
                    on_line(line)
        if pending.strip():
            on_line(pending)
        exchange.finish_api_call()
    finally:
        await exchange.aclose()


def parse_result(line: bytes, parse: Callable[[dict[str, Any]], ResultLine]) -> ResultLine:
    """Decode one results line with ``parse``.

    Raises:
        APIResponseError: it is not a results line.
    """
    try:
        record = _json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
            raise ValueError("no custom_id")
        return parse(record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise APIResponseError(
            f"a batch results line is not what the API writes ({exc}): {line[:200]!r}",
            status_code=200,
            request_id=None,
        ) from None


def batch_api_for(client: Client) -> BatchAPI:
    """Return the Batch API of the client's provider.

    Raises:
        ConfigurationError: the provider has no Batch API trio-llm speaks.
    """
    from ._anthropic_batch import AnthropicBatchAPI
    from ._openai_batch import OpenAIBatchAPI

    apis: dict[str, Callable[[Client], BatchAPI]] = {
        "openai": OpenAIBatchAPI,
        "anthropic": AnthropicBatchAPI,
    }
    make = apis.get(client._provider.name)
    if make is None:  # pragma: no cover - every registered provider has one
        raise ConfigurationError(f"provider {client._provider.name!r} has no Batch API")
    return make(client)
