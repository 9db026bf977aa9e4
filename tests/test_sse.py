"""The SSE decoder against the WHATWG rules for interpreting an event stream."""

from __future__ import annotations

import pytest

from trio_llm._sse import ServerSentEvent, SSEDecodeError, SSEDecoder


def decode(*chunks: bytes, decoder: SSEDecoder | None = None) -> list[ServerSentEvent]:
    """Feed each chunk in turn; return every event dispatched."""
    decoder = decoder or SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


# Every rule at once: BOM, all three line endings, comments, fields, multi-line data,
# UTF-8, an event without data, a persistent id, an unterminated last event.
TRICKY = (
    "\ufeff: a comment\r\n"
    "data: first\r\n\r\n"
    "event: update\rdata:  two spaces\rdata\rdata: é, 日本, 🎉\r\r"
    "id: 7\nretry: 1500\n\n"
    "data: after id\n\n"
    "id\ndata:x\n\n"
    "data: cut off at the end"
).encode()

TRICKY_EVENTS = [
    ServerSentEvent("first"),
    ServerSentEvent(" two spaces\n\né, 日本, 🎉", "update"),
    ServerSentEvent("after id", id="7"),
    ServerSentEvent("x", id=""),
]


def test_whole_stream() -> None:
    """All the rules together decode to the expected events."""
    assert decode(TRICKY) == TRICKY_EVENTS


def test_split_at_every_byte() -> None:
    """Fed one byte at a time, inside CRLF pairs and UTF-8 sequences, the events are the same."""
    assert decode(*(TRICKY[i : i + 1] for i in range(len(TRICKY)))) == TRICKY_EVENTS


def test_split_in_two_anywhere() -> None:
    """Split into two reads at any byte boundary, the events are the same."""
    for cut in range(len(TRICKY) + 1):
        assert decode(TRICKY[:cut], TRICKY[cut:]) == TRICKY_EVENTS, cut


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_line_endings(ending: bytes) -> None:
    """LF, CR and CRLF each end a line."""
    stream = b"data: a" + ending + b"data: b" + ending + ending + b"data: c" + ending * 2
    assert decode(stream) == [ServerSentEvent("a\nb"), ServerSentEvent("c")]


def test_crlf_split_across_reads_is_one_line_ending() -> None:
    """A CR at the end of one read and an LF at the start of the next end a single line."""
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [ServerSentEvent("a\nb")]


def test_cr_cr_is_two_line_endings() -> None:
    """Two CRs are two line endings, so they dispatch the event even when split."""
    assert decode(b"data: a\r", b"\r") == [ServerSentEvent("a")]


def test_byte_order_mark_is_dropped_once() -> None:
    """A leading BOM is dropped, even split across reads; a later one is data."""
    assert decode(b"\xef\xbb", b"\xbfdata: a\n\n") == [ServerSentEvent("a")]
    assert decode("data: \ufeffb\n\n".encode()) == [ServerSentEvent("\ufeffb")]
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: c\n\n") == []  # second BOM: unknown field


def test_short_stream_that_looks_like_a_bom() -> None:
    """Bytes that start like a BOM but are not one are kept."""
    assert decode(b"\xef", b"x\n", b"data: a\n\n") == [ServerSentEvent("a")]


def test_utf8_split_and_invalid_bytes() -> None:
    """A character split across reads decodes whole; invalid bytes become U+FFFD."""
    data = "data: é🎉\n\n".encode()
    assert decode(data[:7], data[7:9], data[9:]) == [ServerSentEvent("é🎉")]
    assert decode(b"data: \xff\xe2\x82\n\n") == [ServerSentEvent("\ufffd\ufffd")]


def test_comments_are_ignored() -> None:
    """Lines starting with a colon dispatch nothing and do not end an event."""
    assert decode(b": ping\n\n:\n\ndata: a\n: inside\ndata: b\n\n") == [ServerSentEvent("a\nb")]


def test_field_parsing() -> None:
    """One space after the colon is dropped; a line without a colon is a field with no value."""
    assert decode(b"data:a\n\ndata:  b\n\ndata\n\ndata:\n\n") == [
        ServerSentEvent("a"),
        ServerSentEvent(" b"),
        ServerSentEvent(""),
        ServerSentEvent(""),
    ]


def test_data_lines_join_with_newline() -> None:
    """Several data lines join with LF, empty ones included, and no trailing LF."""
    assert decode(b"data: a\ndata:\ndata: b\n\n") == [ServerSentEvent("a\n\nb")]


def test_unknown_fields_are_ignored() -> None:
    """Fields other than data, event, id and retry are ignored."""
    assert decode(b"foo: bar\nDATA: no\ndata: yes\n\n") == [ServerSentEvent("yes")]


def test_event_without_data_is_not_dispatched() -> None:
    """A blank line after only event/id fields dispatches nothing, and resets the type."""
    assert decode(b"event: ping\n\nid: 3\n\ndata: a\n\n") == [ServerSentEvent("a", id="3")]


def test_event_type() -> None:
    """The event field sets the type of this event only; empty means message."""
    assert decode(b"event: error\ndata: a\n\ndata: b\n\nevent:\ndata: c\n\n") == [
        ServerSentEvent("a", "error"),
        ServerSentEvent("b"),
        ServerSentEvent("c"),
    ]


def test_id_persists_and_ignores_null() -> None:
    """The last event ID carries over to later events; an id with NUL is ignored."""
    decoder = SSEDecoder()
    events = decode(
        b"id: 1\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n", decoder=decoder
    )
    assert [e.id for e in events] == ["1", "1", "1", ""]
    assert decoder.last_event_id == ""


def test_retry_accepts_only_ascii_digits() -> None:
    """retry sets the reconnection time when it is all ASCII digits, else it is ignored."""
    decoder = SSEDecoder()
    decode(b"retry: 2500\n\n", decoder=decoder)
    assert decoder.retry == 2500
    decode(b"retry: 1e3\nretry: -1\nretry: \xd9\xa3\nretry: 1 \n\n", decoder=decoder)
    assert decoder.retry == 2500


def test_unterminated_event_is_discarded() -> None:
    """At the end of the stream, an event without its blank line is never dispatched."""
    assert decode(b"data: a\n") == []
    assert decode(b"data: a\r") == []
    assert decode(b"data: a\n\ndata: b") == [ServerSentEvent("a")]


def test_openai_stream() -> None:
    """A typical OpenAI stream gives its JSON payloads and the [DONE] sentinel."""
    stream = b'data: {"choices":[]}\n\ndata: {"x":1}\n\ndata: [DONE]\n\n'
    assert [e.data for e in decode(stream)] == ['{"choices":[]}', '{"x":1}', "[DONE]"]


def test_size_limit() -> None:
    """A line or an event's data larger than the limit raises instead of growing forever."""
    with pytest.raises(SSEDecodeError):
        decode(b"data: " + b"x" * 100, decoder=SSEDecoder(max_event_size=64))
    with pytest.raises(SSEDecodeError):
        decode(b"data: " + b"x" * 40, b"x" * 40, decoder=SSEDecoder(max_event_size=64))
    with pytest.raises(SSEDecodeError):
        decode(b"\n\ndata: " + b"x" * 40, b"x" * 40 + b"\n", decoder=SSEDecoder(max_event_size=64))
    with pytest.raises(SSEDecodeError):
        decode(b"data: " + b"x" * 100 + b"\n", decoder=SSEDecoder(max_event_size=64))
    decoder = SSEDecoder(max_event_size=64)
    with pytest.raises(SSEDecodeError):
        decode(b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n", decoder=decoder)
    assert decode(b"data: " + b"x" * 50 + b"\n\n", decoder=SSEDecoder(max_event_size=64))


def test_one_event_per_read_keeps_pending_state() -> None:
    """Whole one-event reads still honour an id, a type or data lines from earlier reads."""
    assert decode(b"id: 5\n\n", b"data: a\n\n") == [ServerSentEvent("a", id="5")]
    assert decode(b"event: x\n", b"data: a\n\n") == [ServerSentEvent("a", "x")]
    assert decode(b"data: a\n", b"data: b\n\n") == [ServerSentEvent("a\nb")]
    assert decode(b"data: a", b"data: b\n\n") == [ServerSentEvent("adata: b")]
    assert decode(b"data: a\r\r", b"data: b\n\n", b"\ndata: c\n\n") == [
        ServerSentEvent("a"),
        ServerSentEvent("b"),
        ServerSentEvent("c"),
    ]
