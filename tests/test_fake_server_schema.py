"""The fake server against OpenAI's own schema, fuzzed by schemathesis (positive mode)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_llm.testing import FakeLLMConfig, open_fake_llm

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "openapi" / "chat_subset.yaml"


def _schemathesis() -> str | None:
    beside_python = Path(sys.executable).with_name("schemathesis")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("schemathesis")


async def test_fake_server_conforms_to_the_openai_schema(tmp_path: Path) -> None:
    """Valid chat and embedding requests get schema-conformant answers, never a 5xx."""
    if not SCHEMA.exists():
        pytest.skip(f"OpenAI schema subset not found at {SCHEMA}")
    command = _schemathesis()
    if command is None:
        pytest.skip("schemathesis is not installed")
    async with open_fake_llm(FakeLLMConfig(api_key="sk-test")) as server:
        with trio.fail_after(120):
            result = await trio.run_process(
                [
                    command,
                    "run",
                    str(SCHEMA),
                    "--url",
                    server.base_url,
                    "--include-name",
                    "POST /chat/completions",
                    "--include-name",
                    "POST /embeddings",
                    "--mode",
                    "positive",
                    "-n",
                    "50",
                    "--seed",
                    "1",
                    "-c",
                    "response_schema_conformance,not_a_server_error,"
                    "status_code_conformance,content_type_conformance",
                    "-H",
                    "Authorization: Bearer sk-test",
                    "--no-color",
                ],
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
                cwd=tmp_path,  # schemathesis keeps its example database in the working directory
            )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output
    assert server.stats.requests_by_endpoint.get("/v1/chat/completions", 0) > 20
    assert server.stats.requests_by_endpoint.get("/v1/embeddings", 0) > 20
    assert not any(status >= 500 for status in server.stats.requests_by_status)
