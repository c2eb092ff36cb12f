"""The one prompt format, shared by training data, teacher generation and probing.

Completion format (base models, no chat template)::

    ### Instruction
    <instruction>

    ### Response
    <completion><eos>

Chat format: a single user turn; the tokenizer's own template is applied by the loader.
"""

from __future__ import annotations

from collections.abc import Sequence

INSTRUCTION_HEADER = "### Instruction\n"
RESPONSE_HEADER = "\n\n### Response\n"


def render(instruction: str, fmt: str, system: str | None = None) -> str | list[dict[str, str]]:
    """The prompt for one instruction in the model's format."""
    if fmt == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": instruction}]
    if fmt != "completion":
        raise ValueError(f"unknown prompt format {fmt!r} (allowed: completion, chat)")
    preamble = f"{system.strip()}\n\n" if system else ""
    return f"{preamble}{INSTRUCTION_HEADER}{instruction.strip()}{RESPONSE_HEADER}"


def few_shot(shots: Sequence[tuple[str, str]], instruction: str) -> str:
    """A completion-format few-shot prompt: each shot is (instruction, completion)."""
    blocks = [f"{render(q, 'completion')}{a.strip()}\n\n" for q, a in shots]
    return "".join(blocks) + str(render(instruction, "completion"))
