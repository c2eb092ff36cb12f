"""export: the serving hand-off: a merged model as safetensors or GGUF, prompt included.

``tuneline export MODEL --format hf|gguf --out DIR``: MODEL is a name from
``probe.models`` (``base``, ``sft``, ``dpo``), an adapter directory or a model directory.
Export loads ``paths.base_model`` through the one loader, merges MODEL's parent chain
(``provenance.json`` ``"parent"``) and then MODEL itself (nothing for a model directory),
and writes DIR atomically (a temp directory swapped in whole):

- ``hf``: dense safetensors, config, tokenizer and ``README.md`` (a model card) and
  ``provenance.json``. The tokenizer's ``chat_template`` renders exactly the prompt the
  model was trained on: for ``model.format: completion``, :func:`completion_chat_template`
  (the ``### Instruction`` format of :mod:`tuneline.prompting`); for ``chat`` the base
  tokenizer's own template.
- ``gguf``: ``model.gguf`` (:mod:`tuneline.gguf_writer`, llama architecture only; tensor
  type ``--gguf-type``, f16 by default), an Ollama ``Modelfile`` whose ``TEMPLATE``
  renders the same single-turn prompt, with the stop token(s) and the probe's decoding,
  ``README.md`` and ``provenance.json``. The merge is done in float32 and rounded once,
  to the GGUF type.

DIR must not exist, or be an empty directory, unless ``--force``; it may never be, hold or
lie inside an input (the base, an adapter). ``content_sha256`` in ``provenance.json``
hashes the model files (weights, config, tokenizer; or the GGUF file) before the card and
provenance are added.

A 4-bit (nf4) base cannot be exported dense from its quantized weights without a lossy
round trip, so export loads the base unquantized (``model.quantization: none``) in the
dtype the params train in (``tuneline.modeling.resolve_dtype``: bfloat16 for ``auto``
over an nf4 base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.modeling import (
    Loaded,
    adapter_stack,
    check_model_dir,
    dtype_name,
    load,
    merge_adapter,
    resolve_device,
    resolve_dtype,
)
from tuneline.params import Params
from tuneline.prompting import INSTRUCTION_HEADER, RESPONSE_HEADER, render
from tuneline.provenance import run_provenance_path, sha256_file, sha256_path, stamp
from tuneline.records import atomic_dir, read_json, write_json, write_text

FORMATS = ("hf", "gguf")
GGUF_FILE = "model.gguf"
# The embedded bases' hub ids and licenses, for the model card.
EMBEDDED_CARDS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_USER, _SYSTEM, _REPLY = "TUNELINEUSERa9f3", "TUNELINESYSTEMa9f3", "TUNELINEREPLYa9f3"


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def completion_chat_template() -> str:
    """A Jinja chat template rendering :func:`tuneline.prompting.render`'s completion prompt.

    System messages (joined with a blank line, as imported conversations are) and a user
    message give ``render(user, "completion", system)`` with ``add_generation_prompt``;
    an assistant message ends with the EOS token, as completions were trained.
    """
    instruction, response = _jinja_str(INSTRUCTION_HEADER), _jinja_str(RESPONSE_HEADER)
    return (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content')"
        " | join('\\n\\n') -%}"
        "{%- if system %}{{ system | trim }}{{ '\\n\\n' }}{% endif -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        f"{{%- if message['role'] == 'user' %}}{{{{ {instruction} }}}}{{{{ message['content'] | trim }}}}"
        f"{{%- elif message['role'] == 'assistant' %}}{{{{ {response} }}}}{{{{ message['content'] }}}}{{{{ eos_token }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt and messages[-1]['role'] == 'user' %}}{{{{ {response} }}}}{{% endif -%}}"
    )


def serving_template(loaded: Loaded) -> str:
    """The chat template the exported tokenizer carries: the trained prompt format."""
    if loaded.format == "completion":
        return completion_chat_template()
    return loaded.tokenizer.chat_template


def _go_literal(text: str) -> str:
    if '"""' in text:
        raise InputError(f"the chat template renders {text!r}, which an Ollama TEMPLATE \"\"\"...\"\"\" cannot hold")
    return text.replace("{{", '{{ "{{" }}')


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
    return tuple(text.split(marker)) if text.count(marker) == 1 else None  # type: ignore[return-value]


def ollama_template(tokenizer: Any) -> str:
    """A Go template (Ollama ``TEMPLATE``) rendering the tokenizer's chat template for one
    user turn, with and without a system prompt, byte for byte (message text is inserted
    as given: Go templates cannot trim it); ``{{ .Response }}`` and the end-of-turn text
    follow, so earlier turns of a conversation end as the chat template ends them."""

    def apply(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    plain = apply([{"role": "user", "content": _USER}], True)
    parts = _split_once(plain, _USER)
    if parts is None:
        raise InputError(f"the chat template does not render a user message exactly once: {plain!r}")
    body = f"{_go_literal(parts[0])}{{{{ .Prompt }}}}{_go_literal(parts[1])}"
    with_system = apply([{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}], True)
    head = _split_once(with_system, _SYSTEM)
    tail = _split_once(head[1], _USER) if head else None
    if head and tail:
        body = (
            f"{{{{ if .System }}}}{_go_literal(head[0])}{{{{ .System }}}}{_go_literal(tail[0])}{{{{ .Prompt }}}}"
            f"{_go_literal(tail[1])}{{{{ else }}}}{body}{{{{ end }}}}"
        )
    turn = apply([{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}], False)
    end = tokenizer.eos_token or ""
    if turn.startswith(plain) and turn[len(plain):].startswith(_REPLY):
        end = turn[len(plain) + len(_REPLY):]
    return f"{body}{{{{ .Response }}}}{_go_literal(end)}"


def stop_tokens(loaded: Loaded) -> list[str]:
    """The texts of the tokens generation stops at (``tuneline.generation.stop_token_ids``)."""
    from tuneline.generation import stop_token_ids

    tokens = [loaded.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(loaded)]
    return list(dict.fromkeys(t for t in tokens if t))


def modelfile(loaded: Loaded, params: Params) -> str:
    """An Ollama Modelfile for ``model.gguf``: the trained prompt, stop tokens and the
    probe's decoding (greedy: temperature 0)."""
    lines = [
        "# tuneline export: the single-turn prompt the model was trained on, and the probe's decoding.",
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{ollama_template(loaded.tokenizer)}"""',
    ]
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stop_tokens(loaded)]
    probe = params.probe
    if probe.do_sample:
        lines += [f"PARAMETER temperature {probe.temperature}", f"PARAMETER top_p {probe.top_p}"]
    else:
        lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER num_predict {probe.max_new_tokens}")
    return "\n".join(lines) + "\n"


def _base_card(base: Path) -> tuple[str | None, str | None]:
    """(hub id, license) of the base, where its ``provenance.json`` (the base stage's) says."""
    prov = base / "provenance.json"
    data = read_json(prov) if prov.is_file() else {}
    source = data.get("source") if isinstance(data, dict) else None
    if source in EMBEDDED_CARDS:
        return EMBEDDED_CARDS[source]
    if isinstance(data, dict) and data.get("kind") == "hub" and isinstance(data.get("repo_id"), str):
        return data["repo_id"], None
    return None, None


def _probe_section(params: Params, name: str | None) -> list[str]:
    if name is None:
        return ["No probe results: the model was given as a directory that is not in `probe.models`."]
    from tuneline.reporting import output_paths, provenance_path

    paths = {suite: output_paths(params, name, suite).metrics for suite in params.probe.suites}
    found = {suite: path for suite, path in paths.items() if path.is_file()}
    if not found:
        return [f"No probe results: `{next(iter(paths.values()))}` was not found (`tuneline probe {name}` writes it)."]
    record_path = provenance_path(params.paths.reports, name)
    # the probe's run record (per suite its file; decoding)
    record = read_json(record_path) if record_path.is_file() else {}
    lines: list[str] = []
    for suite, path in found.items():
        metrics = read_json(path)
        suite_file = ((record.get("suites") or {}).get(suite) or {}).get("suite", "?")
        rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, int | float) and not isinstance(v, bool)]
        lines += [*([""] if lines else []), f"From `{path}` (suite {suite}, `{suite_file}`):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
    decoding = record.get("decoding")
    if decoding:
        lines += ["", f"Decoding: `{json.dumps(decoding, sort_keys=True)}`."]
    return lines


def _provenance_section(params: Params, name: str | None, provenance: dict[str, Any]) -> list[str]:
    lines = [
        f"- base: `{provenance['base']['path']}` (content sha256 `{provenance['base']['content_sha256']}`)",
        *(f"- merged adapter: `{a['path']}` (sha256 `{a['sha256']}`)" for a in provenance["merged_adapters"]),
        f"- export: format `{provenance['export_format']}`, dtype `{provenance['dtype']}`"
        + (f", GGUF type `{provenance['gguf']['gguf_type']}`" if "gguf" in provenance else "")
        + f", content sha256 `{provenance['content_sha256']}`",
        f"- exported at git `{provenance['git'].get('sha')}` (dirty: {provenance['git'].get('dirty')})",
    ]
    if name is None:
        return [*lines, "", "No run provenance: the model was given as a directory that is not in `probe.models`."]
    path = run_provenance_path(params.paths.reports, name)
    if not path.is_file():
        return [*lines, "", f"No run provenance: `{path}` was not found."]
    run = read_json(path)
    return [*lines, "", f"Trained by stage `{run.get('stage', name)}` (`{path}`): git `{run.get('git', {}).get('sha')}` "
            f"(dirty: {run.get('git', {}).get('dirty')}); versions `{json.dumps(run.get('versions', {}), sort_keys=True)}`."]


def model_card(params: Params, name: str | None, provenance: dict[str, Any], loaded: Loaded) -> str:
    """README.md for the export (``huggingface_hub.ModelCard``): base, license, tags;
    the prompt format, probe results and provenance where they exist."""
    from huggingface_hub import ModelCard, ModelCardData

    base_id, license_id = _base_card(Path(provenance["base"]["path"]))
    fmt = provenance["export_format"]
    data = ModelCardData(
        base_model=base_id,
        license=license_id or "other",
        library_name="gguf" if fmt == "gguf" else "transformers",
        pipeline_tag="text-generation",
        tags=["tuneline", "merged", *([name] if name else []), *(["gguf"] if fmt == "gguf" else ["safetensors"])],
    )
    sample = render("Plan a day in Lisbon.", loaded.format)
    if not isinstance(sample, str):
        sample = loaded.tokenizer.apply_chat_template(sample, add_generation_prompt=True, tokenize=False)
    files = f"`{GGUF_FILE}` and an Ollama `Modelfile`" if fmt == "gguf" else "safetensors weights and tokenizer"
    body = [
        f"# {name or provenance['base']['path']} (tuneline export)",
        "",
        f"The base with every adapter of the stack merged in: {files}.",
        "" if license_id else "The base's license was not recorded: see the base model's own terms.",
        "",
        "## Prompt format",
        "",
        f"`model.format: {loaded.format}`. The tokenizer's chat template renders this prompt for one user message:",
        "",
        "```text",
        sample,
        "```",
        "",
        "## Probe results",
        "",
        *_probe_section(params, name),
        "",
        "## Provenance",
        "",
        *_provenance_section(params, name, provenance),
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def resolve_model(params: Params, model: str | Path) -> tuple[str | None, Path]:
    """(probe name or None, directory) of MODEL: a name from ``probe.models`` or a path."""
    models = params.probe.models
    if str(model) in models:
        return str(model), Path(models[str(model)] or params.paths.base_model)
    path = Path(model)
    for name, target in models.items():
        if path.resolve() == Path(target or params.paths.base_model).resolve():
            return name, path
    return None, path


def _check_out(out: Path, inputs: list[Path], force: bool) -> None:
    target = out.resolve()
    for item in inputs:
        source = item.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise InputError(f"--out {out}: would overwrite an input ({item}); choose a new directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"--out {out}: exists and is not a directory; choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out}: exists and is not empty; pass --force to replace it")


def export(
    params: Params,
    model: str | Path,
    out: str | Path,
    *,
    fmt: str = "hf",
    gguf_type: str = "f16",
    force: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Merge ``model`` (a ``probe.models`` name or a directory: an adapter and its parents,
    or nothing for a model directory) into the base and write ``out`` in ``fmt``; returns
    the provenance written. ``name`` (default: the ``probe.models`` name of ``model``)
    finds the probe results and run provenance for the model card."""
    from tuneline import gguf_writer

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: not supported (allowed: {', '.join(FORMATS)})")
    if fmt == "gguf":
        gguf_writer.check_type(gguf_type)
    found, model_dir = resolve_model(params, model)
    name, out = name if name is not None else found, Path(out)
    base = Path(params.paths.base_model)
    if (model_dir / "adapter_config.json").is_file() or not (model_dir / "config.json").is_file():
        stack = adapter_stack(model_dir)
    else:
        base, stack = check_model_dir(model_dir), []
    _check_out(out, [base, *stack], force)
    dtype = "float32" if fmt == "gguf" else dtype_name(resolve_dtype(params.model, resolve_device(params.model)))
    spec = params.model.model_copy(update={"quantization": "none", "dtype": dtype})
    loaded = load(base, spec)
    if fmt == "gguf":
        gguf_writer.check_architecture(loaded.model.config)
    for adapter in stack:
        merge_adapter(loaded, adapter)
    loaded.tokenizer.chat_template = serving_template(loaded)
    provenance: dict[str, Any] = {
        "kind": "merged",
        "base": {"path": str(base), "content_sha256": loaded.provenance["content_sha256"]},
        "merged_adapters": [{"path": str(p), "sha256": sha256_path(p)} for p in stack],
        "dtype": loaded.provenance["dtype"],
        "format": params.model.format,
        "export_format": fmt,
    }
    with atomic_dir(out) as tmp:
        if fmt == "hf":
            loaded.model.save_pretrained(str(tmp), safe_serialization=True)
            loaded.tokenizer.save_pretrained(str(tmp))
            check_model_dir(tmp)
            provenance["content_sha256"] = sha256_path(tmp)
        else:
            label = name or out.name
            provenance["gguf"] = gguf_writer.write_gguf(
                loaded.model, loaded.tokenizer, tmp / GGUF_FILE, gguf_type=gguf_type, name=f"tuneline-{label}",
                chat_template=loaded.tokenizer.chat_template,
            )
            provenance["content_sha256"] = sha256_file(tmp / GGUF_FILE)
            write_text(tmp / "Modelfile", modelfile(loaded, params))
        provenance.update(stamp())
        write_text(tmp / "README.md", model_card(params, name, provenance, loaded))
        write_json(tmp / "provenance.json", provenance)
    return provenance
