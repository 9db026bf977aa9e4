"""Bounded fan-out: run an async function over many items, at most ``limit`` at a time.

Usable without a client. One engine serves every shape (:class:`Workers`): a fixed set
of at most ``limit`` worker tasks, each pulling the next ``(index, item)`` as soon as it is
free, so the window stays full and memory stays O(limit) whatever the length of the input
(a pending trio task costs ~3.7 KB; spawning one per item up front does not scale, and a
spawn loop that awaits a semaphore for every item falls behind its workers).

- :func:`map_concurrently`: results in input order, fail-fast.
- :func:`as_completed`: ``(index, result)`` pairs in completion order, through a channel.
- :func:`open_task_channel`: the one way tasks feed a channel that a block reads (the
  pattern of trio's ``as_safe_channel``); :func:`as_completed`, a chat stream's reader and
  ``stream_many``'s workers all run through it.
- :func:`capture_errors`: wraps ``fn`` so that each item's exception becomes a
  :class:`~trio_llm.Result` instead of cancelling the rest; compose it with either of the
  above for per-item failure capture.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
)
from itertools import islice
from typing import Generic, NoReturn, TypeVar, final

import trio

from ._types import Result

__all__ = [
    "Worker",
    "Workers",
    "as_completed",
    "capture_errors",
    "map_concurrently",
    "open_owning_nursery",
    "open_task_channel",
]

T = TypeVar("T")
R = TypeVar("R")

# What a worker awaits for each item, and what it closes when it exits.
_Handler = Callable[[int, T], Awaitable[object]]
Worker = tuple[_Handler[T], AbstractContextManager[object]]
_NOTHING_TO_CLOSE: AbstractContextManager[object] = nullcontext()


class _StopFanout(Exception):
    """Raised by a handler to end the whole fan-out quietly: its consumer went away."""


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


@final
class Workers(Generic[T]):
    """The engine: at most ``limit`` worker tasks awaiting a handler for each item.

    Started in the caller's nursery (so the caller's block owns every task and a failure
    comes out as one flat ``ExceptionGroup``). Workers are spawned one per item until
    ``limit`` exist, so a short input never costs more tasks than it has items; then each
    free worker pulls the next item. Items are pulled lazily, never more than ``limit``
    (plus one for an async iterable) ahead of the work; items not yet pulled stay in the
    iterator.
    """

    def __init__(self, new_worker: Callable[[], Worker[T]], limit: int) -> None:
        self._new_worker = new_worker
        self._limit = limit
        self._scopes: list[trio.CancelScope] = []
        self._stopped = False

    def start(
        self,
        nursery: trio.Nursery,
        items: Iterable[T] | AsyncIterable[T],
        *,
        spawner: AbstractContextManager[object] = _NOTHING_TO_CLOSE,
    ) -> None:
        """Start the workers in ``nursery``; close ``spawner`` once no more can start.

        For a sync iterable the first ``limit`` items are pulled here, at once.
        """
        if isinstance(items, AsyncIterable):
            nursery.start_soon(self._produce, nursery, items, spawner)
            return
        # A sync iterator needs no producer task: trio runs one task at a time and
        # ``next()`` never yields, so the workers can share the iterator directly. That
        # saves a channel hop (two scheduler passes) per item and pulls nothing ahead.
        with spawner:
            source = enumerate(items)
            for first in islice(source, self._limit):
                nursery.start_soon(self._sync_worker, *self._new_worker(), first, source)

    def _stop(self) -> None:
        self._stopped = True
        for scope in self._scopes:
            scope.cancel()

    def _cancel_scope(self) -> trio.CancelScope:
        # One scope per task (not per item) lets _stop cancel this fan-out alone, leaving
        # the rest of the caller's nursery (e.g. the as_completed block) running.
        scope = trio.CancelScope()
        if self._stopped:
            scope.cancel()
        self._scopes.append(scope)
        return scope

    async def _sync_worker(
        self,
        handle: _Handler[T],
        resource: AbstractContextManager[object],
        first: tuple[int, T],
        source: Iterable[tuple[int, T]],
    ) -> None:
        with resource, self._cancel_scope():
            try:
                await handle(*first)
                for index, item in source:
                    await handle(index, item)
            except _StopFanout:
                self._stop()

    async def _produce(
        self,
        nursery: trio.Nursery,
        items: AsyncIterable[T],
        spawner: AbstractContextManager[object],
    ) -> None:
        # An async iterator cannot be shared (a second ``__anext__`` while one is suspended
        # raises), so this task iterates it and hands items out through a channel. Sync
        # ``with`` on channels: closing one never blocks, and ``aclose()`` would add a
        # checkpoint that can replace an exception in flight with ``Cancelled``.
        send, receive = trio.open_memory_channel[tuple[int, T]](0)
        with spawner, send, receive, self._cancel_scope():
            index = 0
            workers = 0
            async for item in items:
                if send.statistics().tasks_waiting_receive:
                    # An idle worker is parked in receive(): hand over without a schedule
                    # point here (the worker's wake-up is one already).
                    send.send_nowait((index, item))
                elif workers < self._limit:
                    # Spawn only while no worker is idle: a slow source costs few tasks.
                    handle, resource = self._new_worker()
                    nursery.start_soon(
                        self._async_worker, handle, resource, (index, item), receive.clone()
                    )
                    workers += 1
                else:
                    await send.send((index, item))
                index += 1

    async def _async_worker(
        self,
        handle: _Handler[T],
        resource: AbstractContextManager[object],
        first: tuple[int, T],
        receive: trio.MemoryReceiveChannel[tuple[int, T]],
    ) -> None:
        with resource, receive, self._cancel_scope():
            try:
                await handle(*first)
                async for index, item in receive:
                    await handle(index, item)
            except _StopFanout:
                self._stop()


async def map_concurrently(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: int,
) -> list[R]:
    """Return ``[await fn(item) for item in items]``, running at most ``limit`` at once.

    A fixed set of ``min(limit, len(items))`` worker tasks pulls items as it frees up, so
    the window stays full and ``items`` (a sync or async iterable, of any length) is
    consumed lazily; only the results list grows with the input.

    Fails fast: the first exception cancels every other call, and the nursery's
    ``ExceptionGroup`` propagates as is. It is never unwrapped, since a call that was
    finishing at the same moment may have added a second error; catch with ``except*``.
    To get every item's outcome instead, pass ``capture_errors(fn)``.

    Cancellation cancels every running call and returns nothing; items not yet pulled
    stay in the iterator (an unfinished async generator is the caller's to close, e.g.
    with ``contextlib.aclosing``).

    Args:
        fn: The async function to call on each item.
        items: The inputs, a sync or an async iterable.
        limit: The most calls running at once (at least 1).

    Returns:
        The results, in the order of ``items``.

    Raises:
        ValueError: ``limit`` is less than 1.
        TypeError: ``limit`` is not an int.
        ExceptionGroup: ``fn`` (or iterating ``items``) raised.
    """
    _check_limit(limit)
    results: dict[int, R] = {}

    async def store(index: int, item: T) -> None:
        results[index] = await fn(item)

    workers = Workers(lambda: (store, _NOTHING_TO_CLOSE), limit)
    # A checkpoint even for an empty input, as trio expects of every async function.
    await trio.lowlevel.checkpoint()
    async with trio.open_nursery() as nursery:
        workers.start(nursery, items)
    return [results[index] for index in range(len(results))]


def as_completed(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    *,
    limit: int,
) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[tuple[int, R]]]:
    """Run ``fn`` over ``items`` (at most ``limit`` at once), yielding results as they finish.

    Use as ``async with as_completed(fn, items, limit=8) as results:`` then
    ``async for index, result in results:``; ``index`` is the item's position in ``items``.
    Iteration ends when every item is done. The work runs in a nursery owned by the
    ``async with`` block, and the results travel through a memory channel buffering at
    most ``limit`` of them (a slow consumer pauses the workers; memory stays O(limit)).

    Leaving the block early (``break``, an exception, a cancellation) cancels all the
    remaining calls at once, before the block exits: none keeps running (or billing) after
    it; results already buffered are dropped. An exception raised in the block propagates
    unwrapped, unless a call failed at the same moment (then both come in a group).
    Closing the channel inside the block stops the fan-out (calls running then are
    cancelled) as soon as the next result finds it closed.

    Fails fast: the first exception from ``fn`` (or from iterating ``items``) cancels
    everything and leaves the block with the nursery's ``ExceptionGroup``, never
    unwrapped. For per-item outcomes instead, pass ``capture_errors(fn)``.

    Args:
        fn: The async function to call on each item.
        items: The inputs, a sync or an async iterable; consumed lazily.
        limit: The most calls running at once (at least 1).

    Raises:
        ValueError: ``limit`` is less than 1 (raised at the call, before entering).
        TypeError: ``limit`` is not an int.
        ExceptionGroup: ``fn`` (or iterating ``items``) raised.
    """
    _check_limit(limit)
    return _as_completed(fn, items, limit)


def _as_completed(
    fn: Callable[[T], Awaitable[R]],
    items: Iterable[T] | AsyncIterable[T],
    limit: int,
) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[tuple[int, R]]]:
    def fill(nursery: trio.Nursery, send: trio.MemorySendChannel[tuple[int, R]]) -> None:
        # Each worker sends through its own clone: the stream ends when the last exits.
        def new_worker() -> Worker[T]:
            clone = send.clone()

            async def deliver(index: int, item: T) -> None:
                value = await fn(item)
                try:
                    # Skip send()'s schedule point while the buffer has room: fn's own
                    # awaits are the worker's checkpoints.
                    try:
                        clone.send_nowait((index, value))
                    except trio.WouldBlock:
                        await clone.send((index, value))
                except trio.BrokenResourceError:
                    # The block closed the channel: nobody wants the rest.
                    raise _StopFanout from None

            return deliver, clone

        Workers(new_worker, limit).start(nursery, items, spawner=send)

    return open_task_channel(fill, limit)


@asynccontextmanager
async def open_task_channel(
    fill: Callable[[trio.Nursery, trio.MemorySendChannel[T]], None], buffer: int
) -> AsyncIterator[trio.MemoryReceiveChannel[T]]:
    """Run tasks that feed a channel, inside the block that reads it.

    ``fill(nursery, send)`` starts the tasks in a nursery owned by this block and owns
    ``send``: it closes it, or hands it (or clones of it) to tasks that close theirs when
    done; the channel ends when every clone is closed. The block reads the receive end.

    The pattern of trio's ``as_safe_channel``: the ``yield`` stands for the block's body,
    so no task outlives the ``async with``, and an exception thrown in at the ``yield``
    unwinds through the nursery like any body's (ASYNC119 exempts context managers for
    this reason). Leaving the block, normally or not, cancels the tasks still running
    before the receive end closes, so a task blocked in ``send()`` sees ``Cancelled``, not
    ``BrokenResourceError``. An exception of the block comes out as raised unless a task
    failed at the same moment (then both come in a group); a task's failure comes out as
    the nursery's ``ExceptionGroup``, never unwrapped.

    Cancellation: the tasks are cancelled and the channel closed; buffered items dropped.
    """
    send, receive = trio.open_memory_channel[T](buffer)
    with receive:
        async with open_owning_nursery() as nursery:
            fill(nursery, send)
            yield receive
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_owning_nursery() -> AsyncIterator[trio.Nursery]:
    """Open a nursery for the tasks of an ``async with`` block that it owns.

    For context managers whose tasks serve their block (a channel's feeders, a cache's
    writer): the block's own exception comes out as raised, not wrapped in the
    ``ExceptionGroup`` of one that strict exception groups make of it, unless a task
    failed at the same moment (then both come in a group); a task's failure comes out as
    the nursery's group, never unwrapped. The ``yield`` stands for the block's body
    (ASYNC119 exempts context managers for this reason).
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
    except BaseException as exc:
        # The nursery wraps the body's own exception: give it back as raised when it is
        # the group's only one (the tasks' Cancelled are absorbed). Duck-typed:
        # ``BaseExceptionGroup`` is a builtin only from 3.11.
        inner = getattr(exc, "exceptions", None)
        if (
            body_error is not None
            and isinstance(inner, tuple)
            and len(inner) == 1
            and inner[0] is body_error
        ):
            _raise_saving_context(body_error)
        raise


def _raise_saving_context(exc: BaseException) -> NoReturn:
    # ``raise`` inside an ``except`` block would set the group as the exception's context.
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc


def capture_errors(fn: Callable[[T], Awaitable[R]]) -> Callable[[T], Awaitable[Result[R]]]:
    """Wrap ``fn`` so that an ``Exception`` it raises is returned as a failed ``Result``.

    ``map_concurrently(capture_errors(fn), items, limit=n)`` returns one ``Result`` per
    item, in order, and one item's failure never cancels the others; with
    :func:`as_completed` it gives ``(index, Result)`` pairs. ``BaseException`` (``Cancelled``,
    ``KeyboardInterrupt``) and groups holding one still propagate.
    """

    async def captured(item: T) -> Result[R]:
        try:
            value = await fn(item)
        except Exception as exc:
            return Result(ok=False, error=exc)
        return Result(ok=True, value=value)

    return captured
