"""Credentials in a base URL never appear in what the library prints or writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

import trio_llm
from trio_llm._errors import redact_url
from trio_llm.testing import FakeLLMConfig, open_fake_llm

SECRET = "s3cr3t-PASSWORD"
TOKEN = "tok-0123456789"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@host/v1", "http://***@host/v1"),
        ("http://KEY:@host/v1", "http://***@host/v1"),
        ("http://[::1/v1?api_key=k", "http://[::1/v1"),
        ("http://token@host/v1", "http://***@host/v1"),
        ("https://h/v1?api_key=k&model=m", "https://h/v1?api_key=***&model=m"),
        ("https://h/v1?access_token=t&sig=s&x=1", "https://h/v1?access_token=***&sig=***&x=1"),
        ("https://h:8443/v1", "https://h:8443/v1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    """Userinfo and secret-looking query values are replaced by ***; nothing raises."""
    assert redact_url(url) == shown


def _leaks(text: str) -> bool:
    return SECRET in text or TOKEN in text


async def test_errors_reprs_and_logs_hide_url_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connection errors, status errors, streams, the client's repr and logs show no secret."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=400)) as server:
        host = server.base_url.split("//", 1)[1]
        url = f"http://user:{SECRET}@{host}?api_key={TOKEN}"
        async with trio_llm.open_client(base_url=url, model="m", retry=None) as client:
            texts.append(repr(client))
            for call in (client.chat("hi"), _stream(client)):
                with pytest.raises(trio_llm.LLMError) as caught:
                    await call
                texts += [str(caught.value), repr(caught.value)]
    async with trio_llm.open_client(base_url=url, model="m", retry=None) as client:
        with pytest.raises(trio_llm.APIConnectionError) as refused:
            await client.chat("hi")
        texts += [str(refused.value), refused.value.url]
    texts += [record.getMessage() for record in caplog.records if record.name.startswith("trio")]
    assert texts
    assert not [text for text in texts if _leaks(text)]


async def _stream(client: trio_llm.Client) -> None:
    async with client.stream("hi"):
        pass


async def test_batch_output_lines_hide_url_credentials(tmp_path: Path) -> None:
    """A failed line's error message in the output file shows no credentials."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "prompt": "hi"}) + "\n")
    output = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=400)) as server:
        host = server.base_url.split("//", 1)[1]
        url = f"http://user:{SECRET}@{host}"
        async with trio_llm.open_client(base_url=url, model="m", retry=None) as client:
            await trio_llm.run_batch(source, output, client=client)
    written = output.read_text()
    assert "error" in written
    assert not _leaks(written)


async def test_a_stopped_batch_names_its_url_without_credentials(tmp_path: Path) -> None:
    """The reason a batch run stopped (here a 404) shows the URL without its secrets."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "prompt": "hi"}) + "\n")
    async with open_fake_llm() as server:
        host = server.base_url.split("//", 1)[1]
        url = f"http://user:{SECRET}@{host}/nowhere?api_key={TOKEN}"
        async with trio_llm.open_client(base_url=url, model="m", retry=None) as client:
            summary = await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
    assert summary.stopped is not None
    assert "404" in summary.stopped
    assert not _leaks(summary.stopped)


def test_no_api_key_message_hides_url_credentials() -> None:
    """The missing-key error names the URL without its password."""

    async def main() -> None:
        url = f"https://user:{SECRET}@api.example.com/v1"
        async with trio_llm.open_client(base_url=url):
            pass

    with pytest.raises(trio_llm.ConfigurationError) as caught:
        trio.run(main)
    assert "api.example.com" in str(caught.value)
    assert not _leaks(str(caught.value))
