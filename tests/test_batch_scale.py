"""Batch files of millions of lines: block reads, the fast paths, and what they must not change.

The passes before sending read the files in large blocks and read lines with orjson
first (see ``_lines``, ``_parse``, ``_input``, ``_output``). Their verdicts must be
exactly those of the line-by-line passes with the standard library's ``json`` they
replaced: the references here are those passes, and random files (ids with escapes,
CRLF, blank lines, numbers orjson reads differently, lines that look like ours but are
not) are checked through both, with blocks so small that lines are split across them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

import trio_llm
from trio_llm.batch import _lines
from trio_llm.batch._input import InputPlan, Invalid, check_input, duplicate_line, parse_line
from trio_llm.batch._keys import FAILED, OK, AnsweredKeys
from trio_llm.batch._lines import Bits, chunks, estimate_lines, marked_lines, read_lines
from trio_llm.batch._output import OutputFile
from trio_llm.testing import FakeLLMServer

BLOCK_SIZES = [1, 7, 64, 1 << 20]


@pytest.fixture(params=BLOCK_SIZES, ids=lambda size: f"block{size}")
def block_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Read files in blocks of this many bytes (1: every line is split across blocks)."""
    size: int = request.param
    monkeypatch.setattr(_lines, "BLOCK_SIZE", size)
    return size


def physical_lines(data: bytes) -> list[bytes]:
    """The lines a file iteration in binary mode gives, each with its newline."""
    return list(io.BytesIO(data))


# --- the reading of lines ------------------------------------------------------------

MESSY = (
    b'{"a": 1}\n\n  \n{"b": 2}\r\n\r\n\t\n' + b"x" * 300 + b"\n\xff\xfe\n"
    b'{"c": "\\n"}\n{"last": "no newline"}'
)


@pytest.mark.parametrize("data", [b"", b"\n", b"abc", b"abc\n", b"\n\nabc", MESSY])
def test_lines_are_those_of_a_file_iteration(block_size: int, data: bytes) -> None:
    """Blocks of any size give the lines, numbers and bytes a file iteration gives."""
    file = io.BytesIO(data)
    assert b"".join(chunks(file)) == data
    assert all(chunk.endswith(b"\n") for chunk in list(chunks(file))[:-1])
    expected = [
        (number, raw) for number, raw in enumerate(physical_lines(data), 1) if not raw.isspace()
    ]
    assert list(read_lines(file)) == expected


def test_marked_lines_skip_whole_blocks(block_size: int) -> None:
    """Only the marked lines come out, wherever they fall in the blocks."""
    data = b"".join(b'{"n": %d}\n' % i for i in range(1, 301)) + b'{"n": 301}'
    marked = Bits()
    wanted = [1, 2, 150, 299, 301]
    for number in wanted:
        marked.set(number)
    lines = physical_lines(data)
    got = list(marked_lines(io.BytesIO(data), marked))
    assert got == [(number, lines[number - 1]) for number in wanted]
    assert list(marked_lines(io.BytesIO(data), Bits())) == []


def test_bits_say_whether_a_range_has_a_set_bit() -> None:
    """Bits.any looks at whole bytes: never a false no."""
    bits = Bits()
    bits.set(100)
    assert bits.any(100, 101)
    assert bits.any(90, 200)
    assert not bits.any(0, 96)
    assert not bits.any(104, 50_000)  # beyond what was ever set
    assert bits[100]
    assert not bits[101]


def test_line_estimates(tmp_path: Path) -> None:
    """Small files are counted exactly; large ones from samples, within a few percent."""
    small = tmp_path / "small"
    small.write_bytes(b"a\nb\n\nc")
    with small.open("rb") as file:
        assert estimate_lines(file) == 4
    rows = random.Random(7)
    large = tmp_path / "large"
    # Lines growing longer through the file: the first megabyte alone would mislead.
    large.write_bytes(
        b"".join(b"x" * (i // 2_000 + rows.randrange(20)) + b"\n" for i in range(200_000))
    )
    with large.open("rb") as file:
        assert estimate_lines(file) == pytest.approx(200_000, rel=0.05)


# --- the output's scan ---------------------------------------------------------------


def record(custom_id: str | None, error: Any = None, **extra: Any) -> bytes:
    """An output line as a run writes it (or with the fields given)."""
    response = None if error is not None else {"status_code": 200, "body": {"x": 1}}
    fields = {"id": "batch_req_1", "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(fields | extra, separators=(",", ":")).encode() + b"\n"


def reference_scan(data: bytes) -> dict[str, Any] | str:
    """The scan as it was: a file iteration and json.loads; its problem as a string."""
    ok: set[str] = set()
    failed: set[str] = set()
    result: dict[str, Any] = {"lines": 0, "failed": 0, "end": 0, "tail": 0, "repeated": 0}
    result.update(tail_complete=False, failed_lines=set())
    for number, raw in enumerate(physical_lines(data), 1):
        complete = raw.endswith(b"\n")
        if complete and raw.isspace():
            result["end"] += len(raw)
            continue
        try:
            value = json.loads(raw)
        except ValueError as exc:
            problem: str | None = f"invalid JSON: {exc}"
        else:
            problem = reference_problem(value)
        if not complete:
            result.update(tail=len(raw), tail_complete=problem is None)
            if problem is not None:
                break
        elif problem is not None:
            return f"{number}: {problem}"
        else:
            result["end"] += len(raw)
        result["lines"] += 1
        error = value.get("error")
        result["failed"] += error is not None
        custom_id = value["custom_id"]
        if custom_id is None:
            line = error.get("line") if error is not None else None
            if isinstance(line, int) and line < 2**63:  # (see new_scan)
                result["failed_lines"].add(line)
            continue
        result["repeated"] += custom_id in ok or custom_id in failed
        (ok if error is None else failed).add(custom_id)
    result.update(ok=ok, failed_ids=failed)
    return result


def reference_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or "custom_id" not in value:
        return "no custom_id"
    custom_id, error = value["custom_id"], value.get("error")
    if not (custom_id is None or isinstance(custom_id, str)):
        return "custom_id is not a string"
    if not (error is None or isinstance(error, dict)):
        return "error is neither null nor an object"
    if error is None and not isinstance(value.get("response"), dict):
        return "neither a response nor an error"
    return None


async def new_scan(path: Path, data: bytes) -> dict[str, Any] | str:
    """The scan as it is (of ``data``, in ``path``), in the reference's terms."""
    with OutputFile.open(str(path)) as output:
        try:
            scan = await output.scan()
        except trio_llm.BatchInputError as exc:
            return f"{exc.line}: {(exc.reason or '').removeprefix('not a batch output line: ')}"
    keys = scan.answered.keys
    known = set()
    for line in data.split(b"\n"):
        if _is_json(line) and isinstance(json.loads(line), dict):
            custom_id = json.loads(line).get("custom_id")
            if isinstance(custom_id, str):
                known.add(custom_id)
    return {
        "lines": scan.lines,
        "failed": scan.failed,
        "end": scan.end,
        "tail": scan.tail,
        "tail_complete": scan.tail_complete,
        "repeated": scan.repeated,
        # orjson reads a line number beyond 64 bits as a float, json as an int: no input
        # has that many lines, so neither is ever looked up.
        "failed_lines": scan.answered.failed_lines,
        "ok": {custom_id for custom_id in known if keys.flags(custom_id) & OK},
        "failed_ids": {custom_id for custom_id in known if keys.flags(custom_id) & FAILED},
    }


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# Output lines: ours, the same ids written differently, and lines that look like ours.
GOOD_OUTPUT = [
    record("a"),
    record("b", {"code": "timeout", "message": "slow"}),
    record("\u00e9t\u00e9"),
    b'{"id":"x","custom_id":"\\u00e9t\\u00e9","response":{},"error":null}\n',  # same id
    b'{"id":"x","custom_id":"q\\"1","response":{"n":NaN},"error":null}\r\n',  # json's NaN
    b'{"id":"x","custom_id":"big","response":{"n":123456789012345678901234},"error":null}\n',
    record(None, {"code": "invalid_json", "message": "m", "line": 7}),
    record(None, {"code": "invalid_json", "message": "m", "line": 123456789012345678901234}),
    record("e", {}),  # an empty error object is still an error
    b"\n",
    b"   \r\n",
]
BAD_OUTPUT = [
    b'{"id":"x","custom_id":"a","response":{"status_code":200},"error":null}}\n',
    b'{"id":"x","custom_id":"a","response":{"status_code":200},"error":nul\n',
    b'{"id":"x","custom_id":"a","response":{"status_code":200,"error":null}\n',  # cut short
    b'{"id":"x","custom_id":"a\n',
    b'{"id":"x","custom_id":1,"response":{},"error":null}\n',
    b'{"id":"x","custom_id":"a","response":null,"error":null}\n',
    b'{"id":"x","custom_id":"a","response":{},"error":"no"}\n',
    b'{"id":"x","response":{},"error":null}\n',
    b'["custom_id"]\n',
    b'{"id":"x","custom_id":"\xff","response":{},"error":null}\n',
    b'{"id":"x","custom_id":"\\ud800","response":{},"error":null}\n',  # json takes it
    b"\xef\xbb\xbf" + record("bom"),  # json.loads(bytes) takes a byte-order mark
]


@pytest.mark.parametrize("seed", range(12))
async def test_the_scan_finds_what_the_line_by_line_scan_found(
    tmp_path: Path, block_size: int, seed: int
) -> None:
    """Random output files: same counts, ids, tail and errors as json.loads line by line."""
    rows = random.Random(seed)
    lines = rows.choices(GOOD_OUTPUT, k=rows.randrange(1, 30))
    if seed % 3 == 0:
        lines.insert(rows.randrange(len(lines) + 1), rows.choice(BAD_OUTPUT))
    data = b"".join(lines)
    if seed % 4 == 1:
        data += rows.choice([record("tail")[:-1], record("tail")[:20], b"  ", b"{"])
    path = tmp_path / "out.jsonl"
    path.write_bytes(data)
    assert await new_scan(path, data) == reference_scan(data)


# --- the input's check ---------------------------------------------------------------


def reference_check(
    lines: list[bytes], ok: set[str], failed: set[str], failed_lines: set[int]
) -> dict[str, Any]:
    """The check as it was: parse_line on every line, ids compared as strings."""
    first: dict[str, int] = {}
    plan: dict[str, Any] = {"total": 0, "to_send": 0, "to_record": 0, "answered_ok": 0}
    plan.update(answered_failed=0, handle=[], duplicates={}, problems=[])
    for number, raw in enumerate(lines, 1):
        if raw.isspace():
            continue
        plan["total"] += 1
        item = parse_line(raw, number, default_model="m")
        if item.custom_id is not None:
            if item.custom_id in first:
                plan["duplicates"][number] = (item.custom_id, first[item.custom_id])
                item = duplicate_line(number, item.custom_id, first[item.custom_id])
            else:
                first[item.custom_id] = number
        if isinstance(item, Invalid) and item.keyed_by_line:
            if number in failed_lines:
                plan["answered_failed"] += 1
                continue
        elif item.custom_id in ok:
            plan["answered_ok"] += 1
            continue
        elif item.custom_id in failed:
            plan["answered_failed"] += 1
            continue
        plan["handle"].append(number)
        if isinstance(item, Invalid):
            plan["to_record"] += 1
            plan["problems"].append((number, item.reason))
        else:
            plan["to_send"] += 1
    return plan


def plan_terms(plan: InputPlan, lines: list[bytes]) -> dict[str, Any]:
    return {
        "total": plan.total,
        "to_send": plan.to_send,
        "to_record": plan.to_record,
        "answered_ok": plan.answered_ok,
        "answered_failed": plan.answered_failed,
        "handle": [number for number in range(1, len(lines) + 1) if plan.handle[number]],
        "duplicates": plan.duplicates,
    }


EMBED = b'{"custom_id": "%s", "method": "POST", "url": "/v1/embeddings", "body": %s}\n'
INPUT_LINES = [
    b'{"custom_id": "a", "prompt": "hi"}\n',
    b'{"custom_id": "\\u0061", "prompt": "hi"}\n',  # "a" again
    b'{"custom_id": "b", "prompt": "hi"}\r\n',
    b'{"custom_id": "q\\"1", "prompt": "hi"}  \n',
    b'{"custom_id": "\xc3\xa9t\xc3\xa9", "prompt": "hi"}\n',
    b'{"custom_id": "\\u00e9t\\u00e9", "prompt": "hi"}\n',  # the same id, escaped
    b'{"custom_id": "n", "prompt": "hi", "temperature": NaN}\n',  # json reads NaN
    EMBED % (b"big", b'{"input": [123456789012345678901234567890]}'),  # an int, for json
    EMBED % (b"float", b'{"input": [1.5]}'),
    b'{"custom_id": "s", "prompt": "\\ud800"}\n',  # a lone surrogate: not UTF-8
    b'{"custom_id": "p", "prompt": "\\ud83d\\ude00"}\n',  # a pair: fine
    b'{"custom_id": "c", "prompt": "hi"\n',
    b'{"custom_id": "d", "prompt": "hi}\n',  # unterminated: the newline is in the string
    b'{"custom_id": "\xff", "prompt": "hi"}\n',
    b'{"custom_id": "", "prompt": "hi"}\n',
    b'{"custom_id": null, "prompt": "hi"}\n',
    b'{"custom_id": 5, "prompt": "hi"}\n',
    b'{"prompt": "hi"}\n',
    b'["a"]\n',
    b'{"custom_id": "m", "prompt": ""}\n',
    b'{"custom_id": "u", "method": "POST", "url": "/v2", "body": {}}\n',
    b'{"custom_id": "a", "prompt": "hi"} x\n',  # looks like a line for "a", is not JSON
    b"\n",
    b"  \r\n",
]


@pytest.mark.parametrize("seed", range(16))
async def test_the_check_plans_what_the_line_by_line_check_planned(
    tmp_path: Path, block_size: int, seed: int
) -> None:
    """Random inputs and answers: the same plan and problems as parse_line on each line."""
    rows = random.Random(seed)
    lines = rows.choices(INPUT_LINES, k=rows.randrange(1, 40))
    if seed % 4 == 0:
        lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte-order mark on line 1 is allowed
    if seed % 3 == 1:
        lines[-1] = lines[-1].rstrip(b"\r\n") or b" "  # a last line with no newline
    ids = ["a", "b", 'q"1', "\u00e9t\u00e9", "n", "big", "float", "s", "p", "m", "u", "zz"]
    ok = set(rows.sample(ids, rows.randrange(len(ids))))
    failed = set(rows.sample(ids, rows.randrange(4)))
    failed_lines = set(rows.sample(range(1, 41), rows.randrange(6)))
    answered = AnsweredKeys()
    for custom_id in ok:
        answered.keys.mark(custom_id, OK)
    for custom_id in failed:
        answered.keys.mark(custom_id, FAILED)
    answered.failed_lines |= failed_lines
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(lines))
    expected = reference_check(lines, ok, failed, failed_lines)
    problems = expected.pop("problems")
    with source.open("rb") as file:
        plan = await check_input(
            file, str(source), answered, default_model="m", skip_invalid=True, retry_failed=False
        )
        assert plan_terms(plan, lines) == expected
        if not problems:
            return
        with pytest.raises(trio_llm.BatchInputError) as caught:
            await check_input(
                file, str(source), answered, default_model="m", skip_invalid=False,
                retry_failed=False,
            )  # fmt: skip
    assert caught.value.invalid_lines == len(problems)
    assert (caught.value.line, caught.value.reason) == problems[0]
    for number, reason in problems[:10]:
        assert f"{source}:{number}: {reason}" in str(caught.value)


async def test_big_integers_are_valid_and_kept(
    tmp_path: Path, fake_llm: FakeLLMServer, block_size: int
) -> None:
    """A token id beyond 64 bits is valid, and the send pass reads it as that integer."""
    source = tmp_path / "in.jsonl"
    big = 123456789012345678901234567890
    source.write_bytes(EMBED % (b"big", b'{"input": [%d], "model": "e"}' % big))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
    assert (summary.succeeded, summary.invalid) == (1, 0)
    marked = Bits()
    marked.set(1)
    with source.open("rb") as file:
        [(number, raw)] = marked_lines(file, marked)
    request = parse_line(raw, number, default_model="m")  # what the run sends
    assert not isinstance(request, Invalid)
    assert request.body["input"] == [big]


async def test_a_resume_with_escaped_and_crlf_lines_sends_only_the_rest(
    tmp_path: Path, fake_llm: FakeLLMServer, block_size: int
) -> None:
    """Ids written with escapes, CRLF input: answered ones are skipped, the rest sent."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b'{"custom_id": "\\u00e9", "prompt": "hi"}\r\n'
        b'{"custom_id": "q\\"1", "prompt": "hi"}\r\n'
        b'{"custom_id": "new", "prompt": "hi"}\r\n'
    )
    target = tmp_path / "out.jsonl"
    target.write_bytes(record("\u00e9") + record('q"1'))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client)
    assert (summary.skipped, summary.succeeded) == (2, 1)
    assert [json.loads(line)["custom_id"] for line in target.read_bytes().splitlines()] == [
        "\u00e9",
        'q"1',
        "new",
    ]


async def test_a_second_check_with_the_same_keys_finds_no_duplicates(tmp_path: Path) -> None:
    """The check's own marks are cleared first: checking twice plans the same."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"custom_id": "a", "prompt": "hi"}\n{"custom_id": "b", "prompt": "x"}\n')
    answered = AnsweredKeys()
    with source.open("rb") as file:
        for _ in range(2):
            plan = await check_input(
                file, "in", answered, default_model="m", skip_invalid=False, retry_failed=False
            )
            assert (plan.to_send, plan.duplicates) == (2, {})


async def test_the_check_sizes_the_table_for_the_input_up_front(tmp_path: Path) -> None:
    """A first run (no answers yet): the table is made for the input's ids, not doubled."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b"".join(b'{"custom_id": "r%d", "prompt": "hi"}\n' % i for i in range(50_000))
    )
    answered = AnsweredKeys()
    with source.open("rb") as file:
        plan = await check_input(
            file, "in", answered, default_model="m", skip_invalid=False, retry_failed=False
        )
    assert (plan.to_send, len(answered.keys)) == (50_000, 50_000)
    assert answered.keys.nbytes() < 14 * 50_000


def test_keys_that_hash_to_the_last_slots_wrap_around(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probing past the table's last slot goes on at its first, through growth too."""
    from trio_llm.batch import _keys

    top = (1 << 64) - 1
    hashes = {f"k{i}": top - i for i in range(2000)}  # all want the very last slots
    monkeypatch.setattr(_keys, "key_hash", hashes.__getitem__)
    keys = _keys.KeyTable()
    for name in hashes:
        assert keys.mark(name, OK) == 0
    assert all(keys.flags(name) == OK for name in hashes)
    assert keys.flags("k0") == OK
    monkeypatch.setitem(hashes, "absent", top - 5000)
    assert keys.flags("absent") == 0


async def test_colliding_ids_are_planned_as_answered_when_the_output_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids of one hash: each is confirmed no duplicate, and counted answered, by the hash."""
    from trio_llm.batch import _input, _keys

    monkeypatch.setattr(_keys, "key_hash", lambda key: 7)
    monkeypatch.setattr(_input, "key_hash", lambda key: 7)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(b'{"custom_id": "r%d", "prompt": "hi"}\n' % i for i in range(3)))
    for flag, counted in ((OK, (3, 0)), (FAILED, (0, 3))):
        answered = AnsweredKeys()
        answered.keys.mark("r0", flag)  # r1 and r2 look answered too: one hash
        with source.open("rb") as file:
            plan = await check_input(
                file, "in", answered, default_model="m", skip_invalid=False, retry_failed=False
            )
        assert (plan.answered_ok, plan.answered_failed) == counted
        assert plan.duplicates == {}


async def test_a_duplicate_far_down_a_long_file_is_found(tmp_path: Path) -> None:
    """The exact second pass reads the whole file, checkpointing as it goes."""
    source = tmp_path / "in.jsonl"
    line = b'{"custom_id": "r%d", "prompt": "hi"}\n'
    source.write_bytes(b"".join(line % i for i in range(5000)) + line % 17)
    with source.open("rb") as file, pytest.raises(trio_llm.BatchInputError) as caught:
        await check_input(
            file, "in", AnsweredKeys(), default_model="m", skip_invalid=False, retry_failed=False
        )
    assert (caught.value.line, caught.value.reason) == (
        5001,
        "duplicate custom_id 'r17' (first on line 18)",
    )


def test_sizes_are_written_in_the_unit_of_the_total() -> None:
    """GB, MB or kB, by the size or by the total it is shown beside."""
    from trio_llm.batch._progress import format_size

    assert [format_size(n) for n in (3_710_000_000, 12_500_000, 900_000)] == [
        "3.71 GB",
        "12.5 MB",
        "900 kB",
    ]
    assert format_size(520_000_000, like=3_710_000_000) == "0.52 GB"
