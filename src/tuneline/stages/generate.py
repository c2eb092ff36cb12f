"""generate: build supervised examples from templates, a teacher model and imported files.

Reads:   ``paths.seed_dir``: ``destinations.jsonl`` and ``train_phrasings.json`` (template and
         teacher sources), ``gold.jsonl`` (teacher shots); ``paths.schema_file`` (canonical
         key order of template envelopes); the teacher model (``generate.sources.teacher.model``,
         default ``paths.base_model``) when enabled; ``generate.sources.import.path`` when enabled.
Writes:  ``paths.generated``/``sft.jsonl``, ``paths.generated``/``preferences.jsonl`` (imported
         preference triples, possibly empty), ``paths.metrics``/``generate.json``, the run record
         ``paths.reports``/``provenance/generate.json``.
Params:  ``task``, ``seed``, ``paths``, ``model`` (dtype/device for the teacher; the teacher
         is always prompted in completion format), ``generate``.

The template and teacher sources come from the task (``tuneline.tasks``; travel: the
knowledge base and phrasings, ``tuneline.datagen.travel``); a task without them (generic)
imports data only.

Records follow TRL's prompt/completion convention: ``prompt`` is the raw instruction (the
prompt format is applied in ``clean``), ``completion`` the answer text (canonical envelope
JSON for templates; the leniently extracted and canonicalised JSON for the teacher when it
parses, its raw text otherwise; imported text unchanged). Every record carries ``meta``
(``instruction``, ``source``, ``expect`` and, where known, ``payload_type``/``destination``)
and ``provenance`` (source, seed, generator version, file hashes, teacher decoding, shots,
or the imported file (relative to the repository root, the stage's working directory),
record number and line). Sources are mixed in the order template, teacher, import; each
source's ``max_records`` keeps a seeded subset in the original order.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneline import tasks
from tuneline.contract import load_contract
from tuneline.datagen import imports, teacher
from tuneline.errors import InputError
from tuneline.params import Params
from tuneline.provenance import project_path, sha256_file, sha256_path, write_run_provenance
from tuneline.records import write_json, write_jsonl

err = Console(stderr=True)


def run(params: Params) -> dict[str, Any]:
    sources = params.generate.sources
    task = tasks.get(params.task)
    contract = load_contract(params.paths.schema_file)
    records: list[dict[str, Any]] = []
    preferences: list[dict[str, Any]] = []
    details: dict[str, Any] = {}

    needs_templates = sources.template.enabled or sources.teacher.enabled
    if needs_templates and task.examples is None:
        raise InputError(
            f"generate.sources.template/teacher: task {task.name!r} has no template source; "
            "disable them (generate.sources.template.enabled: false) and import data, or pick a task that has one"
        )
    examples = task.examples(params) if needs_templates else []
    if sources.template.enabled:
        made = [task.template_record(e, params, contract) for e in examples]
        records += _cap(made, sources.template.max_records, params.seed, "template")
    if sources.teacher.enabled:
        made, details["teacher"] = teacher.teacher_records(params, task, examples, contract)
        records += _cap(made, sources.teacher.max_records, params.seed, "teacher")
    if sources.imported.enabled:
        made, prefs, details["import"] = _import_records(params)
        records += _cap(made, sources.imported.max_records, params.seed, "import")
        preferences += prefs

    out_dir = Path(params.paths.generated)
    write_jsonl(out_dir / "sft.jsonl", records)
    write_jsonl(out_dir / "preferences.jsonl", preferences)
    metrics = {
        "records": len(records),
        "preferences": len(preferences),
        "by_source": dict(sorted(Counter(r["meta"]["source"] for r in records).items())),
        "by_payload_type": dict(
            sorted(Counter(r["meta"].get("payload_type") or "unknown" for r in records).items())
        ),
        **details,
    }
    write_json(Path(params.paths.metrics) / "generate.json", metrics)
    write_run_provenance(
        params, "generate", {"seed": params.seed, "contract_sha256": sha256_file(params.paths.schema_file)}
    )
    return metrics


# -- teacher -----------------------------------------------------------------------------


# -- import ------------------------------------------------------------------------------


def _import_records(
    params: Params,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    ip = params.generate.sources.imported
    assert ip.path is not None  # enforced by the params model
    result = imports.read_import(ip.path, ip.format)
    file_hash = sha256_path(ip.path)
    file_ref, inside = project_path(ip.path, file_hash)
    outside = not inside
    _warn_import(params, Path(ip.path), outside, result)

    def provenance(line: int | None, record: int, original_id: Any) -> dict[str, Any]:
        prov: dict[str, Any] = {"source": "import", "file": file_ref}
        if outside:
            prov["outside_repo"] = True
        prov["file_sha256"] = file_hash
        if line is not None:
            prov["line"] = line
        prov["record"] = record
        prov["format"] = result.format
        if original_id is not None:
            prov["original_id"] = original_id
        return prov

    records = []
    for ex in result.examples:
        meta: dict[str, Any] = {
            "instruction": ex.instruction,
            "source": "import",
            "expect": dict(ex.expect),
        }
        if "payload_type" in ex.expect:
            meta["payload_type"] = ex.expect["payload_type"]
        if ex.system is not None:
            meta["system"] = ex.system
        records.append(
            {
                "id": f"import-{ex.record}",
                "prompt": ex.instruction,
                "completion": ex.completion,
                "meta": meta,
                "provenance": provenance(ex.line, ex.record, ex.original_id),
            }
        )
    preferences = [
        {
            "id": f"import-pref-{p.record}",
            "prompt": p.prompt,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "meta": {"instruction": p.prompt, "source": "import", "strategy": "imported"},
            "provenance": provenance(p.line, p.record, p.original_id),
        }
        for p in result.preferences
    ]
    stats: dict[str, Any] = {"file": file_ref}
    if outside:
        stats["outside_repo"] = True
    stats.update(
        {
            "layout": result.layout,
            "format": result.format,
            "examples": len(records),
            "preferences": len(preferences),
            "file_sha256": file_hash,
            "normalised": result.normalised,
        }
    )
    return records, preferences, stats


def _warn_import(params: Params, path: Path, outside: bool, result: imports.Imported) -> None:
    declared = (Path(params.paths.seed_dir) / "import").resolve()
    if declared != path.resolve() and declared not in path.resolve().parents:
        where = "outside the repository" if outside else f"not under {params.paths.seed_dir}/import"
        err.print(
            f"[yellow]warning:[/] generate.sources.import.path {path} is {where}, so it is not a "
            "dependency of the generate stage: dvc repro will not re-run generate when it "
            f"changes (put it in {params.paths.seed_dir}/import)",
            highlight=False,
        )
    norm = result.normalised
    if norm["bom"] or norm["crlf_lines"]:
        what = [
            *(["a UTF-8 byte-order mark dropped"] if norm["bom"] else []),
            *([f"{norm['crlf_lines']} CRLF line ends made LF"] if norm["crlf_lines"] else []),
        ]
        err.print(
            f"[yellow]warning:[/] {path}: {' and '.join(what)} (counted in metrics: import.normalised)",
            highlight=False,
        )


# -- mixing ------------------------------------------------------------------------------


def _cap(
    records: list[dict[str, Any]], limit: int | None, seed: int, source: str
) -> list[dict[str, Any]]:
    """A seeded subset of at most ``limit`` records, in their original order."""
    if limit is None or limit >= len(records):
        return records
    digest = hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()
    keep = sorted(random.Random(digest).sample(range(len(records)), limit))
    return [records[i] for i in keep]
