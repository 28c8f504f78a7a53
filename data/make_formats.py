"""The four specialisation data formats of Fu et al. (2023), built from questions and teacher CoTs:

  icl_answer  4 solved demonstrations (question, answer only), then the question -> "The answer is N"
  icl_cot     4 solved demonstrations (question, chain of thought), then the question -> the teacher's CoT
  zs_answer   the question alone -> "The answer is N"
  zs_cot      the question alone, "Let's think step by step" -> the teacher's CoT

  python data/make_formats.py --input_file train.json --output_file formats.json
      [--formats icl_answer,icl_cot,zs_answer,zs_cot] [--num_demos 4] [--seed 0]
      [--cot_prompt_file gsm8k_complex_cot.txt] [--answer_prompt_file gsm8k_direct.txt]
      [--style ours|authors] [--demo_file gsm8k_train.jsonl] [--task GSM8K]

Input: MCC-KD JSON records (`instruction` = the question, `output` = the teacher's CoT or a list of
them, `label`). Output: `{"id", "instruction", "output", "label", "format", "question"}` records, for
train.py (`--formats` picks the mix; each batch holds one format) and for `infer.py score --top_k K`
(the teacher's distributions over every format's targets).

--style ours (the default): one record per question and format; `Question: {q}` prompts; the CoT
formats keep every teacher output of the question (train.py draws one per epoch); answer-only
targets are "The answer is {label}"; in-context demonstrations are drawn (seeded per question and
format) from the OTHER questions of the file with their first teacher CoT, from --demo_file, or
taken verbatim from a few-shot prompt file (the real GSM8K prompts in shared/data/prompts/ are in
this layout: "Question: ...\\nLet's think step by step\\n...\\nThe answer is N").

--style authors (FranxYao/FlanT5-CoT-Specialization @a8ffd51, src/data_utils.py:235-266, 481-563):
  prompts   zs_answer "Q: {q} A:", icl_answer demos + "Q: {q}\\nA:", the CoT formats
            (demos +) "Q: {q}\\nLet's think step by step" (:489, :510, :531, :554)
  demos     --num_demos GSM8K gold train solutions (--demo_file), "<<...>>" calculator annotations
            removed, "The answer is N" after them, drawn for EVERY example uniformly without
            replacement from the whole file (:247-266; theirs unseeded, ours seeded by --seed, the
            question, the format and the output)
  samples   only teacher outputs that are correct (--task's answer reading against `label`); one CoT
            record per correct output; one answer-only record per question, from its first correct
            output stating its answer, whose target is the teacher's own words from "The answer is" on
            (:494-500; the phrase found in any case, since MCC-KD-style rationales say "Therefore, the
            answer is N ."); questions without a correct output are left out
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402  (the output guard: never an input, --overwrite, lock)
from engine.train.batching import FORMATS  # noqa: E402  (the names train.py --formats knows)

COT_CUE = "Let's think step by step"
STYLES = ("ours", "authors")
CALC_ANNOTATION = re.compile("<<.*?>>")  # src/data_utils.py:256-257: non-greedy, no DOTALL
_ANSWER_IS = re.compile("the answer is", re.IGNORECASE)


def answer_only(label) -> str:
    return f"The answer is {label}"


def question_block(question: str, cot: bool, style: str = "ours", icl: bool = False) -> str:
    if style == "authors":  # data_utils.py:489 (zs answer), :531 (icl answer), :510 and :554 (CoT)
        return f"Q: {question.strip()}" + (f"\n{COT_CUE}" if cot else "\nA:" if icl else " A:")
    return f"Question: {question.strip()}" + (f"\n{COT_CUE}" if cot else "")


def demonstration(rec: dict, cot: bool) -> str:
    """A solved example in our layout: the question, then its CoT (first one) or its answer."""
    if not cot:
        return question_block(rec["instruction"], False) + "\n" + answer_only(rec["label"])
    out = rec["output"][0] if isinstance(rec["output"], list) else rec["output"]
    return question_block(rec["instruction"], True) + "\n" + out.strip()


def gold_solution(answer: str) -> tuple:
    """A GSM8K gold answer "steps <<calc>>...\\n#### N" -> (the steps without calculator
    annotations, keeping their final newline, N) (data_utils.py:256-258)."""
    steps, final = answer.split("####", 1)
    return CALC_ANNOTATION.sub("", steps), final.strip()


def gold_demonstration(demo: dict, cot: bool, style: str) -> str:
    """A GSM8K gold train example as a demonstration. Authors' layout (data_utils.py:254-265, each
    demo ending with a blank line): "Q: {q}\\nLet's think step by step\\n{steps}The answer is N" or
    "Q: {q}\\nA: The answer is N"; ours: the same text under our question block."""
    steps, final = gold_solution(demo["answer"])
    if style == "authors":
        if cot:
            return f"Q: {demo['question']}\n{COT_CUE}\n{steps}The answer is {final}"
        return f"Q: {demo['question']}\nA: The answer is {final}"
    if cot:
        return question_block(demo["question"], True) + "\n" + steps.strip() + "\n" + answer_only(final)
    return question_block(demo["question"], False) + "\n" + answer_only(final)


def teacher_answer(output: str):
    """The authors' answer-only target from a teacher output (data_utils.py:238-245): "The answer is"
    and the teacher's own words after the first "the answer is" (to the end of that line); None
    when the output states no answer that way."""
    m = _ANSWER_IS.search(output)
    if m is None:
        return None
    return ("The answer is" + output[m.end():].split("\n", 1)[0]).strip()


def _outputs(rec: dict) -> list:
    return rec["output"] if isinstance(rec["output"], list) else [rec["output"]]


def _draw(n: int, k: int, *key) -> list:
    return random.Random(zlib.crc32(repr(key).encode())).sample(range(n), k)


def build(records, formats=FORMATS, num_demos: int = 4, seed: int = 0, cot_prompt: str = None,
          answer_prompt: str = None, path: str = "input_file", style: str = "ours", demos=None,
          task: str = "GSM8K", demo_path: str = "demo_file"):
    """Records of the chosen formats, question by question in input order (see the module docstring
    for the two styles). demos: GSM8K gold train records (question, answer "... #### N") to draw
    in-context demonstrations from."""
    from engine.runtime.errors import DataError
    from engine.text.records import validate_training_records

    if num_demos < 0:
        raise DataError(f"--num_demos must be >= 0, got {num_demos}")
    if style not in STYLES:
        raise DataError(f"--style {style!r} is not one of {', '.join(STYLES)}")
    icl = [f for f in formats if f.startswith("icl")]
    unfixed = [f for f in icl if not (cot_prompt if f.endswith("cot") else answer_prompt)]
    if unfixed and demos is None:
        if style == "authors":
            raise DataError(f"--style authors draws the demonstrations of {unfixed[0]} from GSM8K's gold train "
                            f"solutions: pass --demo_file (or a few-shot prompt file)")
        if len(records) <= num_demos:
            raise DataError(f"{path} has {len(records)} questions: in-context formats draw {num_demos} "
                            f"demonstrations from the other questions; pass fewer --num_demos, --demo_file or "
                            f"prompt files")
    if unfixed and demos is not None:
        if len(demos) < num_demos:
            raise DataError(f"--demo_file {demo_path} holds {len(demos)} examples, fewer than --num_demos {num_demos}")
        for j, d in enumerate(demos):
            if "####" not in d["answer"]:
                raise DataError(f"--demo_file {demo_path} record {j}: 'answer' has no '#### N' final answer "
                                f"(GSM8K's gold layout)")
    if style == "authors" or any(f.endswith("cot") for f in formats):
        validate_training_records(records, path)  # one sentence for a record without its teacher output
    for i, rec in enumerate(records):
        if "label" not in rec:
            raise DataError(f"{path} record {i} lacks the key 'label' (answer-only targets are 'The answer is N')")

    def prompt_of(rec, i, fmt, cot, j=0):
        block = question_block(rec["instruction"], cot, style, fmt.startswith("icl"))
        if not fmt.startswith("icl"):
            return block
        fixed = cot_prompt if cot else answer_prompt
        if fixed:
            return fixed.strip() + "\n\n" + block
        if demos is not None:
            shown = [gold_demonstration(demos[d], cot, style) for d in _draw(len(demos), num_demos, seed, i, fmt, j)]
        else:
            others = [o for o in range(len(records)) if o != i]
            shown = [demonstration(records[others[d]], cot) for d in _draw(len(others), num_demos, seed, i, fmt)]
        return "".join(d + "\n\n" for d in shown) + block

    out = []
    for i, rec in enumerate(records):
        rid = rec.get("id", i)
        if style == "ours":
            for fmt in formats:
                cot = fmt.endswith("cot")
                out.append({"id": f"{rid}-{fmt}", "instruction": prompt_of(rec, i, fmt, cot),
                            "output": rec["output"] if cot else answer_only(rec["label"]), "label": rec["label"],
                            "format": fmt, "question": i})
            continue
        from engine.text.answers import extract_answer, is_correct

        correct = [j for j, o in enumerate(_outputs(rec)) if is_correct(extract_answer(o, task), rec["label"], task)]
        stated = [(j, teacher_answer(_outputs(rec)[j])) for j in correct]
        first = next(((j, a) for j, a in stated if a is not None), None)
        for fmt in formats:
            cot = fmt.endswith("cot")
            chosen = [(j, _outputs(rec)[j]) for j in correct] if cot else [first] if first else []
            for j, target in chosen:
                out.append({"id": f"{rid}-{fmt}-{j}", "instruction": prompt_of(rec, i, fmt, cot, j),
                            "output": target, "label": rec["label"], "format": fmt, "question": i, "sample": j})
    return out


@writes("output_file")
def main(input_file: str, output_file: str, formats: str = ",".join(FORMATS), num_demos: int = 4, seed: int = 0,
         cot_prompt_file: str = None, answer_prompt_file: str = None, style: str = "ours", demo_file: str = None,
         task: str = "GSM8K", overwrite: bool = False):
    """Write the chosen formats of every question.

    Args:
        input_file: MCC-KD JSON records with instruction (the question), output (the teacher's CoT, or a list), label.
        output_file: JSON list of the formats' records (never the input file; refused if it exists unless overwrite).
        formats: comma-separated subset of icl_answer, icl_cot, zs_answer, zs_cot.
        num_demos: solved demonstrations before the question in the in-context formats.
        seed: seed of the demonstrations drawn for each question (and, under --style authors, each output).
        cot_prompt_file: a few-shot CoT prompt used verbatim as the demonstrations of icl_cot (e.g. shared/data/prompts/gsm8k_complex_cot.txt).
        answer_prompt_file: a few-shot answer-only prompt used verbatim for icl_answer (e.g. shared/data/prompts/gsm8k_direct.txt).
        style: ours (one record per question and format, every output kept, "Question:" prompts) or authors (Fu et al.: "Q: ... A:" prompts, one CoT record per correct output, only correct outputs, the teacher's own answer sentence as the answer-only target).
        demo_file: GSM8K gold train examples (JSON list or lines of question, answer "... #### N"): the in-context demonstrations, calculator annotations removed (needed by --style authors' in-context formats).
        task: how a teacher output's answer is read to keep only correct outputs under --style authors (GSM8K, SVAMP, ASDiv, CSQA, ARITH).
        overwrite: replace an existing output_file.
    """
    from engine.runtime.errors import DataError
    from engine.runtime.fileio import atomic_write_text
    from engine.text.answers import check_task
    from engine.text.records import read_records
    from engine.train.batching import parse_formats

    names = parse_formats(formats) or list(FORMATS)
    if style not in STYLES:
        raise DataError(f"--style {style!r} is not one of {', '.join(STYLES)}")
    task = check_task(task)
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
    demos = None
    if demo_file:
        if not os.path.isfile(demo_file):
            raise DataError(f"--demo_file {demo_file} does not exist")
        demos = read_records(demo_file, required=("question", "answer"))
    records = read_records(input_file)
    out = build(records, names, num_demos, seed, prompts.get("cot_prompt_file"), prompts.get("answer_prompt_file"),
                input_file, style, demos, task, demo_file)
    atomic_write_text(output_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    counts = {f: sum(r["format"] == f for r in out) for f in names}
    kept = len({r["question"] for r in out})
    print(json.dumps({"questions": len(records), "questions_kept": kept, "records": len(out), "formats": counts}))


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
