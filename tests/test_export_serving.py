"""export for serving: GGUF round trip through transformers' GGUF loader, the chat
template that renders the trained prompt, the Ollama Modelfile and the model card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from training_data import tiny_params
from tuneline.errors import InputError
from tuneline.export import GGUF_FILE, export
from tuneline.modeling import load
from tuneline.prompting import few_shot, render

PROMPTS = [
    "Plan a day in Lisbon.",
    "  Give me a checklist for a train trip to Paris, with the budget.  ",
    "Phrasebook: hello and thanks in Tokyo",
]
SYSTEM = "You answer with one JSON envelope."


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on every linear layer of the tiny model, with non-zero random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)  # large enough to change the greedy outputs
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(out))
    return out


def _params(tmp_path: Path, model_dir: Path, fmt: str = "completion"):
    # probe.models base: null is the bare base (paths.base_model), as `tuneline export base` finds it
    models = {"base": None, "sft": str(tmp_path / "models/sft"), "dpo": str(tmp_path / "models/dpo")}
    return tiny_params(tmp_path, model_dir, {"model": {"dtype": "float32", "format": fmt}, "probe": {"models": models}})


def _greedy(model, ids: list[int], pad: int) -> list[int]:
    tensor = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=12, do_sample=False,
            pad_token_id=pad, eos_token_id=None,
        )
    return out[0, len(ids):].tolist()


def _load_gguf(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=GGUF_FILE)
    return model.eval(), tokenizer


def _round_weights(model, gguf_type: str) -> None:
    """Round every 2-D weight as the GGUF type stores it (1-D weights stay float32)."""
    import gguf

    from tuneline.gguf_writer import TYPES

    qtype = gguf.GGMLQuantizationType[TYPES[gguf_type][0]]
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                data = param.detach().numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(data), qtype), qtype)
                param.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(data.shape)))


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_round_trip_matches_merged_model(
    tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path, gguf_type: str
) -> None:
    # The reference is the merged HF model with its 2-D weights rounded as the GGUF type
    # stores them; then token ids, greedy tokens and logits must agree (float32 logits to
    # 1e-5: the same weights, the same ops).
    params = _params(tmp_path, tiny_model_dir)
    hf_out, gguf_out = tmp_path / "hf", tmp_path / "gguf"
    export(params, adapter_dir, hf_out)
    prov = export(params, adapter_dir, gguf_out, fmt="gguf", gguf_type=gguf_type)
    assert prov["gguf"]["gguf_type"] == gguf_type and not prov["gguf"]["f16_fallback"]

    merged = load(hf_out, params.model)
    _round_weights(merged.model, gguf_type)
    model, tokenizer = _load_gguf(gguf_out)
    base = load(tiny_model_dir, params.model)
    changed = False
    for instruction in PROMPTS:
        text = str(render(instruction, "completion"))
        ids = merged.render_ids(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        ) == text
        with torch.no_grad():
            a = merged.model(input_ids=torch.tensor([ids])).logits
            b = model(input_ids=torch.tensor([ids])).logits
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        expected = _greedy(merged.model, ids, merged.tokenizer.pad_token_id)
        assert _greedy(model, ids, merged.tokenizer.pad_token_id) == expected
        changed |= expected != _greedy(base.model, ids, merged.tokenizer.pad_token_id)
    assert changed, "the adapter should change some greedy output"
    assert tokenizer.eos_token == merged.tokenizer.eos_token and tokenizer.bos_token == merged.tokenizer.bos_token


@pytest.mark.parametrize("fmt", ["completion", "chat"])
def test_hf_chat_template_renders_the_training_prompt(tmp_path: Path, tiny_model_dir: Path, fmt: str) -> None:
    from transformers import AutoTokenizer

    params = _params(tmp_path, tiny_model_dir, fmt)
    out = tmp_path / "hf"
    export(params, "base", out)
    exported = AutoTokenizer.from_pretrained(str(out))
    trained = load(tiny_model_dir, params.model)  # the loader the stages train and probe with
    for instruction in [*PROMPTS, "ünïcödé\tinstruction\n"]:
        for system in (None, SYSTEM, f"  {SYSTEM}\n"):
            prompt = render(instruction, fmt, system=system)
            messages = prompt if fmt == "chat" else (
                [{"role": "system", "content": system}] if system else []
            ) + [{"role": "user", "content": instruction}]
            text = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if fmt == "completion":
                assert text == prompt
            else:
                assert text == trained.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            assert exported(text, add_special_tokens=False)["input_ids"] == trained.render_ids(prompt)
    if fmt == "completion":
        # Several system messages join with a blank line, as imported conversations do.
        two = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
               {"role": "user", "content": "Q"}]
        assert exported.apply_chat_template(two, add_generation_prompt=True, tokenize=False) == render(
            "Q", "completion", system="A.\n\nB."
        )
        # A full exchange is the trained sequence: prompt, completion, EOS.
        full = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "{}"}]
        assert exported.apply_chat_template(full, tokenize=False) == render("Q", "completion") + "{}<|im_end|>"
        assert few_shot([], "Q") == render("Q", "completion")
    assert (out / "README.md").is_file()


def _render_go(template: str, system: str, prompt: str) -> str:
    """Ollama's last-turn rendering of the exported TEMPLATE's shape: ``if .System``/
    ``else``/``end``, ``.System``, ``.Prompt``; everything from ``.Response`` on is cut."""
    template = template.split("{{ .Response }}")[0].replace('{{ "{{" }}', "\x00")
    match = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}", template, re.S)
    if match:
        template = match.group(1) if system else match.group(2)
    assert "{{" not in template.replace("{{ .System }}", "").replace("{{ .Prompt }}", ""), template
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("\x00", "{{")


@pytest.mark.parametrize("fmt", ["completion", "chat"])
def test_modelfile_renders_the_training_prompt(tmp_path: Path, tiny_model_dir: Path, fmt: str) -> None:
    params = _params(tmp_path, tiny_model_dir, fmt)
    out = tmp_path / "gguf"
    export(params, tiny_model_dir, out, fmt="gguf", gguf_type="f16")
    text = (out / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[1] == f"FROM ./{GGUF_FILE}"
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "PARAMETER temperature 0" in lines and "PARAMETER num_predict 320" in lines
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    trained = load(tiny_model_dir, params.model)
    for system in (None, SYSTEM):
        prompt = render(PROMPTS[0], fmt, system=system)
        expected = prompt if fmt == "completion" else trained.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=False
        )
        assert _render_go(template, system or "", PROMPTS[0]) == expected
    if fmt == "completion":
        assert template == (
            '{{ if .System }}{{ .System }}\n\n### Instruction\n{{ .Prompt }}\n\n### Response\n{{ else }}'
            "### Instruction\n{{ .Prompt }}\n\n### Response\n{{ end }}{{ .Response }}<|im_end|>"
        )
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "license: other" in card and "- gguf" in card
    assert f"No probe results: `{tmp_path / 'metrics/probe/heldout/base.json'}` was not found" in card
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert prov["export_format"] == "gguf" and prov["merged_adapters"] == []


def test_card_reads_probe_results_and_run_provenance(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path) -> None:
    from tuneline.records import write_json

    params = tiny_params(tmp_path, tiny_model_dir, {"model": {"dtype": "float32"},
                                                   "probe": {"models": {"sft": str(adapter_dir)}},
                                                   "compare": {"baseline": "sft", "pairs": []}})
    out = tmp_path / "hf"
    export(params, "sft", out, name="sft")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"No probe results: `{tmp_path / 'metrics/probe/heldout/sft.json'}` was not found" in card
    assert "No run provenance:" in card
    write_json(tmp_path / "metrics/probe/heldout/sft.json", {"parse_rate": 0.75, "n": 4})
    write_json(tmp_path / "metrics/probe/natural/sft.json", {"parse_rate": 0.5, "n": 2})
    write_json(tmp_path / "reports/provenance/probe/sft.json",
               {"suites": {"heldout": {"suite": "s.jsonl"}}, "decoding": {"do_sample": False}})
    write_json(tmp_path / "reports/provenance/sft.json", {"stage": "sft", "git": {"sha": "abc123", "dirty": False}})
    export(params, adapter_dir, out, force=True)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| parse_rate | 0.75 |" in card and "git `abc123`" in card and "- sft" in card
    assert "| parse_rate | 0.5 |" in card and "(suite natural, `?`)" in card
    assert "(suite heldout, `s.jsonl`)" in card and '`{"do_sample": false}`' in card  # from the probe's run record


def test_export_refuses_bad_out_format_and_architecture(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path) -> None:
    params = _params(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="exists and is not empty; pass --force"):
        export(params, adapter_dir, out)
    assert (out / "keep.txt").is_file()
    with pytest.raises(InputError, match="would overwrite an input"):
        export(params, adapter_dir, adapter_dir / "merged", force=True)
    with pytest.raises(InputError, match="would overwrite an input"):
        export(params, adapter_dir, tiny_model_dir.parent, force=True)
    with pytest.raises(InputError, match=r"--format 'onnx': not supported \(allowed: hf, gguf\)"):
        export(params, adapter_dir, tmp_path / "x", fmt="onnx")
    with pytest.raises(InputError, match=r"--gguf-type 'q2_k': not supported"):
        export(params, adapter_dir, tmp_path / "x", fmt="gguf", gguf_type="q2_k")

    from transformers import AutoConfig, AutoModelForCausalLM

    other = tmp_path / "gpt2"
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=600)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(other))
    for file in tiny_model_dir.glob("tokenizer*"):
        (other / file.name).write_bytes(file.read_bytes())
    with pytest.raises(InputError, match=r"architecture 'gpt2' \(GPT2LMHeadModel\) is not supported; supported: llama"):
        export(params, other, tmp_path / "x", fmt="gguf")
    assert not (tmp_path / "x").exists()
