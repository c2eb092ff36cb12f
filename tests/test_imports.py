"""Importing a user's own files: layouts, errors with path:line, normalisation, speed,
repo-relative provenance, and datasets / Parquet / CSV sources."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tuneline.datagen import imports
from tuneline.errors import InputError
from tuneline.params import Params, parse_params
from tuneline.records import RecordError, read_jsonl
from tuneline.stages import generate

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "data" / "seed"


def params_for(tmp_path: Path, src: Path | str, fmt: str = "auto", seed_dir: str = str(SEED), **extra: Any) -> Params:
    return parse_params(
        {
            "paths": {
                "seed_dir": seed_dir,
                "schema_file": str(SEED / "contract.schema.json"),
                "generated": str(tmp_path / "generated"),
                "metrics": str(tmp_path / "metrics"),
                "base_model": str(tmp_path / "no-base-model"),
            },
            "generate": {
                "sources": {
                    "template": {"enabled": False},
                    "import": {"enabled": True, "path": str(src), "format": fmt},
                }
            },
            **extra,
        }
    )


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def alpaca(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"instruction": f"Question {i}", "input": "", "output": f"Answer {i}"} for i in range(start, start + n)]


# -- file layout errors ------------------------------------------------------------------


def test_directory_is_a_clear_error(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(InputError, match=r"folder: is a directory.*generate\.sources\.import\.path"):
        imports.read_import(folder)


def test_deep_nesting_is_a_clear_error(tmp_path):
    deep = write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(RecordError, match=r"deep\.json:1: .*nesting is too deep"):
        imports.read_import(deep)
    deep_line = write(tmp_path / "deep.jsonl", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(RecordError, match=r"deep\.jsonl:1: .*nesting is too deep"):
        imports.read_import(deep_line)


def test_trailing_comma_in_an_array_is_refused(tmp_path):
    src = write(tmp_path / "t.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n]\n')
    with pytest.raises(RecordError, match=r"t\.json:3: trailing comma .*strict JSON"):
        imports.read_import(src)
    with pytest.raises(RecordError, match=r"u\.json:1: .*','"):
        imports.read_import(write(tmp_path / "u.json", "[,]"))


def test_invalid_utf8_names_line_and_byte(tmp_path):
    src = write(tmp_path / "bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: invalid UTF-8 at byte 53"):
        imports.read_import(src)


def test_duplicate_ids_are_refused_with_both_lines(tmp_path):
    rows = [{"id": "a", "prompt": "p", "completion": "c"}, {"id": "b", "prompt": "p", "completion": "c"},
            {"id": "a", "prompt": "q", "completion": "d"}]
    src = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"d\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        imports.read_import(src)
    arr = write(tmp_path / "d.json", json.dumps(rows))
    with pytest.raises(RecordError, match=r"d\.json:1: record 3: duplicate id 'a' \(first at record 1, line 1\)"):
        imports.read_import(arr)
    bad_id = write(tmp_path / "i.jsonl", json.dumps({"id": [1], "prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(RecordError, match=r"i\.jsonl:1: 'id' must be a string or integer, got \[1\]"):
        imports.read_import(bad_id)


# -- meta.expect -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ({"payload_type": ["budget"]}, r"meta\.expect\.payload_type is \[\"budget\"\]; allowed: a string, number, boolean or null"),
        ({"payload.destination": {"x": 1}}, r"meta\.expect\.payload\.destination is \{\"x\": 1\}; allowed"),
        ({"": "x"}, r"meta\.expect has an empty path"),
    ],
)
def test_expect_values_are_validated_and_nothing_is_written(tmp_path, expect, message):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d", "meta": {"expect": expect}}]
    src = write(tmp_path / "e.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"e\.jsonl:2: " + message):
        generate.run(params_for(tmp_path, src))
    assert not (tmp_path / "generated").exists() and not (tmp_path / "metrics").exists()


# -- arrays: distinct ids and element positions ------------------------------------------


def test_one_line_array_gives_distinct_ids_and_element_positions(tmp_path):
    rows = alpaca(3)
    rows[1]["meta"] = {"expect": {"payload_type": "budget"}}
    src = write(tmp_path / "one.json", json.dumps(rows))
    generate.run(params_for(tmp_path, src))
    records = read_jsonl(tmp_path / "generated" / "sft.jsonl")  # would fail on duplicate ids
    assert [r["id"] for r in records] == ["import-1", "import-2", "import-3"]
    assert [(r["provenance"]["line"], r["provenance"]["record"]) for r in records] == [(1, 1), (1, 2), (1, 3)]
    rows[2]["output"] = ""
    src = write(tmp_path / "one.json", json.dumps(rows))
    with pytest.raises(RecordError, match=r"one\.json:1: record 3: 'output' must be a non-empty string"):
        imports.read_import(src)
    pretty = write(tmp_path / "pretty.json", json.dumps(alpaca(3), indent=2))
    assert [(e.line, e.record) for e in imports.read_import(pretty).examples] == [(2, 1), (7, 2), (12, 3)]


# -- CRLF and BOM ------------------------------------------------------------------------


def test_crlf_and_bom_are_normalised_counted_and_warned(tmp_path, capsys):
    body = "".join(json.dumps(r) + "\r\n" for r in alpaca(3))
    src = write(tmp_path / "win.jsonl", b"\xef\xbb\xbf" + body.encode())
    metrics = generate.run(params_for(tmp_path, src))
    assert metrics["import"]["normalised"] == {"bom": True, "crlf_lines": 3}
    assert [r["completion"] for r in read_jsonl(tmp_path / "generated" / "sft.jsonl")] == ["Answer 0", "Answer 1", "Answer 2"]
    assert "warning:" in capsys.readouterr().err
    arr = write(tmp_path / "win.json", b"\xef\xbb\xbf" + json.dumps(alpaca(2), indent=1).replace("\n", "\r\n").encode())
    result = imports.read_import(arr)
    assert result.normalised == {"bom": True, "crlf_lines": 11} and len(result.examples) == 2
    clean = write(tmp_path / "unix.jsonl", json.dumps(alpaca(1)[0]) + "\n")
    assert imports.read_import(clean).normalised == {"bom": False, "crlf_lines": 0}


# -- speed -------------------------------------------------------------------------------


def test_a_large_array_imports_in_linear_time(tmp_path):
    src = write(tmp_path / "big.json", json.dumps(alpaca(20_000), indent=2))
    start = time.perf_counter()
    result = imports.read_import(src)
    elapsed = time.perf_counter() - start
    assert len(result.examples) == 20_000 and result.examples[-1].line == 20_000 * 5 - 3
    assert elapsed < 8, f"{elapsed:.1f}s"


# -- provenance paths --------------------------------------------------------------------


def test_paths_are_repo_relative_or_basename_with_a_warning(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "data" / "seed" / "import").mkdir(parents=True)
    inside = write(repo / "data" / "seed" / "import" / "mine.jsonl", json.dumps(alpaca(1)[0]) + "\n")
    outside = write(tmp_path / "elsewhere.jsonl", json.dumps(alpaca(1)[0]) + "\n")
    monkeypatch.chdir(repo)
    metrics = generate.run(params_for(repo / "out", inside.resolve(), seed_dir="data/seed"))
    (record,) = read_jsonl(repo / "out" / "generated" / "sft.jsonl")
    assert record["provenance"]["file"] == "data/seed/import/mine.jsonl"
    assert metrics["import"]["file"] == "data/seed/import/mine.jsonl"
    assert "warning:" not in capsys.readouterr().err  # under the declared dependency
    metrics = generate.run(params_for(repo / "out", outside))
    (record,) = read_jsonl(repo / "out" / "generated" / "sft.jsonl")
    assert record["provenance"]["file"].startswith("elsewhere.jsonl (outside the project; sha256 ") and record["provenance"]["outside_repo"] is True
    assert record["provenance"]["file_sha256"] == metrics["import"]["file_sha256"]
    text = (repo / "out" / "metrics" / "generate.json").read_text() + (repo / "out" / "generated" / "sft.jsonl").read_text()
    assert str(tmp_path) not in text
    assert "not a dependency" in capsys.readouterr().err


# -- datasets, Parquet and CSV -----------------------------------------------------------


def test_datasets_parquet_and_csv_sources(tmp_path):
    import datasets

    rows = [
        {"id": "r1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                                  {"role": "assistant", "content": "A1"}], "meta": {"expect": {"payload_type": "budget"}}},
        {"id": "r2", "messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
         "meta": {"expect": {"payload.destination": "Oslo"}}},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    result = imports.read_import(tmp_path / "saved")
    assert (result.layout, result.format) == ("datasets", "messages")
    assert [(e.instruction, e.completion, e.system, e.expect, e.original_id, e.record) for e in result.examples] == [
        ("Q1", "A1", "Be brief.", {"payload_type": "budget"}, "r1", 1),
        ("Q2", "A2", None, {"payload.destination": "Oslo"}, "r2", 2),
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    assert [e.instruction for e in imports.read_import(tmp_path / "dd").examples] == ["Q1"]

    datasets.Dataset.from_list(alpaca(3)).to_parquet(str(tmp_path / "a.parquet"))
    metrics = generate.run(params_for(tmp_path, tmp_path / "a.parquet"))
    records = read_jsonl(tmp_path / "generated" / "sft.jsonl")
    assert metrics["import"]["layout"] == "parquet" and [r["completion"] for r in records] == ["Answer 0", "Answer 1", "Answer 2"]
    assert [r["provenance"]["record"] for r in records] == [1, 2, 3] and "line" not in records[0]["provenance"]

    write(tmp_path / "p.csv", 'prompt,chosen,rejected\nP1,"{""a"": 1}",[]\nP2,yes,no\n')
    prefs = imports.read_import(tmp_path / "p.csv")
    assert prefs.format == "preference" and [(p.prompt, p.chosen) for p in prefs.preferences] == [("P1", '{"a": 1}'), ("P2", "yes")]
    write(tmp_path / "bad.csv", "instruction,output\nQ,A\nQ2,\n")
    with pytest.raises(InputError, match=r"bad\.csv: row 2: keys \['instruction'\] do not match format 'alpaca'"):
        imports.read_import(tmp_path / "bad.csv")
    write(tmp_path / "junk.parquet", "not parquet")
    with pytest.raises(InputError, match=r"junk\.parquet: cannot read it as parquet"):
        imports.read_import(tmp_path / "junk.parquet")
    with pytest.raises(InputError, match=r"missing\.parquet: import file not found"):
        imports.read_import(tmp_path / "missing.parquet")
