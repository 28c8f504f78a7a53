"""Prompt templates: how an instruction becomes the model's input, the same in every launcher, and
the record of the template a checkpoint was trained with (it travels with the checkpoint)."""
from __future__ import annotations

import json
import os

from engine.runtime.errors import DataError
from engine.runtime.fileio import atomic_write_text

PROMPT_TEMPLATES = {
    "default": "### Instruction:\n{instruction}\n\n### Response:\n",
    "none": "{instruction}",
}


def format_prompt(instruction: str, template: str = "default") -> str:
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"--template {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template].format(instruction=instruction)


# The prompt template a model was trained with travels with its checkpoints (best/, checkpoint-N/,
# and conversions of them), so infer.py formats prompts the same way unless told otherwise.
TEMPLATE_FILE = "prompt_template.json"


def save_template(directory: str, template: str, task_prefixes: dict = None) -> None:
    format_prompt("", template)  # validates the name
    record = {"template": template, "format": PROMPT_TEMPLATES[template]}
    if task_prefixes:
        record["task_prefixes"] = task_prefixes
    atomic_write_text(os.path.join(directory, TEMPLATE_FILE), json.dumps(record) + "\n")


def recorded_template(*directories) -> tuple:
    """(template name, directory) recorded in the first of `directories` that has one, else (None, None)."""
    for d in directories:
        path = os.path.join(d, TEMPLATE_FILE) if d and os.path.isdir(d) else None
        if path and os.path.exists(path):
            try:
                name = json.load(open(path))["template"]
            except (OSError, ValueError, KeyError, TypeError):
                raise DataError(f"{path} is not a valid prompt template record") from None
            if name not in PROMPT_TEMPLATES:
                raise DataError(f"{path} names the template {name!r}, which this version does not know")
            return name, d
    return None, None


def resolve_template(template, ckpt_dir: str, lora_dir: str) -> str:
    """--template when given, else the one recorded with the checkpoint (or its LoRA adapter) by
    training, else "default"."""
    recorded, where = recorded_template(lora_dir, ckpt_dir)
    main = os.environ.get("RANK", "0") == "0"
    if template is None:
        template = recorded or "default"
        if recorded and main:
            print(f"using the prompt template {template!r} recorded with {where}", flush=True)
    elif recorded and template != recorded and main:
        print(f"warning: --template {template} differs from the template {recorded!r} that {where} was "
              f"trained with", flush=True)
    format_prompt("", template)  # an unknown name ends here, before anything loads
    return template


# Distilling step-by-step trains one model on two tasks told apart by a prefix of the instruction
# (the authors' T5 prefixes): the label task x -> y and the rationale task x -> r. A checkpoint
# trained so records its prefixes beside its template, and infer.py prepends the one asked for.
TASK_PREFIXES = {"label": "predict: ", "rationale": "explain: "}


def task_instruction(instruction: str, task_prefix: str = None, prefixes: dict = None) -> str:
    """The instruction as one task of a step-by-step model sees it (unchanged without a task prefix)."""
    if task_prefix is None:
        return instruction
    prefixes = prefixes or TASK_PREFIXES
    if task_prefix not in prefixes:
        raise DataError(f"--task_prefix {task_prefix!r} is unknown; choose one of {', '.join(prefixes)}")
    return prefixes[task_prefix] + instruction


def recorded_task_prefixes(*directories):
    """({task: prefix}, directory) recorded with the first of `directories` that records a template;
    (None, None) when it records none (the model was not trained with task prefixes)."""
    for d in directories:
        path = os.path.join(d, TEMPLATE_FILE) if d and os.path.isdir(d) else None
        if path and os.path.exists(path):
            try:
                prefixes = json.load(open(path)).get("task_prefixes")
            except (OSError, ValueError, AttributeError):
                raise DataError(f"{path} is not a valid prompt template record") from None
            if prefixes is not None and not (isinstance(prefixes, dict) and set(prefixes) == set(TASK_PREFIXES)
                                             and all(isinstance(v, str) for v in prefixes.values())):
                raise DataError(f"{path}: 'task_prefixes' must map {' and '.join(TASK_PREFIXES)} to strings")
            return prefixes, (d if prefixes else None)
    return None, None


def resolve_task_prefix(task_prefix, ckpt_dir: str, lora_dir: str):
    """(task name or None, {task: prefix} to use) for infer.py: the prefixes recorded with the model;
    a model trained with task prefixes decodes the label task unless told otherwise."""
    recorded, where = recorded_task_prefixes(lora_dir, ckpt_dir)
    main = os.environ.get("RANK", "0") == "0"
    if task_prefix is not None and task_prefix not in TASK_PREFIXES:
        raise DataError(f"--task_prefix {task_prefix!r} is unknown; choose one of {', '.join(TASK_PREFIXES)}")
    if task_prefix is None and recorded:
        task_prefix = "label"
        if main:
            print(f"{where} was trained with task prefixes: decoding the label task (--task_prefix rationale "
                  f"for rationales)", flush=True)
    elif task_prefix is not None and not recorded and main:
        print(f"warning: --task_prefix {task_prefix}: {lora_dir or ckpt_dir} records no task prefixes (it was not "
              f"trained with --objective step_by_step); prepending {TASK_PREFIXES[task_prefix]!r} anyway", flush=True)
    return task_prefix, recorded or TASK_PREFIXES


# ----- few-shot prompts (a teacher's own accuracy, in-context formats) -----------------------------------
def read_prompt_file(path: str) -> str:
    """The few-shot demonstrations of --prompt_file (e.g. shared/data/prompts/gsm8k_complex_cot.txt)."""
    if not os.path.isfile(path):
        raise DataError(f"--prompt_file {path} does not exist")
    text = open(path, encoding="utf-8").read().strip()
    if not text:
        raise DataError(f"--prompt_file {path} is empty")
    if "{instruction}" not in text:
        few_shot_parts(text, path)  # refused now, not at the first record
    return text


def few_shot_parts(demos: str, path: str = "--prompt_file") -> tuple:
    """(question marker, cue) of demonstrations separated by blank lines, each `MARKER: question` then
    its answer: the marker all of them start with ("Question:") and the line after the question when
    every demonstration has the same one ("Let's think step by step"; None otherwise)."""
    blocks = [b.strip().split("\n") for b in demos.split("\n\n") if b.strip()]
    marker = blocks[0][0].split(":", 1)[0] + ":" if ":" in blocks[0][0] else None
    if marker is None or not all(b[0].startswith(marker) for b in blocks):
        raise DataError(f"{path}: the demonstrations do not all start with the same 'Name:' (e.g. 'Question:'); "
                        f"write {{instruction}} where the question goes instead")
    cues = {b[1] if len(b) > 2 else None for b in blocks}
    return marker, cues.pop() if len(cues) == 1 else None


def few_shot_prompt(demos: str, instruction: str) -> str:
    """The demonstrations, a blank line, then the question as they ask theirs (and their shared cue
    line); a file holding {instruction} is filled in instead."""
    if "{instruction}" in demos:
        return demos.replace("{instruction}", instruction.strip())
    marker, cue = few_shot_parts(demos)
    return f"{demos}\n\n{marker} {instruction.strip()}\n" + (f"{cue}\n" if cue else "")
