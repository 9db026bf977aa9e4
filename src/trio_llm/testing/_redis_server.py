"""A real ``redis-server`` for tests and benchmarks: a free loopback port, a temporary dir.

Private to trio-llm's own tests (``tests/conftest.py``'s ``redis_server`` fixture) and
benchmarks (``benchmarks/redis_limits.py``). The server keeps nothing on disk (no RDB
snapshots, no AOF) and can be killed and started again on the same port, to test what
clients do when Redis goes away mid-run.

The calls block (a process starting takes a few milliseconds): from trio code, run
:meth:`RedisServer.start` through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, final

__all__ = ["RedisServer", "RedisServerError", "free_port"]

_START_TIMEOUT: Final = 10.0


class RedisServerError(Exception):
    """``redis-server`` is missing or did not start (the message says which, and why)."""


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now (another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    """Whether a Redis on ``127.0.0.1:port`` answers ``PING`` (a refusal is an answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16)[:1] in (b"+", b"-")
    except OSError:
        return False


@final
class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1``, its files in ``directory``.

    Use as a context manager (started on entry, killed on exit), or call :meth:`start`
    and :meth:`kill` to take it away and bring it back on the same port.
    """

    def __init__(
        self, directory: Path, *, executable: str | None = None, args: Sequence[str] = ()
    ) -> None:
        found = shutil.which(executable or "redis-server")
        if found is None:
            raise RedisServerError(
                f"{executable or 'redis-server'} is not installed "
                "(Debian/Ubuntu: apt-get install redis-server)"
            )
        self._executable = found
        self._args = tuple(args)  # more configuration, e.g. ("--requirepass", "pw")
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The server's URL, ``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on its previous port, if it ran before) and wait until it answers.

        Raises:
            RedisServerError: it exited or did not answer within 10 s (the message has
                the end of its log).
        """
        for _ in range(3):
            port = self.port or free_port()
            log = self._directory / f"redis-{port}.log"
            self._process = subprocess.Popen(
                [
                    self._executable,
                    *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(self._directory)),
                    *("--save", "", "--appendonly", "no", "--logfile", str(log)),
                    *self._args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and self._process.poll() is None:
                if _answers(port):
                    self.port = port
                    return
                time.sleep(0.01)
            self.kill()
            if self.port:  # the same port is wanted: no other to try
                break
        tail = log.read_text(errors="replace")[-500:] if log.exists() else "(no log)"
        raise RedisServerError(f"redis-server did not start on port {port}: {tail.strip()}")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: no goodbye to clients), if it runs."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.kill()


def required() -> bool:
    """Whether tests that need Redis must run (``$CI`` set), rather than be skipped."""
    return bool(os.environ.get("CI"))
