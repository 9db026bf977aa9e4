"""Every expected failure of chat, serve and fake-server: one line on stderr, a documented status.

Exit statuses (docs/serving.md, docs/howto-testing.md): 1 the work failed (a request, an
address that cannot be listened on), 2 bad usage (a flag, a missing key), 130 interrupted.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

import trio_llm
from trio_llm._cli import build_parser, main
from trio_llm._cli_options import (
    EXIT_ERROR,
    EXIT_USAGE,
    cannot_listen,
)

DEAD_UPSTREAM = "http://127.0.0.1:9/v1"  # loopback: no key needed
REMOTE = "https://llm.example.invalid/v1"
NOT_HERE = "192.0.2.1"  # TEST-NET-1: never an address of this machine
SERVERS = [["fake-server"], ["serve", "--upstream", DEAD_UPSTREAM]]


@contextmanager
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


@pytest.mark.parametrize("command", SERVERS, ids=["fake-server", "serve"])
def test_busy_port_is_one_line_from_the_real_command(command: list[str]) -> None:
    """`python -m trio_llm serve|fake-server` on a busy port: one stderr line, exit 1."""
    with busy_port() as port:
        done = subprocess.run(
            [sys.executable, "-m", "trio_llm", *command, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONWARNINGS": "error"},
            check=False,
        )
    assert done.returncode == EXIT_ERROR
    assert lines(done.stderr) == [
        f"trio-llm {command[0]}: error: cannot listen on 127.0.0.1:{port}: "
        "address already in use; pick another --port, or --port 0 for a free one"
    ]


@pytest.mark.parametrize("command", SERVERS, ids=["fake-server", "serve"])
def test_address_not_on_this_machine_is_one_line(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--host with an address this machine does not have: one line that says so, exit 1."""
    assert main([*command, "--host", NOT_HERE, "--port", "0"]) == EXIT_ERROR
    assert lines(capsys.readouterr().err) == [
        f"trio-llm {command[0]}: error: cannot listen on {NOT_HERE}:0: "
        f"{NOT_HERE} is not an address of this machine"
    ]


def test_bind_failures_read_as_their_cause() -> None:
    """Permission denied, an unresolvable host and other errors each get a plain reason."""
    denied = cannot_listen("0.0.0.0", 80, OSError(errno.EACCES, "Permission denied"))
    assert str(denied) == (
        "cannot listen on 0.0.0.0:80: permission denied (ports below 1024 need privileges)"
    )
    assert denied.status == EXIT_ERROR
    high = cannot_listen("::1", 8000, OSError(errno.EACCES, "Permission denied"))
    assert str(high) == "cannot listen on [::1]:8000: permission denied"
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert str(cannot_listen("nowhere", 8000, unknown)) == (
        "cannot listen on nowhere:8000: cannot resolve 'nowhere' (Name or service not known)"
    )
    other = cannot_listen("127.0.0.1", 8000, OSError(errno.EMFILE, "Too many open files"))
    assert str(other) == "cannot listen on 127.0.0.1:8000: too many open files"


@pytest.mark.parametrize("command", [["fake-server"], ["serve", "--upstream", "u"]])
@pytest.mark.parametrize("port", ["70000", "65536", "-1", "http"])
def test_port_out_of_range_is_a_usage_error(
    command: list[str], port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--port outside 0-65535 is refused as a flag (70000 used to listen on 4464); 0 is not."""
    assert build_parser().parse_args([*command, "--port", "0"]).port == 0  # any free port
    assert build_parser().parse_args([*command, "--port", "65535"]).port == 65535
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--port", port])
    assert exited.value.code == EXIT_USAGE
    (line,) = lines(capsys.readouterr().err)
    assert "argument --port: expected a port" in line


async def test_serve_raises_a_bind_error_as_itself() -> None:
    """serve() on a busy port raises OSError itself (no exception group), before reporting."""
    from trio_llm.serve import serve

    with busy_port() as port:
        async with (
            trio_llm.open_client(base_url=DEAD_UPSTREAM, model="m") as client,
            trio.open_nursery() as nursery,
        ):
            with pytest.raises(OSError, match="in use") as caught:
                await nursery.start(functools.partial(serve, client, port=port))
    assert caught.value.errno == errno.EADDRINUSE


async def test_serve_refuses_a_port_out_of_range() -> None:
    """serve(port=70000) raises ValueError instead of listening on 70000 - 65536."""
    from trio_llm.serve import serve

    async with trio_llm.open_client(base_url=DEAD_UPSTREAM, model="m") as client:
        with pytest.raises(ValueError, match="65535"):
            await serve(client, port=70000)


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "hi", "--deadline", "-1"],
        ["chat", "hi", "--deadline", "0"],
        ["batch", "in.jsonl", "-o", "out.jsonl", "--rpm", "-5"],
        ["batch", "in.jsonl", "-o", "out.jsonl", "--tpm", "0"],
        ["serve", "--upstream", "u", "--rpm", "-5"],
    ],
)
def test_positive_flags_say_greater_than_zero(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag that refuses 0 says "> 0", not ">= 0", whatever the value given."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    (line,) = lines(capsys.readouterr().err)
    assert "expected a number > 0, got" in line


@pytest.mark.parametrize(
    "argv",
    [["chat"], ["chat", "hi", "--bogus"], ["fake-server", "--port", "x"], ["serve"], []],
)
def test_a_bad_flag_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error prints one line (the problem and where help is), not the usage block."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    (line,) = lines(capsys.readouterr().err)
    assert ": error: " in line
    assert "--help" in line


@pytest.mark.parametrize(
    "argv",
    [["chat", "--base-url", REMOTE, "hi"], ["serve", "--upstream", REMOTE]],
    ids=["chat", "serve"],
)
def test_missing_key_gives_command_line_advice(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key: the one line names the variable and --api-key-env, not Python's api_key=."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(argv) == EXIT_USAGE
    (line,) = lines(capsys.readouterr().err)
    assert "no API key for llm.example.invalid: $OPENAI_API_KEY is not set" in line
    assert "--api-key-env NAME" in line
    assert "api_key=" not in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["chat", "--base-url", REMOTE, "hi"], "$OPENAI_API_KEY is empty"),
        (["chat", "--api-key-env", "MY_KEY", "--base-url", REMOTE, "hi"], "$MY_KEY is empty"),
        (["serve", "--upstream", REMOTE], "$OPENAI_API_KEY is empty"),
        (["serve", "--upstream", REMOTE, "--api-key-env", "MY_KEY"], "$MY_KEY is empty"),
        (["serve", "--upstream", DEAD_UPSTREAM, "--require-key-env", "MY_KEY"], "$MY_KEY is empty"),
    ],
)
def test_empty_key_variable_is_called_empty(
    argv: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key variable that is set but empty is reported as empty, not as "not set"."""
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("MY_KEY", "")
    assert main(argv) == EXIT_USAGE
    (line,) = lines(capsys.readouterr().err)
    assert expected in line


def test_an_error_inside_the_simulated_server_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LLMError under --simulate (raised inside the fake server's nursery) is one line."""

    class Refused(trio_llm.LLMError):
        pass

    async def refuse(*args: object, **kwargs: object) -> None:
        raise Refused("the model refused")

    monkeypatch.setattr(trio_llm.Client, "chat", refuse)
    assert main(["chat", "--simulate", "hi"]) == EXIT_ERROR
    err = lines(capsys.readouterr().err)
    assert err[-1] == "trio-llm chat: error: Refused: the model refused"
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_too(where: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--debug (before or after the command's name) adds the traceback above the one line."""
    with busy_port() as port:
        argv = ["fake-server", "--port", str(port)]
        argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
        assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "OSError" in err
    assert lines(err)[-1].startswith("trio-llm fake-server: error: cannot listen on")


def test_chat_simulate_stream_visibly_streams(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`chat --simulate --stream` paces the fake model: the words arrive over ~half a second."""
    arrivals: list[float] = []

    class Terminal(io.StringIO):
        def write(self, text: str) -> int:
            if text.strip():
                arrivals.append(time.monotonic())
            return super().write(text)

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["chat", "--simulate", "--stream", "Explain structured concurrency."]) == 0
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] >= 0.3  # unpaced, the whole reply took ~5 ms
    assert "paced like a model" in capsys.readouterr().err


async def test_fake_server_refuses_a_port_out_of_range() -> None:
    """serve_fake_llm(port=70000) raises instead of listening on 70000 - 65536."""
    from trio_llm.testing import serve_fake_llm

    with pytest.raises(ValueError, match="0 to 65535"):
        await serve_fake_llm(port=70000)


def test_serve_has_the_gateway_flags() -> None:
    """trio-llm serve takes --max-body-bytes and -v, and hands them to the gateway."""
    from trio_llm._cli import build_parser

    upstream = ["serve", "--upstream", "http://127.0.0.1:9/v1"]
    args = build_parser().parse_args([*upstream, "--max-body-bytes", "1024", "-v"])
    assert (args.max_body_bytes, args.verbose) == (1024, True)
    defaults = build_parser().parse_args(upstream)
    assert (defaults.max_body_bytes, defaults.verbose) == (4 * 1024 * 1024, False)


def test_ctrl_c_while_the_command_loads_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C while the command's modules load prints one line and exits 130."""
    import builtins

    from trio_llm._entry import main as entry

    real_import = builtins.__import__

    def interrupted(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "_cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert entry(["chat", "hi"]) == 130
    assert capsys.readouterr().err == "trio-llm: interrupted\n"


def test_importing_trio_llm_loads_no_client_until_used() -> None:
    """``import trio_llm`` is light: the client's modules load on first use of a name."""
    code = (
        "import sys, trio_llm; loaded = 'trio_llm._client' in sys.modules; "
        "trio_llm.Client; print(loaded, 'trio_llm._client' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"]
