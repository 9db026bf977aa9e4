"""HTTP statuses and transport failures become the documented exceptions."""

from __future__ import annotations

import email.utils
import logging

import httpx2
import pytest
import trio

import trio_llm
from trio_llm._errors import error_from_response, parse_retry_after
from trio_llm.providers._anthropic import AnthropicProvider
from trio_llm.testing import FakeLLMConfig, open_fake_llm

STATUS_CLASSES = [
    (400, trio_llm.BadRequestError),
    (401, trio_llm.AuthenticationError),
    (403, trio_llm.PermissionDeniedError),
    (404, trio_llm.NotFoundError),
    (409, trio_llm.ConflictError),
    (422, trio_llm.UnprocessableEntityError),
    (429, trio_llm.RateLimitError),
    (500, trio_llm.ServerError),
    (502, trio_llm.ServerError),
    (503, trio_llm.ServerError),
    (504, trio_llm.ServerError),
    (529, trio_llm.ServerError),
]


@pytest.mark.parametrize(("status", "error_class"), STATUS_CLASSES)
async def test_each_status_raises_its_class(
    status: int, error_class: type[trio_llm.APIStatusError]
) -> None:
    """Every injected error status raises its class, with the server's message and request id."""
    config = FakeLLMConfig(error_rate=1.0, error_status=status)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt", retry=None) as client,
    ):
        with pytest.raises(error_class) as caught:
            await client.chat("hello")
    error = caught.value
    assert isinstance(error, trio_llm.APIStatusError)
    assert isinstance(error, trio_llm.LLMError)
    assert error.status_code == status
    assert error.request_id is not None
    assert error.request_id.startswith("req_")
    assert error.request_id in str(error)
    assert isinstance(error.body, dict)
    assert error.message == error.body["error"]["message"]
    assert error.message in str(error)
    assert str(status) in str(error)


async def test_rate_limit_error_carries_retry_after() -> None:
    """A 429 from an exhausted server rate limit carries the Retry-After wait."""
    config = FakeLLMConfig(requests_per_minute=1)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", retry=None, rate_limit=None
        ) as client,
    ):
        await client.chat("first")
        with pytest.raises(trio_llm.RateLimitError) as caught:
            await client.chat("second")
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 60
    assert caught.value.code == "rate_limit_exceeded"


async def test_bad_request_names_the_problem(fake_llm: trio_llm.testing.FakeLLMServer) -> None:
    """A request the server rejects raises BadRequestError with the server's explanation."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        with pytest.raises(trio_llm.BadRequestError) as caught:
            await client.chat([{"role": "user", "content": 42}])
    assert caught.value.error_type == "invalid_request_error"
    assert "content" in caught.value.message


async def test_unknown_endpoint_is_not_found() -> None:
    """A wrong base URL path surfaces as NotFoundError."""
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.root_url + "/v2", model="m") as client,
    ):
        with pytest.raises(trio_llm.NotFoundError):
            await client.chat("hi")


async def test_connection_refused_is_a_connection_error() -> None:
    """Nothing listening on the port raises APIConnectionError naming the URL."""
    async with open_fake_llm() as server:
        url = server.base_url
    # The server is gone: its port now refuses connections.
    async with trio_llm.open_client(base_url=url, model="m", retry=None) as client:
        with pytest.raises(trio_llm.APIConnectionError) as caught:
            await client.chat("hi")
    assert not isinstance(caught.value, trio_llm.APITimeoutError)
    assert url in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx2.ConnectError)
    assert client.statistics().failed == 1


async def test_read_timeout_is_a_timeout_error(autojump_clock: trio.abc.Clock) -> None:
    """A server that never answers trips the read timeout: APITimeoutError."""
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(
            base_url=server.base_url,
            model="m",
            timeouts=trio_llm.Timeouts(read=5.0),
            retry=None,
        ) as client,
    ):
        start = trio.current_time()
        with pytest.raises(trio_llm.APITimeoutError, match="ReadTimeout"):
            await client.chat("hi")
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)


async def test_cut_connection_is_a_connection_error() -> None:
    """A connection cut mid-body raises APIConnectionError, not a parse error."""
    async with (
        open_fake_llm(FakeLLMConfig(disconnect_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", retry=None) as client,
    ):
        with pytest.raises(trio_llm.APIConnectionError):
            await client.chat("hi")


@pytest.mark.parametrize(
    ("content", "match"), [(b"<html>oops</html>", "not JSON"), (b"[1, 2]", "not a JSON object")]
)
async def test_success_with_unparsable_body(content: bytes, match: str) -> None:
    """A 200 whose body is not a JSON object raises APIResponseError."""
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, content=content))
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", model="m", transport=transport
    ) as client:
        with pytest.raises(trio_llm.APIResponseError, match=match):
            await client.chat("hi")


@pytest.mark.parametrize(
    ("content", "message", "error_type"),
    [
        (
            b'{"error": {"message": "bad", "type": "invalid_request_error"}}',
            "bad",
            "invalid_request_error",
        ),
        (
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}',
            "busy",
            "overloaded_error",
        ),
        (b'{"error": "plain words"}', "plain words", None),
        (b'{"detail": "fastapi style"}', "fastapi style", None),
        (b"upstream gone", "upstream gone", None),
        (b"", "Bad Gateway", None),
    ],
)
def test_error_bodies_of_many_servers(content: bytes, message: str, error_type: str | None) -> None:
    """Error messages are found in OpenAI, Anthropic, FastAPI and plain-text bodies."""
    error = error_from_response(502, {}, content, reason="Bad Gateway", request_id=None)
    assert isinstance(error, trio_llm.ServerError)
    assert error.message == message
    assert error.error_type == error_type


def test_unlisted_status_is_a_plain_status_error() -> None:
    """A 4xx with no dedicated class is an APIStatusError, with the request id it is given."""
    headers = {"request-id": "r1"}
    request_id = AnthropicProvider().request_id(headers)
    error = error_from_response(418, headers, b"", reason="I'm a teapot", request_id=request_id)
    assert type(error) is trio_llm.APIStatusError
    assert error.request_id == "r1"
    assert "request_id=r1" in str(error)


def test_request_id_is_not_read_from_headers() -> None:
    """error_from_response takes the request id from its caller, never from the headers."""
    error = error_from_response(400, {"x-request-id": "r2"}, b"", request_id=None)
    assert error.request_id is None


def test_retry_after_forms() -> None:
    """retry-after-ms wins; retry-after may be seconds or an HTTP date; junk is ignored."""
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after({"retry-after": date}, now=2_000_000) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after-ms": "x"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({"retry-after": "86400"}) is None
    assert parse_retry_after({}) is None


SECRET = "sk-test-SECRET-do-not-leak-0123456789"


async def test_api_key_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    """The key appears in no repr, log record or exception message, whatever happens."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with open_fake_llm(FakeLLMConfig(api_key="another-key")) as server:
        async with trio_llm.open_client(
            base_url=server.base_url, api_key=SECRET, model="m"
        ) as client:
            texts.append(repr(client))
            with pytest.raises(trio_llm.AuthenticationError) as caught:
                await client.chat("hi")
            texts += [str(caught.value), repr(caught.value), repr(caught.value.body)]
            texts.append(repr(client._requester.router.primary.http.headers))
        refused_url = server.base_url
    async with trio_llm.open_client(
        base_url=refused_url, api_key=SECRET, model="m", retry=None
    ) as client:
        with pytest.raises(trio_llm.APIConnectionError) as refused:
            await client.chat("hi")
    texts += [str(refused.value), repr(refused.value), str(refused.value.__cause__)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.__dict__) for record in caplog.records]
    assert any("POST" in record.getMessage() for record in caplog.records)
    for text in texts:
        assert SECRET not in text
        assert SECRET[-12:] not in text
