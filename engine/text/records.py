"""Data readers and training examples: records, supervised sequences, multi-rationale questions, batches."""
from __future__ import annotations

import json
import os
from typing import List, Sequence

from engine.runtime.errors import DataError


def read_text(path: str, what: str = "") -> str:
    """The UTF-8 text of a data file (`what`: the flag naming it in errors); one sentence otherwise."""
    name = f"{what} {path}" if what else path
    if not os.path.isfile(path):
        raise DataError(f"{name} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{name} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None


def read_records(path: str, required: Sequence[str] = ("instruction",)) -> List[dict]:
    """A JSON list of objects or JSON lines; every record must hold the `required` keys as non-empty strings."""
    text = read_text(path)
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
        # JSON lines end at "\n" only: str.splitlines() also breaks at U+2028, U+2029, \x85 ..., which
        # json.dumps(ensure_ascii=False) leaves unescaped inside strings (a sampled rationale may hold them)
        for lineno, line in enumerate(text.split("\n"), 1):
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
            if not rec[key].strip():
                raise DataError(f"{path} record {i}: '{key}' is empty")
    return records


def require_field(records: List[dict], path: str, field: str) -> None:
    """Refuse a field that no record holds (a mistyped --field would score every record wrong)."""
    if not any(field in rec for rec in records):
        keys = sorted({k for rec in records[:100] for k in rec})
        raise DataError(
            f"no record of {path} holds the field '{field}' (its records hold {', '.join(map(repr, keys))}); "
            f"pass --field with one of them"
        )


def validate_training_records(records: List[dict], path: str, need_label: bool = False) -> None:
    for i, rec in enumerate(records):
        out = rec.get("output")
        if out is None:
            raise DataError(f"{path} record {i} lacks the key 'output'")
        if isinstance(out, list):
            if not out or not all(isinstance(o, str) for o in out):
                raise DataError(f"{path} record {i}: 'output' must be a string or a non-empty list of strings")
            empty = [j for j, o in enumerate(out) if not o.strip()]
            if empty:
                raise DataError(f"{path} record {i}: 'output' item {empty[0]} is empty")
        elif not isinstance(out, str):
            raise DataError(f"{path} record {i}: 'output' must be a string or a list of strings, "
                            f"not {type(out).__name__}")
        elif not out.strip():
            raise DataError(f"{path} record {i}: 'output' is empty")
        if need_label and "label" not in rec:
            raise DataError(f"{path} record {i} lacks the key 'label'")


# ----------------------------------------------------------------------------------------------
# Answer spans (MCC-KD): the response tokens that spell the final answer
# ----------------------------------------------------------------------------------------------
