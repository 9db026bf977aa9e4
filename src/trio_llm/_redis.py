"""The connection to Redis (or Valkey) that shared state goes through: one client, commands.

The client is `coredis <https://coredis.readthedocs.io>`_ (the ``redis`` extra), which
runs on Trio through anyio since its 6.0. It is imported only when a Redis URL is used,
so that ``import trio_llm`` stays fast. trio-llm runs its own retries (a shared limit
waits for Redis within each call's deadline, see ``_ratelimit_redis``), so coredis's
are turned off: a script retried after a connection error that hid its success would
run twice.

While Redis is known to be down (at start, and after a command failed), each try first
opens a plain socket to it, and coredis is asked only once that succeeds: a cheap check
that also keeps coredis (6.9) from leaving six anyio memory streams unclosed for each
connection attempt that fails.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final
from urllib.parse import unquote, urlsplit

import trio

from ._errors import ConfigurationError, redact_url
from ._fanout import open_owning

__all__ = ["COMMAND_TIMEOUT", "RedisConnection", "RedisUnavailable", "open_redis"]

#: Seconds a command may take before Redis counts as unreachable (a healthy one answers
#: in well under a millisecond; a failover or a network partition never answers).
COMMAND_TIMEOUT: Final = 2.0
#: Seconds a new connection may take.
_CONNECT_TIMEOUT: Final = 2.0


class RedisUnavailable(Exception):
    """A command got no answer from Redis: not reachable, too slow, or it refused it.

    Internal: its callers decide what that means (wait and try again, or a public error).

    Attributes:
        maybe_ran: the command was sent and not answered in time: Redis may have it
            (queued while it stalled) and run it later, so sending it again may run it
            twice.
    """

    def __init__(self, message: str, *, maybe_ran: bool = False) -> None:
        super().__init__(message)
        self.maybe_ran = maybe_ran


def _describe(exc: BaseException) -> str:
    """``exc`` in a few words, with its cause's (coredis hides why a connect failed)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


async def _reachable(url: str) -> str | None:
    """Open and close a plain socket to the server at ``url``; return why not, or None."""
    parts = urlsplit(url)
    try:
        with trio.fail_after(_CONNECT_TIMEOUT):
            if parts.scheme == "unix":
                stream: trio.abc.Stream = await trio.open_unix_socket(unquote(parts.path))
            else:
                stream = await trio.open_tcp_stream(
                    parts.hostname or "localhost", parts.port or 6379
                )
    except trio.TooSlowError:
        return f"no connection within {_CONNECT_TIMEOUT:g} s"
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    await stream.aclose()
    return None


@final
class RedisConnection:
    """A connected Redis client, as :func:`open_redis` yields it.

    Attributes:
        url: the server's URL, credentials hidden (for messages).
    """

    __slots__ = ("_address", "_client", "_down", "_errors", "url")

    def __init__(
        self, client: Any, errors: tuple[type[BaseException], ...], url: str, address: str
    ) -> None:
        self._client = client
        self._errors = errors
        self._address = address
        self._down = False
        self.url = url

    def script(self, source: str) -> Any:
        """Register the Lua ``source``; call the result with :meth:`run`."""
        return self._client.register_script(source)

    async def run(self, script: Any, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run a registered script (by its SHA; loaded again after a Redis restart).

        Raises and cancellation: as :meth:`command`.
        """
        return await self._send(script, keys=list(keys), args=list(args))

    async def command(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Send the command of the coredis client's method ``name`` (``"get"``, ``"set"``).

        Raises:
            RedisUnavailable: no answer within :data:`COMMAND_TIMEOUT`, the connection
                failed, or Redis refused the command (the message says which).

        Cancellation: the command may or may not have run; the connection stays usable.
        """
        return await self._send(getattr(self._client, name), *args, **kwargs)

    async def _send(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        failure = ""
        sent = False
        with trio.move_on_after(COMMAND_TIMEOUT) as scope:
            if self._down:
                unreachable = await _reachable(self._address)
                if unreachable is not None:
                    raise RedisUnavailable(unreachable)
            sent = True
            try:
                reply = await function(*args, **kwargs)
            except self._errors as exc:
                failure = _describe(exc)
            else:
                self._down = False
                return reply
        self._down = True
        timed_out = scope.cancel_called
        if timed_out:  # (coredis may turn the cancellation into an error)
            failure = f"no answer within {COMMAND_TIMEOUT:g} s"
        # Raised out here, with no context: the client's traceback holds its connections.
        raise RedisUnavailable(failure, maybe_ran=sent and timed_out)


def _coredis() -> Any:
    try:
        return importlib.import_module("coredis")
    except ImportError:
        raise ConfigurationError(
            "a Redis URL needs the redis extra (the coredis client): pip install 'trio-llm[redis]'"
        ) from None


@asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[RedisConnection]:
    """Connect to the Redis at ``url`` and check that it answers.

    Raises:
        ConfigurationError: the ``redis`` extra is not installed, or ``url`` is not a
            URL coredis accepts.
        RedisUnavailable: Redis did not answer a ``PING`` (raised outside the client's
            task group: a plain exception, not a group).

    Leaving the block closes the connections. Cancellation: the same.
    """
    coredis = _coredis()
    exceptions = importlib.import_module("coredis.exceptions")
    retry = importlib.import_module("coredis.retry")
    errors = (exceptions.RedisError, OSError, TimeoutError)
    shown = redact_url(url)
    unreachable = await _reachable(url)
    if unreachable is not None:
        raise RedisUnavailable(unreachable)
    try:
        # No timeouts of coredis's: ours are cancel scopes around each command.
        client = coredis.Redis.from_url(url, retry_policy=retry.NoRetryPolicy())
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{shown} is not a usable Redis URL: {exc}") from None
    connection = RedisConnection(client, errors, shown, url)
    failure: str | None = None
    async with open_owning(client):  # a block's exception out of its task group as is
        with trio.move_on_after(_CONNECT_TIMEOUT + COMMAND_TIMEOUT) as scope:
            try:
                await client.ping()
            except errors as exc:
                failure = _describe(exc)
        if scope.cancel_called:  # (coredis may turn the cancellation into an error)
            failure = f"no answer within {_CONNECT_TIMEOUT + COMMAND_TIMEOUT:g} s"
        if failure is None:
            yield connection
            return
    # The error's traceback keeps this frame: not the client and what its pool holds.
    del client, connection
    raise RedisUnavailable(failure)
