"""pairs stage: every negative strategy fails the contract while its chosen passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_data import SCHEMA, clean_records, tiny_params, write_clean
from tuneline import negatives
from tuneline.contract import load_contract, parse_lenient
from tuneline.errors import InputError
from tuneline.records import read_jsonl, write_jsonl
from tuneline.stages import pairs
from tuneline.tasks import travel

ALL_STRATEGIES = {**negatives.STRATEGIES, **travel.TASK.negatives}


def _records() -> list[dict]:
    records = clean_records()
    for n, r in enumerate(records, start=1):
        r["_line"] = n
    return records


@pytest.mark.parametrize("strategy", sorted(ALL_STRATEGIES))
def test_each_strategy_rejected_fails_chosen_passes(strategy: str) -> None:
    contract = load_contract(SCHEMA)
    records = _records()
    made, skipped = negatives.negatives(records, contract, [strategy], 1, 0, Path("train.jsonl"), travel.TASK)
    assert len(made) == len(records) and not skipped
    for pair in made:
        expect = pair["meta"]["expect"]
        assert pair["meta"]["strategy"] == strategy
        assert contract.judge(pair["chosen"], expect, strict=True).passes
        verdict = contract.judge(pair["rejected"], expect, strict=True)
        assert not verdict.passes
        assert pair["rejected"] != pair["chosen"]
        if strategy != "run_on":  # everything else fails the lenient reading too
            assert not contract.judge(pair["rejected"], expect).passes
        if strategy in ("truncate", "invalid_json"):
            assert not parse_lenient(pair["rejected"]).ok
        if strategy == "array_root":
            assert isinstance(parse_lenient(pair["rejected"]).value, list)
        if strategy == "drop_field":
            assert not verdict.valid
        if strategy == "off_topic":
            assert verdict.valid and not verdict.checks["destination"]
        if strategy == "wrong_payload_type":
            assert not verdict.checks["payload_type"]
        if strategy == "repeat_item":
            # cut mid-loop at twice the envelope's length; the tail is one item over and over
            assert not parse_lenient(pair["rejected"]).ok
            assert len(pair["rejected"]) == 2 * len(pair["chosen"])
            # past the point where it leaves the envelope, the text is one of the longest
            # list's items repeated, comma-separated, until the cut
            chosen, rejected = pair["chosen"], pair["rejected"]
            start = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
            tail = rejected[start:]
            longest = max(negatives._lists(json.loads(chosen)), key=lambda lst: (len(lst), len(json.dumps(lst))))
            units = ["," + contract.canonical_text(item) for item in longest]
            assert any(tail == (unit * (len(tail) // len(unit) + 1))[: len(tail)] for unit in units)
        if strategy == "run_on":
            # the whole chosen document, then only closing braces: the lenient parse reads
            # the document (and passes it), the strict judge refuses the text
            assert pair["rejected"].startswith(pair["chosen"])
            tail = pair["rejected"][len(pair["chosen"]):]
            assert set(tail) == {"}"} and 8 <= len(tail) <= 48
            assert parse_lenient(pair["rejected"]).value == json.loads(pair["chosen"])
            assert contract.judge(pair["rejected"], expect).passes


def test_run_counts_strategies_imports_and_is_seeded(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir)
    write_clean(params, clean_records(), val=0)
    write_jsonl(  # an imported triple as clean keeps it: the prompt in the model format
        Path(params.paths.clean) / "preferences.jsonl",
        [{"id": "p1", "prompt": "### Instruction\nPlan a day in Rome.\n\n### Response\n", "chosen": "{}",
          "rejected": "no", "meta": {"from": "x"}}],
    )
    metrics = pairs.run(params)
    out = Path(params.paths.pairs) / "train.jsonl"
    first = out.read_bytes()
    rows = read_jsonl(out)
    assert metrics["pairs"] == len(rows) == 11
    assert sum(metrics["per_strategy"].values()) == 11 and metrics["per_strategy"]["imported"] == 1
    assert set(metrics["per_strategy"]) == {*ALL_STRATEGIES, "imported"}
    assert all(r["meta"]["strategy"] for r in rows)
    imported = next(r for r in rows if r["meta"]["strategy"] == "imported")
    assert imported["prompt"] == "### Instruction\nPlan a day in Rome.\n\n### Response\n"
    assert json.loads((tmp_path / "metrics/pairs.json").read_text())["per_strategy"] == metrics["per_strategy"]
    pairs.run(params)
    assert out.read_bytes() == first


def test_invalid_chosen_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir)
    records = clean_records()
    records[2]["completion"] = records[2]["completion"][:-1]
    write_clean(params, records, val=0)
    with pytest.raises(InputError, match=r"train.jsonl:3: the completion of record .* fails the contract"):
        pairs.run(params)


def test_on_policy_samples_the_sft_model_and_pairs_best_with_worst(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real sampling from base + SFT adapter runs end to end; pairing ranks by the contract."""
    from tuneline.stages import sft

    params = tiny_params(
        tmp_path, tiny_model_dir,
        {"pairs": {"strategies": ["drop_field"], "on_policy": True, "on_policy_k": 2,
                   "on_policy_max_prompts": 3, "on_policy_max_new_tokens": 6, "on_policy_batch_size": 2}},
    )
    write_clean(params)
    sft.run(params)
    records = _records()[2:]
    for n, r in enumerate(records, start=1):
        r["_line"] = n
    from tuneline.modeling import load_for_eval

    samples = pairs.sample(load_for_eval(params, params.paths.sft_model), [r["prompt"] for r in records[:2]], params)
    assert [len(group) for group in samples] == [2, 2]
    assert all(isinstance(text, str) and logp <= 0 for group in samples for text, logp in group)

    # Pairing: the strict contract score decides first, mean log-prob breaks ties; a
    # sample that runs on after its document scores below the one that stops.
    contract = load_contract(SCHEMA)
    valid, third = records[0]["completion"], records[2]["completion"]
    fake = [[("not json", -0.1), (valid, -2.0)], [("still not json", -0.5), ("nor this", -0.2)],
            [(third + "}}}}", -0.1), (third, -2.0)]]
    monkeypatch.setattr(pairs, "sample", lambda loaded, prompts, p: fake[: len(prompts)])
    made = pairs.on_policy(records, contract, params)
    assert len(made) == 2  # the second prompt's samples score the same: no pair
    assert made[0]["chosen"] == valid and made[0]["rejected"] == "not json"
    assert made[0]["meta"]["strategy"] == "on_policy"
    assert made[0]["meta"]["chosen_score"] > made[0]["meta"]["rejected_score"]
    assert made[1]["chosen"] == third and made[1]["rejected"] == third + "}}}}"
