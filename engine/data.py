"""Data readers, the prompt template shared by every launcher, and collators."""
from __future__ import annotations

import json
import os
from typing import List, Sequence

from engine.errors import UserError

PROMPT_TEMPLATES = {
    "default": "### Instruction:\n{instruction}\n\n### Response:\n",
    "none": "{instruction}",
}


class DataError(UserError):
    pass


def format_prompt(instruction: str, template: str = "default") -> str:
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"--template {template!r} is unknown; choose one of {', '.join(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template].format(instruction=instruction)


def read_records(path: str, required: Sequence[str] = ("instruction",)) -> List[dict]:
    """A JSON list of objects or JSON lines; every record must hold the `required` string keys."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path} is empty")
    records = None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}); expected a JSON list or JSON lines") from None
    if not records:
        raise DataError(f"{path} holds no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path} record {i} is not a JSON object")
        for key in required:
            if key not in rec:
                raise DataError(f"{path} record {i} lacks the key '{key}'")
            if not isinstance(rec[key], str):
                raise DataError(f"{path} record {i}: '{key}' must be a string, not {type(rec[key]).__name__}")
    return records
