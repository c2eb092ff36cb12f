"""sft stage: completion-only labels with the terminator, plan, guards, resume, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training_data import clean_records, tiny_params, write_clean
from tuneline.errors import InputError, TunelineError
from tuneline.modeling import load
from tuneline.records import write_json
from tuneline.stages import sft
from tuneline.training import MARKER, GuardCallback, loop, manifest, resume_checkpoint
from tuneline.training import sft as sft_method


def test_prompt_masked_terminator_in_loss(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir)
    loaded = load(tiny_model_dir, params.model)
    records = clean_records()[:3]
    for n, r in enumerate(records, start=1):
        r["_line"] = n
    rows, stats = sft_method.tokenize(loaded, records, 2048, Path("train.jsonl"))
    trainer = sft_method.build_trainer(params, loaded, rows, [], tmp_path / "ckpt")
    eos = loaded.tokenizer.eos_token_id
    assert loaded.tokenizer.pad_token_id == eos  # the case where a naive collator would mask the terminator
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for i, record in enumerate(records):
        prompt_len = len(loaded.render_ids(record["prompt"]))
        length = int(batch["attention_mask"][i].sum())
        labels = batch["labels"][i]
        assert (labels[:prompt_len] == -100).all()
        assert (labels[prompt_len:length] != -100).all()
        assert int(batch["input_ids"][i][length - 1]) == eos
        assert int(labels[length - 1]) == eos  # the terminator is inside the loss
        assert (labels[length:] == -100).all()  # padding is not
    assert stats["completion_tokens"] == int((batch["labels"] != -100).sum())


def test_sft_run_outputs(tmp_path: Path, tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    params = tiny_params(tmp_path, tiny_model_dir)
    write_clean(params)
    metrics = sft.run(params)
    shown = capfd.readouterr()
    # one progress line with the loss, not the Trainer's log dict per step
    assert "{'loss'" not in shown.out + shown.err and "'learning_rate'" not in shown.out + shown.err
    assert "sft: 100%" in shown.err and "2/2" in shown.err and "loss=" in shown.err
    out = Path(params.paths.sft_model)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stack"] == [params.paths.sft_model] and prov["parent"] is None
    assert prov["base"]["content_sha256"] and prov["data"] and "git" not in prov and "versions" not in prov
    run = json.loads((tmp_path / "reports/provenance/sft.json").read_text())
    assert run["git"] and run["versions"]["trl"] and run["adapter_sha256"] == prov["adapter_sha256"]
    assert "## Plan" in (out / "README.md").read_text()
    written = json.loads((tmp_path / "metrics/sft.json").read_text())
    assert set(written) == {"train_loss", "eval_loss"}  # the numbers compared; the rest is the run record's
    assert all(torch.isfinite(torch.tensor(written[k])) for k in ("train_loss", "eval_loss"))
    recorded = run["run"]
    assert recorded["plan"]["optimizer_steps"] == metrics["steps"] == recorded["steps"] == 2
    assert recorded["plan"]["records"] == 8 and recorded["tokens_seen"] > 0 and recorded["max_weight_change"] > 0
    assert recorded["log"].endswith("metrics/sft") and "runtime_s" in recorded
    weights = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    # DVCLive's layout, x = optimizer step, one row per logging step, no timestamps
    live = tmp_path / "metrics/sft"
    loss = (live / "plots/metrics/loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and [row.split("\t")[0] for row in loss[1:]] == ["1", "2"]
    assert (live / "plots/metrics/eval/loss.tsv").read_text().startswith("step\tloss\n")
    assert (live / "plots/metrics/learning_rate.tsv").is_file()
    assert json.loads((live / "metrics.json").read_text())["step"] == 2
    assert not (tmp_path / "dvc.yaml").exists() and not list(tmp_path.glob(".dvc*")) and not (tmp_path / "dvclive").exists()
    assert not list((tmp_path / "models/checkpoints/sft").glob("checkpoint-*"))


def test_plan_warns_then_fails_when_strict(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir, {"sft": {"min_optimizer_steps": 100}})
    write_clean(params)
    metrics = sft.run(params)
    assert any("only 2 optimizer steps" in w for w in metrics["warnings"])
    strict = tiny_params(tmp_path / "strict", tiny_model_dir, {"sft": {"min_optimizer_steps": 100, "strict_plan": True}})
    write_clean(strict)
    with pytest.raises(InputError, match=r"sft.min_optimizer_steps: .*only 2 optimizer steps.*strict_plan"):
        sft.run(strict)
    assert not Path(strict.paths.sft_model).exists()


def test_non_finite_loss_stops_without_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir, {"sft": {"trainer": {"learning_rate": 1e38, "max_grad_norm": 1e38}}})
    write_clean(params)
    with pytest.raises(TunelineError, match=r"at step \d+; training stopped|at step \d+ made weight"):
        sft.run(params)
    assert not Path(params.paths.sft_model).exists()


def test_zero_learning_rate_fails(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir, {"sft": {"trainer": {"learning_rate": 0.0}}})
    write_clean(params)
    with pytest.raises(TunelineError, match="identical to their initial values"):
        sft.run(params)
    assert not Path(params.paths.sft_model).exists()


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 records, batch 2: 4 steps per epoch, 2 epochs; checkpoints every 3 steps.
    overrides = {"sft": {"trainer": {"num_train_epochs": 2, "per_device_train_batch_size": 2, "save_steps": 3}}}
    straight = tiny_params(tmp_path / "a", tiny_model_dir, overrides)
    write_clean(straight)
    sft.run(straight)

    resumed = tiny_params(tmp_path / "b", tiny_model_dir, overrides)
    write_clean(resumed)

    class KilledAtStep5(GuardCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if state.global_step == 5:
                raise Interrupt("killed")

    monkeypatch.setattr(loop, "GuardCallback", KilledAtStep5)
    with pytest.raises(Interrupt):
        sft.run(resumed)
    ckpts = Path(resumed.paths.checkpoints) / "sft"
    assert (ckpts / "checkpoint-3" / MARKER).is_file()
    (ckpts / "checkpoint-7").mkdir()  # a save that was cut off: no marker, must be ignored
    (ckpts / "checkpoint-7" / "adapter_model.safetensors").write_bytes(b"partial")
    assert not Path(resumed.paths.sft_model).exists()

    monkeypatch.undo()
    saved = torch.load(ckpts / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    seen: dict = {"steps": []}

    class Watch(GuardCallback):
        """What the trainer did in the resumed run, from its own state."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN003
            seen["start"] = state.global_step
            seen["optimizer"] = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()}

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            seen["steps"].append(state.global_step)
            super().on_step_end(args, state, control, **kwargs)

    monkeypatch.setattr(loop, "GuardCallback", Watch)
    metrics = sft.run(resumed)
    # the trainer began at the checkpoint's step with its optimizer state, and ran only the rest
    assert seen["start"] == 3 and seen["steps"] == [4, 5, 6, 7, 8]
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 8
    assert saved and seen["optimizer"].keys() == saved.keys()
    for index, state in saved.items():
        assert int(state["step"]) == 3
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(seen["optimizer"][index][name].cpu(), state[name]), (index, name)
    a = load_file(Path(straight.paths.sft_model) / "adapter_model.safetensors")
    b = load_file(Path(resumed.paths.sft_model) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # the DVCLive log of the resumed run holds every step, the ones before the checkpoint
    # replayed from the trainer state it restored
    steps = [r.split("\t")[0] for r in (Path(resumed.paths.metrics) / "sft/plots/metrics/loss.tsv").read_text().splitlines()]
    assert steps == ["step", *map(str, range(1, 9))]
    # the finished run leaves only its record: no checkpoint, no model card the trainer
    # wrote at a save (its tag order follows the hash seed, so the directory would not
    # be the same bytes on a re-run)
    assert sorted(p.name for p in ckpts.iterdir()) == ["finished.json"]


def test_resume_metric_comes_from_the_trainer(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer that ignores the checkpoint it is given and starts over is caught."""
    from tuneline.training import callbacks

    params = tiny_params(tmp_path, tiny_model_dir, {"sft": {"trainer": {"per_device_train_batch_size": 2, "save_steps": 2}}})
    write_clean(params)
    monkeypatch.setattr(loop, "GuardCallback", _killer(3))
    with pytest.raises(Interrupt):
        sft.run(params)
    monkeypatch.undo()
    original = loop.train_with_checkpoints
    monkeypatch.setattr(loop, "train_with_checkpoints", lambda trainer, resume, d, s: original(trainer, None, d, s))
    with pytest.raises(TunelineError, match=r"resuming from .*checkpoint-2, the trainer began at step 0, not 2"):
        sft.run(params)
    assert not Path(params.paths.sft_model).exists()
    start = callbacks.StartCallback()
    start.start_step, start.steps_run = 2, 5
    with pytest.raises(TunelineError, match="ran 5 optimizer steps from step 2 to 5"):
        start.check(Path("checkpoint-2"), 5, "sft")


def _killer(step: int) -> type:
    class Killed(GuardCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if state.global_step == step:
                raise Interrupt("killed")

    return Killed


def _fake_checkpoint(root: Path, step: int, run_id: str) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    write_json(ckpt / MARKER, {"fingerprint": run_id, "step": step, "files": manifest(ckpt)})
    return ckpt


def test_resume_picks_newest_complete_and_refuses_lone_corrupt(tmp_path: Path) -> None:
    good = _fake_checkpoint(tmp_path, 2, "run")
    newest = _fake_checkpoint(tmp_path, 4, "run")
    (newest / "adapter_model.safetensors").write_bytes(b"bit rot")
    other = _fake_checkpoint(tmp_path, 6, "another-run")
    assert resume_checkpoint(tmp_path, "run", "sft") == good
    assert not other.exists()  # checkpoints of a different run are dropped
    import shutil

    shutil.rmtree(good)
    with pytest.raises(TunelineError, match=r"checkpoint-4 \(adapter_model.safetensors differs"):
        resume_checkpoint(tmp_path, "run", "sft")
    assert resume_checkpoint(tmp_path / "none", "run", "sft") is None


def test_completion_with_special_token_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir)
    records = clean_records()
    records[3]["completion"] += "<|im_end|>"
    write_clean(params, records)
    with pytest.raises(InputError, match=r"train.jsonl:2: completion contains special token"):
        sft.run(params)
