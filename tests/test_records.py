import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneline.records import RecordError, read_jsonl, write_json, write_jsonl, write_text


def _write(tmp_path, data: bytes):
    path = tmp_path / "r.jsonl"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "line", "fragment"),
    [
        (b'{"id": 1}\n{"id": 2\n', 2, "invalid JSON"),
        (b'{"id": 1}\n{"id": "\xff"}\n', 2, "invalid UTF-8"),
        (b'{"id": 1, "x": NaN}\n', 1, "NaN is not valid JSON"),
        (b'{"id": 1, "x": Infinity}\n', 1, "Infinity is not valid JSON"),
        (b'{"id": 1, "id": 2}\n', 1, "duplicate key 'id'"),
        (b'[1, 2]\n', 1, "expected a JSON object, got list"),
        (b'{"id": 1}\n\n{"id": 2}\n', 2, "blank line"),
        (b'\xef\xbb\xbf{"id": 1}\n', 1, "byte-order mark"),
        (b'{"id": 1}\r\n{"id": 2}\r\n', 1, "CRLF"),
        (b"", 1, "file is empty"),
        (b'{"id": 1}\n{"id": 1}\n', 2, "duplicate id 1 (first on line 1)"),
        (b'{"x": 1}\n', 1, "missing required field 'id'"),
    ],
)
def test_malformed_lines_name_path_and_line(tmp_path, data, line, fragment):
    path = _write(tmp_path, data)
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_required_fields_and_types(tmp_path):
    path = _write(tmp_path, b'{"id": "a", "prompt": "p", "completion": 3}\n')
    with pytest.raises(RecordError, match=r":1: field 'completion' is int 3, expected str"):
        read_jsonl(path, required={"prompt": str, "completion": str})
    path = _write(tmp_path, b'{"id": "a", "n": true}\n')
    with pytest.raises(RecordError, match="expected int"):
        read_jsonl(path, required={"n": int})


def test_missing_final_newline_accepted_and_empty_allowed(tmp_path):
    assert read_jsonl(_write(tmp_path, b'{"id": 1}\n{"id": 2}')) == [{"id": 1}, {"id": 2}]
    assert read_jsonl(_write(tmp_path, b""), allow_empty=True) == []


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": 1}])
    before = path.read_bytes()

    def records():
        yield {"id": 2}
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_json_is_stable_and_refuses_nan(tmp_path):
    path = write_json(tmp_path / "m.json", {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"x": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    write_text(tmp_path / "t.txt", "a\nb\n")
    assert (tmp_path / "t.txt").read_bytes() == b"a\nb\n"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=5), max_size=6))
def test_round_trip(tmp_path_factory, payloads):
    tmp = tmp_path_factory.mktemp("rt")
    records = [{**p, "id": f"r{i}"} for i, p in enumerate(payloads)]
    path = tmp / "x.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path, allow_empty=True) == records
