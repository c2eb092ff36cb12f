import json

import pytest

from tuneline import modeling
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.stages import base


def test_base_from_local_dir(tiny_model_dir, tmp_path, capsys):
    paths = {"base_model": str(tmp_path / "m"), "reports": str(tmp_path / "reports")}
    params = parse_params({"base": {"source": str(tiny_model_dir)}, "paths": paths})
    metrics = base.run(params)
    prov = json.loads((tmp_path / "m" / "provenance.json").read_text())
    assert prov["kind"] == "local" and prov["content_sha256"] == metrics["content_sha256"]
    # the model dir is content only; the source path and the commit are in the sidecar
    run = json.loads((tmp_path / "reports/provenance/base.json").read_text())
    assert "git" not in prov and prov["source"] is None and "git" in run
    # git-tracked: no absolute path, the source outside the project named by content
    assert run["source"] == f"{tiny_model_dir.name} (outside the project; sha256 {prov['source_sha256']})"
    assert str(tiny_model_dir) not in (tmp_path / "reports/provenance/base.json").read_text()
    assert "model.safetensors" in prov["files"]
    assert "is outside the project, so DVC does not track it" in " ".join(capsys.readouterr().err.split())
    loaded = modeling.load(tmp_path / "m")
    assert loaded.provenance["content_sha256"] == metrics["content_sha256"]


def test_local_source_inside_the_project_is_recorded_relative(tiny_model_dir, chdir_tmp, capsys):
    import shutil

    shutil.copytree(tiny_model_dir, chdir_tmp / "ext" / "m")
    params = parse_params({"base": {"source": str(chdir_tmp / "ext" / "m")}})
    assert base.run(params)["source"] == "ext/m"
    assert json.loads((chdir_tmp / "reports/provenance/base.json").read_text())["source"] == "ext/m"
    assert "outside the project" not in capsys.readouterr().err


def test_base_offline_hub_id_is_a_clear_error(tmp_path):
    params = parse_params({"base": {"source": "someone/some-model"}, "paths": {"base_model": str(tmp_path / "m")}})
    with pytest.raises(InputError, match="downloading from the hub is off"):
        base.run(params)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_base_from_embedded_gguf_answers_an_easy_question(tmp_path):
    import torch

    params = parse_params({"paths": {"base_model": str(tmp_path / "m"), "reports": str(tmp_path / "reports")}})
    base.run(params)
    loaded = modeling.load(tmp_path / "m", parse_params({"model": {"format": "chat"}}).model)
    ids = torch.tensor([loaded.render_ids("What is the capital of France? Answer with one word.")])
    out = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
