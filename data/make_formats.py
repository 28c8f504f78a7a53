"""The four specialisation data formats of Fu et al. (2023), built from questions and teacher CoTs:

  icl_answer  4 solved demonstrations (question, answer only), then the question -> "The answer is N"
  icl_cot     4 solved demonstrations (question, chain of thought), then the question -> the teacher's CoT
  zs_answer   the question alone -> "The answer is N"
  zs_cot      the question alone, "Let's think step by step" -> the teacher's CoT

  python data/make_formats.py --input_file train.json --output_file formats.json
      [--formats icl_answer,icl_cot,zs_answer,zs_cot] [--num_demos 4] [--seed 0]
      [--cot_prompt_file gsm8k_complex_cot.txt] [--answer_prompt_file gsm8k_direct.txt]

Input: MCC-KD JSON records (`instruction` = the question, `output` = the teacher's CoT or a list of
them, `label`). Output: one record per question and format, `{"id", "instruction", "output",
"label", "format", "question"}`, for train.py (`--formats` picks the mix; each batch holds one
format) and for `infer.py score --top_k K` (the teacher's distributions over every format's
targets). In-context demonstrations are drawn at random (seeded per question and format) from the
OTHER questions of the file, or taken verbatim from a few-shot prompt file (the real GSM8K prompts in
shared/data/prompts/ are in this layout: "Question: ...\\nLet's think step by step\\n...\\nThe answer is N").
"""

from __future__ import annotations

import json
import os
import random
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402  (the output guard: never an input, --overwrite, lock)
from engine.train.batching import FORMATS  # noqa: E402  (the names train.py --formats knows)

COT_CUE = "Let's think step by step"


def answer_only(label) -> str:
    return f"The answer is {label}"


def question_block(question: str, cot: bool) -> str:
    return f"Question: {question.strip()}" + (f"\n{COT_CUE}" if cot else "")


def demonstration(rec: dict, cot: bool) -> str:
    """A solved example in the prompt layout: the question, then its CoT (first one) or its answer."""
    out = rec["output"][0] if isinstance(rec["output"], list) else rec["output"]
    return question_block(rec["instruction"], cot) + "\n" + (out.strip() if cot else answer_only(rec["label"]))


def build(
    records,
    formats=FORMATS,
    num_demos: int = 4,
    seed: int = 0,
    cot_prompt: str = None,
    answer_prompt: str = None,
    path: str = "input_file",
):
    """One record per (question, format), question by question in input order."""
    from engine.runtime.errors import DataError

    if num_demos < 0:
        raise DataError(f"--num_demos must be >= 0, got {num_demos}")
    wants_icl = any(f.startswith("icl") for f in formats)
    if wants_icl and not (cot_prompt and answer_prompt) and len(records) <= num_demos:
        raise DataError(
            f"{path} has {len(records)} questions: in-context formats draw {num_demos} demonstrations "
            f"from the other questions; pass fewer --num_demos or prompt files"
        )
    out = []
    for i, rec in enumerate(records):
        if "label" not in rec:
            raise DataError(f"{path} record {i} lacks the key 'label' (answer-only targets are 'The answer is N')")
        for fmt in formats:
            cot = fmt.endswith("cot")
            fixed = cot_prompt if cot else answer_prompt
            prompt = question_block(rec["instruction"], cot)
            if fmt.startswith("icl"):
                if fixed:
                    demos = fixed.strip()
                else:
                    rng = random.Random(zlib.crc32(repr((seed, i, fmt)).encode()))
                    others = rng.sample([j for j in range(len(records)) if j != i], num_demos)
                    demos = "\n\n".join(demonstration(records[j], cot) for j in others)
                prompt = demos + "\n\n" + prompt
            out.append(
                {
                    "id": f"{rec.get('id', i)}-{fmt}",
                    "instruction": prompt,
                    "output": rec["output"] if cot else answer_only(rec["label"]),
                    "label": rec["label"],
                    "format": fmt,
                    "question": i,
                }
            )
    return out


@writes("output_file")
def main(
    input_file: str,
    output_file: str,
    formats: str = ",".join(FORMATS),
    num_demos: int = 4,
    seed: int = 0,
    cot_prompt_file: str = None,
    answer_prompt_file: str = None,
    overwrite: bool = False,
):
    """Write the chosen formats of every question.

    Args:
        input_file: MCC-KD JSON records with instruction (the question), output (the teacher's CoT, or a list), label.
        output_file: JSON list, one record per question and format (never the input file; refused if it exists unless overwrite).
        formats: comma-separated subset of icl_answer, icl_cot, zs_answer, zs_cot.
        num_demos: solved demonstrations before the question in the in-context formats.
        seed: seed of the demonstrations drawn for each question.
        cot_prompt_file: a few-shot CoT prompt used verbatim as the demonstrations of icl_cot (e.g. shared/data/prompts/gsm8k_complex_cot.txt).
        answer_prompt_file: a few-shot answer-only prompt used verbatim for icl_answer (e.g. shared/data/prompts/gsm8k_direct.txt).
        overwrite: replace an existing output_file.
    """
    from engine.runtime.errors import DataError
    from engine.runtime.fileio import atomic_write_text
    from engine.text.records import read_records
    from engine.train.batching import parse_formats

    names = parse_formats(formats) or list(FORMATS)
    if os.path.abspath(output_file) == os.path.abspath(input_file):
        raise DataError(f"--output_file {output_file} is the input file; choose another path")
    if os.path.exists(output_file) and not overwrite:
        raise DataError(f"--output_file {output_file} exists; pass --overwrite True to replace it")
    prompts = {}
    for flag, path in (("cot_prompt_file", cot_prompt_file), ("answer_prompt_file", answer_prompt_file)):
        if path:
            if not os.path.isfile(path):
                raise DataError(f"--{flag} {path} does not exist")
            prompts[flag] = open(path, encoding="utf-8").read()
            if not prompts[flag].strip():
                raise DataError(f"--{flag} {path} is empty")
    records = read_records(input_file)
    out = build(
        records, names, num_demos, seed, prompts.get("cot_prompt_file"), prompts.get("answer_prompt_file"), input_file
    )
    atomic_write_text(output_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    counts = {f: sum(r["format"] == f for r in out) for f in names}
    print(json.dumps({"questions": len(records), "records": len(out), "formats": counts}))


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
