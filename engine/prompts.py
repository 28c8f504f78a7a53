"""Prompt templates: how an instruction becomes the model's input, the same in every launcher, and
the record of the template a checkpoint was trained with (it travels with the checkpoint)."""
from __future__ import annotations

import json
import os

from engine.errors import DataError
from engine.fileio import atomic_write_text


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


def save_template(directory: str, template: str) -> None:
    format_prompt("", template)  # validates the name
    atomic_write_text(os.path.join(directory, TEMPLATE_FILE),
                      json.dumps({"template": template, "format": PROMPT_TEMPLATES[template]}) + "\n")


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
