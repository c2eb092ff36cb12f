"""The tuneline command line: ``tuneline <stage>`` runs one pipeline stage with params.yaml.

Heavy libraries (torch, transformers, trl, dvc) are imported inside commands, so
``tuneline --help`` and ``tuneline params check`` start fast.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup
from typer.exceptions import TyperException

from tuneline import launch
from tuneline.errors import TunelineError
from tuneline.params import Params, check_runtime, load_params
from tuneline.records import staged_outputs

# Command groups a stage never runs: their modules are imported only when named (or for
# --help), so they are not code deps of every stage (see tuneline.dag).
TOOL_GROUPS = {"archive": "tuneline.archive", "verify": "tuneline.verify", "dag": "tuneline.dag"}


class _Commands(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(name for name in TOOL_GROUPS if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in TOOL_GROUPS and cmd_name not in self.commands:
            group = typer.main.get_command(importlib.import_module(TOOL_GROUPS[cmd_name]).app)
            group.name = cmd_name
            self.add_command(group, cmd_name)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    cls=_Commands, help="Reproducible LLM post-training pipeline driven by DVC.", no_args_is_help=True
)
params_app = typer.Typer(help="Inspect and validate params.yaml.", no_args_is_help=True)
app.add_typer(params_app, name="params")
err = Console(stderr=True)
out = Console()

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file")]
DEFAULT_PARAMS = Path("params.yaml")


def main() -> None:
    """Run the CLI; every non-success leaves with a non-zero code (130 for an interrupt).

    With ``standalone_mode=False`` typer/click *return* the code of ``typer.Exit`` (and
    turn ``KeyboardInterrupt`` into ``Exit(130)``) instead of leaving the process, so the
    return value is the exit code when it is an int.
    """
    try:
        code = app(standalone_mode=False)
    except TunelineError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        launch.record_exit(exc.exit_code)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: unknown option, missing argument (bad input)
        show = getattr(exc, "show", None)
        if show is None:
            err.print(f"error: {exc}", highlight=False)
        else:
            show()
        sys.exit(2)
    if isinstance(code, int) and code != 0:
        if code == 130:
            err.print("aborted")
        launch.record_exit(code)
        sys.exit(code)


def stage_params(path: Path) -> Params:
    """Validate params (and what depends on this machine) before any model is loaded."""
    from tuneline.params import ParamsError

    params = load_params(path)
    problems = check_runtime(params)
    if problems:
        raise ParamsError(str(path), problems)
    return params


def run_stage(name: str, params_path: Path, **kwargs: Any) -> dict[str, Any] | None:
    """Run one stage in this process, or, for a training stage with
    ``compute.num_processes > 1`` on CUDA, under accelerate launch (None: the workers
    printed the result; a failure exits with their code)."""
    launch.pin_one_gpu(name, load_params(params_path))
    params = stage_params(params_path)
    if launch.wants_launch(name, params):
        code = launch.relaunch(name, params, params_path, [str(value) for value in kwargs.values()])
        if code != 0:
            raise typer.Exit(code)
        return None
    module = importlib.import_module(f"tuneline.stages.{name}")
    with staged_outputs():  # all of the stage's outputs swapped in together, or none
        return module.run(params, **kwargs)


def _stage_command(name: str, doc: str) -> Callable[..., None]:
    def command(params: ParamsOption = DEFAULT_PARAMS) -> None:
        metrics = run_stage(name, params)
        if metrics is not None and launch.is_main_worker():
            out.print(json.dumps(metrics, indent=2, sort_keys=True, default=str)[:4000], highlight=False)

    command.__doc__ = doc
    command.__name__ = name
    return command


for _name, _doc in [
    ("base", "Materialize the base model in paths.base_model (safetensors + tokenizer + provenance)."),
    ("generate", "Examples from templates, a teacher and imported files: data/generated, metrics/generate.json."),
    ("clean", "Validate, dedupe, length-check and split the examples: data/clean, metrics/clean.json."),
    ("sft", "Supervised LoRA fine-tuning on data/clean: paths.sft_model, metrics/sft.json, metrics/sft/."),
    ("pairs", "Preference pairs (contract negatives, on-policy, imported): data/pairs, metrics/pairs.json."),
    ("dpo", "DPO on the pairs with the SFT model as reference: paths.dpo_model, metrics/dpo.json."),
]:
    app.command(_name)(_stage_command(_name, _doc))


@params_app.command("check")
def params_check(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Validate params.yaml: every problem listed at once; exit 2 if any."""
    stage_params(params)
    out.print(f"{params}: ok")


@params_app.command("show")
def params_show(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Print the resolved params, defaults included, as JSON."""
    out.print_json(load_params(params).model_dump_json(by_alias=True))


@app.command()
def doctor(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Print the environment and what the current params would run on."""
    from tuneline.doctor import report

    report(params, out)



@app.command()
def probe(
    model: Annotated[str, typer.Argument(help="a model name from probe.models, e.g. base, sft, dpo")],
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Probe one model on every suite of probe.suites: metrics/probe/SUITE/MODEL.json, reports/probe/SUITE/MODEL.*.jsonl."""
    metrics = run_stage("probe", params, model=model)
    if metrics is None:  # the workers ran it; rank 0 printed the result
        return
    summary = {k: v for k, v in metrics.items() if k != "provenance"}
    out.print(json.dumps(summary, indent=2, sort_keys=True), highlight=False)


app.command("compare")(
    _stage_command(
        "compare",
        "Compare the probed models: metrics/compare.json, reports/compare.md, reports/compare_rates.png.",
    )
)


@app.command("diff")
def diff_command(
    rev_a: Annotated[str, typer.Argument(help="older version: commit, branch, tag, DVC experiment or 'workspace'")],
    rev_b: Annotated[str, typer.Argument(help="newer version (differences are B - A)")],
    md: Annotated[bool, typer.Option("--md", help="print a Markdown table")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    repo: Annotated[Path, typer.Option("--repo", help="project root (git + DVC repository)")] = Path("."),
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Paired statistics between the probe results of two versions (same suite and contract only)."""
    from tuneline import diff as version_diff
    from tuneline.errors import InputError

    if md and as_json:
        raise InputError("--md and --json: choose one output format")
    result = version_diff.diff(repo, rev_a, rev_b, load_params(params))
    if as_json:
        typer.echo(version_diff.to_json(result), nl=False)
    elif md:
        typer.echo(version_diff.to_markdown(result), nl=False)
    else:
        version_diff.print_table(result)

@app.command("export")
def export_command(
    model: Annotated[str, typer.Argument(help="a name from probe.models (base, sft, dpo), an adapter or a model directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory to write (new or empty unless --force)")],
    fmt: Annotated[str, typer.Option("--format", help="hf (safetensors + tokenizer) or gguf (+ Ollama Modelfile)")] = "hf",
    gguf_type: Annotated[
        str, typer.Option("--gguf-type", help="GGUF tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0")
    ] = "f16",
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out")] = False,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Merge a model's adapters into the base for serving: safetensors or GGUF, with the trained prompt as chat template."""
    from tuneline.export import export

    provenance = export(stage_params(params), model, out_dir, fmt=fmt, gguf_type=gguf_type, force=force)
    merged = [a["path"] for a in provenance["merged_adapters"]]
    out.print(f"{out_dir}: {fmt} export of the base with {merged or 'no adapters'} merged", highlight=False)


if __name__ == "__main__":
    main()
