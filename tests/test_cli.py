"""The trio-llm command: chat, fake-server, help and errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx2
import pytest

from trio_llm._cli import build_parser, main
from trio_llm._cli_options import EXIT_USAGE


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run the command in a child process; return (status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "trio_llm", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_chat_simulate_prints_the_reply(capsys: pytest.CaptureFixture[str]) -> None:
    """`chat --simulate` answers offline from the fake server and says so on stderr."""
    assert main(["chat", "--simulate", "Explain structured concurrency."]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "--simulate" in err
    assert "fake LLM server" in err


def test_chat_json_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the whole response; --max-tokens and --system reach the request."""
    status = main(
        ["chat", "--simulate", "--json", "--max-tokens", "2", "--system", "Be brief.", "Hi"]
    )
    assert status == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["object"] == "chat.completion"
    assert payload["choices"][0]["finish_reason"] == "length"
    assert payload["usage"]["completion_tokens"] == 2


def test_chat_stream_prints_the_same_reply(capsys: pytest.CaptureFixture[str]) -> None:
    """--stream prints the reply as it arrives: the same text as without it."""
    assert main(["chat", "--simulate", "Tell me about rivers."]) == 0
    plain = capsys.readouterr().out
    assert main(["chat", "--simulate", "--stream", "Tell me about rivers."]) == 0
    assert capsys.readouterr().out == plain
    assert main(["chat", "--simulate", "--stream", "--json", "Tell me about rivers."]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["choices"][0]["message"]["content"] == plain.strip()
    assert payload["usage"]["completion_tokens"] > 0


def test_chat_reads_the_prompt_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PROMPT '-' reads the prompt from standard input; replies are deterministic."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Same question"))
    assert main(["chat", "--simulate", "-"]) == 0
    from_stdin = capsys.readouterr().out
    assert main(["chat", "--simulate", "Same question"]) == 0
    assert capsys.readouterr().out == from_stdin


def test_chat_without_key_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a key for a remote server, the command names the variable and exits 2."""
    assert main(["chat", "--base-url", "https://llm.example.invalid/v1", "hi"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY" in err
    assert "Traceback" not in err


def test_chat_with_the_anthropic_provider(capsys: pytest.CaptureFixture[str]) -> None:
    """--provider anthropic speaks the Messages API (here to the fake server's)."""
    assert main(["chat", "--simulate", "--provider", "anthropic", "--json", "Hi"]) == 0
    payload = json.loads(capsys.readouterr().out)  # the reply as sent: a Messages object
    assert payload["type"] == "message"
    assert payload["model"].startswith("claude-")  # the provider's default model
    assert payload["content"][0]["text"]
    assert payload["usage"]["output_tokens"] > 0
    assert main(["chat", "--simulate", "--provider", "anthropic", "--stream", "Hi"]) == 0
    assert capsys.readouterr().out.strip()


def test_anthropic_provider_without_key_names_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a key, --provider anthropic asks for ANTHROPIC_API_KEY, not OpenAI's."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    argv = ["chat", "--provider", "anthropic", "--base-url", "https://llm.example.invalid", "hi"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "ANTHROPIC_API_KEY" in err
    assert "Traceback" not in err


def test_empty_key_variable_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["chat", "--api-key-env", "", "hi"])
    assert caught.value.code == EXIT_USAGE
    assert "--api-key-env" in capsys.readouterr().err


def test_chat_with_unset_key_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """--api-key-env naming an unset variable is reported before anything is sent."""
    status = main(
        ["chat", "--api-key-env", "MY_UNSET_KEY", "--base-url", "http://127.0.0.1:9/v1", "hi"]
    )
    assert status == EXIT_USAGE
    assert "$MY_UNSET_KEY is not set" in capsys.readouterr().err


def test_chat_against_a_dead_server_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    """A connection failure prints one error line and exits 1, without a traceback."""
    argv = ["chat", "--base-url", "http://127.0.0.1:9/v1", "--max-attempts", "1", "hi"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "APIConnectionError" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat"], "PROMPT"),
        (["chat", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["chat", "hi", "--concurrency", "many"], "--concurrency"),
        (["chat", "hi", "--bogus"], "--bogus"),
        (["chat", "hi", "--deadline", "0"], "--deadline"),
        (["chat", "hi", "--deadline", "-1"], "--deadline"),
        (["fake-server", "--error-rate", "2"], "error_rate"),
        (["fake-server", "--latency", "soon"], "--latency"),
        (["launch"], "invalid choice"),
        ([], "COMMAND"),
    ],
)
def test_bad_flags_exit_2_with_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad flags and values print usage and the problem, and exit with status 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" in err or "error:" in err


def test_fake_server_has_one_flag_per_config_field() -> None:
    """Every FakeLLMConfig field is a fake-server flag with help text."""
    import attrs

    from trio_llm.testing import FakeLLMConfig

    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["fake-server"].format_help()  # type: ignore[union-attr,index]
    for field in attrs.fields(FakeLLMConfig):
        assert "--" + field.name.replace("_", "-") in help_text
    assert "--rpm" in help_text
    assert "--tpm" in help_text


def test_help_reads_well() -> None:
    """`python -m trio_llm --help` lists the commands; each command has its own help."""
    status, out, _ = run_cli("--help")
    assert status == 0
    assert "chat" in out
    assert "fake-server" in out
    status, out, _ = run_cli("chat", "--help")
    assert status == 0
    assert "--simulate" in out
    assert "--base-url" in out


def test_command_modules_do_not_import_the_top_level_command() -> None:
    """Shared CLI pieces and each command import without `trio_llm._cli`: no import cycle."""
    code = (
        "import sys\n"
        "for name in ('trio_llm._cli_options', 'trio_llm.batch._command',\n"
        "             'trio_llm.serve._command'):\n"
        "    __import__(name)\n"
        "    assert 'trio_llm._cli' not in sys.modules, f'{name} imports trio_llm._cli'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_fake_server_command_serves_until_interrupted() -> None:
    """`trio-llm fake-server --port 0` prints its URL, answers requests and stops on Ctrl-C."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_llm",
            "fake-server",
            "--port",
            "0",
            "--verbose",
            "--rpm",
            "100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        base_url = line.split("listening on ")[1].split()[0]
        response = httpx2.post(
            base_url + "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "100"
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert "/v1/chat/completions" in err  # --verbose logs one line per request
    assert "Traceback" not in err
