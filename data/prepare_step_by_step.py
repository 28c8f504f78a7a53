"""From the distilling step-by-step data layout to our training format (fire CLI).

  python data/prepare_step_by_step.py --input_file RAW --output_file OUT.json --task CSQA
  python data/prepare_step_by_step.py --dataset_dir datasets/cqa --split train --output_file OUT.json

RAW: a JSON list or JSON lines of records holding the question ('question', with an optional list of
'choices', or 'input' or 'instruction' already holding them), the gold label ('label' or 'answer'),
and the teacher's output: raw text ('llm_output', e.g. "Banks keep money safe ... So the answer is
(a) bank"), already split ('llm_rationale', with 'llm_label' or an answer sentence in the
rationale), or, in the `instruction` records every other tool reads (infer.py's output, MCC-KD
files), 'output': one raw text, or a list of them (infer.py --num_samples K), each parsed as raw
text; the usable ones are kept (a list when more than one) and the teacher's label is the answer
most of them state (self-consistency; a tie goes to the first stated).
--dataset_dir reads the authors' layout instead: DIR/NAME_SPLIT.json (the source records, JSON lines
as `datasets` writes them: cos_e's question / choices / answer for cqa, input / label for svamp) and
the raw teacher outputs DIR/llm/SPLIT_CoT_0.json, _1.json ... (JSON lists of strings, in record order).

Raw teacher text is split as the authors' code splits it (--parse authors, the default; their
data_utils.py): cut at the first "Q:" (the teacher's next few-shot question); CSQA at its one "So the
answer is" (a text with none or several is one the authors' code aborts on: dropped and counted),
the label the text after the first "(x)" ("(a) bank." -> "bank"); SVAMP and ASDiv at their one "The
answer is", the label its equation ("(32.0 - 5.0)"). The rationale is the text before the answer
sentence, which it no longer holds; a teacher label the authors' parse finds none of is written as
theirs, " " (--label_type llm then leaves the record out). Tasks the authors have no loader for
(GSM8K, ARITH) are split the same way at their first answer sentence ("Therefore, the answer is
20 ."). --parse ours keeps the answer sentence in the rationale ("... So the answer is (a)
bank."), cut where the teacher began its next question, reads the teacher's label from it (a choice
letter, the choice's text when the letter is missing; an equation for SVAMP; a number otherwise) and
drops records whose label it cannot read.

Writes {"instruction", "output": the rationale, "label": the gold label, "llm_label": the teacher's
label}, the format train.py reads (--objective step_by_step, --label_type gt|llm; or plain SFT on the
rationales). CSQA labels are written as the choice's text (--label_format text, the authors'), or
as its letter A-E (--label_format letter); training and scoring read both, through the choices the
instruction lists. Records with no rationale are dropped and counted; a gold label that does not
read as an answer of --task is an error naming the record. Never overwrites its input, nor an
existing output without --overwrite True.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import Counter
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402  (the output guard: never an input, --overwrite, lock)

CHOICE_LETTERS = "abcde"
DATASET_TASKS = {"cqa": "CSQA", "svamp": "SVAMP", "asdiv": "ASDIV", "gsm8k": "GSM8K"}
_ANSWER_SENTENCE = re.compile(r"(?:(?:so|therefore|thus|hence),?\s+)?the\s+answer\s+is\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_NEXT_QUESTION = re.compile(r"(?:^|\s)Q:")


def format_question(question: str, choices: Optional[List[str]]) -> str:
    """The question as the authors' prompts show it: the choices listed as (a) ... (e) beneath."""
    if not choices:
        return question
    listed = "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question}\nAnswer Choices:\n{listed}"


def choice_letter(text: str, choices: Optional[List[str]]) -> Optional[str]:
    """A choice answer as its letter A-E: "(a) bank", "(A)", "A", or (with the choices) "bank"."""
    text = str(text).strip().rstrip(".").strip()
    m = re.match(r"^\(?([A-Ea-e])\)?(?:\s|$)", text)
    if m:
        return m.group(1).upper()
    for i, c in enumerate(choices or []):
        if text.lower() == str(c).strip().lower():
            return CHOICE_LETTERS[i].upper()
    return None


def teacher_label(sentence: str, task: str, choices) -> Optional[str]:
    """The label stated by the answer sentence (what follows "the answer is"), or None."""
    from engine.text.answers import CHOICE_TASKS, EQUATION_TASKS, equation_value, extract_answer

    sentence = sentence.strip()
    if task in CHOICE_TASKS:
        m = re.search(r"\(([A-Ea-e])\)", sentence)
        return m.group(1).upper() if m else choice_letter(sentence, choices)
    if task in EQUATION_TASKS:
        m = re.search(r"\(.*\)", sentence)  # the equation as the teacher wrote it, compared by its value
        if m and equation_value(m.group(0)) is not None:
            return m.group(0)
    return extract_answer(sentence, task)


# ---- the authors' split (google-research/distilling-step-by-step data_utils.py @ ef944263), verbatim ----
def authors_parse_cqa(output: str) -> Tuple[str, str]:
    """data_utils.py:167-179 (CQADatasetLoader._parse_llm_output): raises ValueError unless "So the answer
    is" occurs exactly once before the first "Q:"; the label is the choice's text, " " when none follows
    a "(x)"."""
    rationale_label = output.split('Q:')[0]
    rationale_label = rationale_label.rstrip()
    rationale, label = rationale_label.split('So the answer is')
    rationale = rationale.rstrip()
    try:
        label = re.split(r'\(.\)', label)[1].strip()
        label = label if label[-1] != '.' else label[:-1]
    except Exception:  # the authors' bare except: no "(x)", or nothing after it
        label = ' '
    return rationale, label


def authors_parse_svamp(output: str) -> Tuple[str, str]:
    """data_utils.py:254-270 (SVAMPDatasetLoader._parse_llm_output; ASDiv's, :327-343, is the same): split
    at "The answer is" (capital T), (' ', ' ') unless it occurs exactly once; the label is the
    greedy "(...)" equation, " " when there is none."""
    rationale_label = output.split('Q:')[0]
    rationale_label = rationale_label.rstrip()
    try:
        rationale, label = rationale_label.split('The answer is')
    except ValueError:
        return ' ', ' '
    rationale = rationale.rstrip()
    found = re.search(r'\(.*\)', label)
    return rationale, found.group(0) if found else ' '


def authors_style_split(output: str, task: str, choices=None) -> Tuple[str, str]:
    """For the tasks the authors have no loader for (GSM8K, ARITH, MULT): their rule carried over, at
    the first answer sentence ours finds: cut at the first "Q:", the rationale the text before the
    answer sentence (rstripped), the label read from the sentence (" " when none is)."""
    head = output.split('Q:')[0].rstrip()
    m = _ANSWER_SENTENCE.search(head)
    if not m:
        return ' ', ' '
    rest = head[m.end():]
    end = _SENTENCE_END.search(rest)
    return head[:m.start()].rstrip(), teacher_label(rest[:end.start()] if end else rest, task, choices) or ' '


def authors_split(text: str, task: str, choices=None) -> Tuple[Optional[str], Optional[str], str]:
    """(rationale without its answer sentence, the authors' teacher label, '') or (None, None, why): the
    authors' parse of the teacher's raw text for `task`."""
    from engine.text.answers import EQUATION_TASKS

    if task == "CSQA":
        try:
            rationale, label = authors_parse_cqa(text)
        except ValueError:  # their loader has no try: one such text aborts their run.py
            return None, None, "authors_parser_raises"
    elif task in EQUATION_TASKS or task == "ASDIV":
        rationale, label = authors_parse_svamp(text)
    else:
        rationale, label = authors_style_split(text, task, choices)
    if not rationale.strip():
        return None, None, "no_rationale"
    return rationale, label, ""


def parse_teacher_output(text: str, task: str, choices=None) -> Tuple[Optional[str], Optional[str], str]:
    """Ours (--parse ours): (rationale through its answer sentence, teacher label, '') or (None, None,
    why it is unusable)."""
    text = _NEXT_QUESTION.split(text, maxsplit=1)[0]
    m = _ANSWER_SENTENCE.search(text)
    if not m:
        return None, None, "no_answer_sentence"
    if not text[:m.start()].strip():
        return None, None, "no_rationale"
    rest = text[m.end():]
    end = _SENTENCE_END.search(rest)
    sentence = rest[:end.start()] if end else rest
    label = teacher_label(sentence, task, choices)
    if label is None:
        return None, None, "unreadable_teacher_label"
    stop = m.end() + (end.end() if end else len(rest))
    return text[:stop].strip(), label, ""


LABEL_FORMATS = ("text", "letter")
PARSES = ("authors", "ours")


def in_label_format(label: str, choices, label_format: str) -> Optional[str]:
    """A CSQA label (a letter or a choice's text) as `label_format` asks: its letter, or the choice's
    text (a label that is one stays as written); None when it names no choice."""
    from engine.text.answers import choice_of_text

    letter = choice_of_text(label, choices) or choice_letter(label, choices)
    if label_format == "letter":
        return letter
    if choice_of_text(label, choices):
        return str(label).strip()
    index = "ABCDE".index(letter) if letter else len(choices or [])
    return choices[index] if index < len(choices or []) else None


def gold_label(rec: dict, index: int, path: str, task: str, choices, label_format: str = "letter") -> str:
    from engine.runtime.errors import DataError
    from engine.text.answers import CHOICE_TASKS, parse_label

    value = rec.get("label", rec.get("answer"))
    if value is None or isinstance(value, bool) or not str(value).strip():
        raise DataError(f"{path} record {index} has no gold label ('label' or 'answer')")
    label = in_label_format(str(value), choices, label_format) if task in CHOICE_TASKS else str(value).strip()
    if label is None or parse_label(label, task, choices=choices) is None:
        raise DataError(f"{path} record {index}: the gold label {value!r} cannot be read as a {task} answer"
                        + (" (nor matched to one of its choices)" if task in CHOICE_TASKS else ""))
    return label


def teacher_fields(rec: dict, i: int, path: str, task: str, choices, parse: str, counts: Counter):
    """(rationale, or a list of them, teacher label as the parse gives it, why the record is unusable
    or ''): from `llm_output` (raw text), `llm_rationale` (+ `llm_label`), or `output` (a raw text, or
    a list of them as infer.py --num_samples K writes: the usable ones kept, the label their majority
    answer, the rationales dropped counted in `counts` as rationales_WHY)."""
    from engine.infer.metrics import majority_vote
    from engine.runtime.errors import DataError

    def split(text: str):
        return authors_split(text, task, choices) if parse == "authors" else parse_teacher_output(text, task, choices)

    if isinstance(rec.get("llm_output"), str):
        return split(rec["llm_output"])
    if isinstance(rec.get("llm_rationale"), str):
        return given_rationale(rec, task, choices, parse)
    output = rec.get("output")
    if isinstance(output, str):
        return split(output)
    if isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        parsed = [split(o) for o in output]
        kept = [(r, label) for r, label, why in parsed if not why]
        for _, _, why in parsed:
            counts[f"rationales_{why}"] += bool(why)  # one of a list; the record may keep others
        if not kept:
            return None, None, parsed[0][2]
        label = majority_vote([label for _, label in kept], task)[0] or kept[0][1]
        return ([r for r, _ in kept] if len(kept) > 1 else kept[0][0]), label, ""
    raise DataError(f"{path} record {i} has no teacher output ('llm_output' raw text, 'llm_rationale', or "
                    f"'output': a raw text or a list of them)")


def given_rationale(rec: dict, task: str, choices, parse: str):
    """teacher_fields of a record whose rationale is given apart (`llm_rationale`, maybe `llm_label`)."""
    rationale = rec["llm_rationale"].rstrip() if parse == "authors" else rec["llm_rationale"].strip()
    if not rationale.strip():
        return None, None, "no_rationale"
    if rec.get("llm_label") is not None:
        given = str(rec["llm_label"])
        if parse == "ours":
            label = teacher_label(given, task, choices)
        else:  # as given; "(b) y" as the text of the choice it names
            label = (in_label_format(given, choices, "text") if task == "CSQA" else None) or given
        return rationale, label, "" if label else "unreadable_teacher_label"
    _, label, why = parse_teacher_output(rationale, task, choices)
    return rationale, label, why


def convert(records: List[dict], task: str, path: str, parse: str = "authors", label_format: str = "text"):
    """(training records, counts) from step-by-step records (see the module's docstring)."""
    from engine.runtime.errors import DataError
    from engine.text.answers import CHOICE_TASKS, choices_in, is_correct, parse_label

    out, counts = [], Counter()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path} record {i} is not a JSON object")
        choices = rec.get("choices")
        if choices is not None and not (isinstance(choices, list) and 0 < len(choices) <= len(CHOICE_LETTERS)
                                        and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{path} record {i}: 'choices' must be a list of 1 to 5 strings")
        question = next((rec[k] for k in ("question", "input", "instruction") if k in rec), None)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path} record {i} has no question ('question', 'input' or 'instruction')")
        instruction = format_question(question.strip(), choices)
        choices = choices or choices_in(instruction)
        label = gold_label(rec, i, path, task, choices, label_format)
        rationale, llm_label, why = teacher_fields(rec, i, path, task, choices, parse, counts)
        # the authors' text label stays as they parse it; ours (a letter) and the letter format convert
        if not why and task in CHOICE_TASKS and llm_label.strip() and (parse, label_format) != ("authors", "text"):
            llm_label = in_label_format(llm_label, choices, label_format)
            why = "" if llm_label is not None else "teacher_label_names_no_choice"
        if why:
            counts[why] += 1
            continue
        counts["kept"] += 1
        teacher = parse_label(llm_label, task, choices=choices)
        counts["teacher_label_differs_from_gold"] += not is_correct(teacher, label, task, choices=choices)
        counts["teacher_label_blank"] += not llm_label.strip()
        item = {"instruction": instruction, "output": rationale, "label": label, "llm_label": llm_label}
        if "id" in rec:
            item = {"id": rec["id"], **item}
        out.append(item)
    return out, counts


def read_dataset_dir(dataset_dir: str, split: str):
    """Records of the authors' layout: the source split joined, in order, with the raw teacher outputs."""
    from engine.runtime.errors import DataError
    from engine.text.records import read_records

    name = os.path.basename(os.path.normpath(dataset_dir))
    source = os.path.join(dataset_dir, f"{name}_{split}.json")
    records = read_records(source, required=())
    parts = glob.glob(os.path.join(dataset_dir, "llm", f"{split}_CoT_*.json"))
    numbered = sorted((int(m.group(1)), p) for p in parts
                      for m in [re.search(rf"{re.escape(split)}_CoT_(\d+)\.json$", p)] if m)
    if not numbered:
        raise DataError(f"{dataset_dir}/llm holds no {split}_CoT_N.json teacher outputs")
    if [n for n, _ in numbered] != list(range(len(numbered))):
        raise DataError(f"{dataset_dir}/llm: the {split}_CoT_N.json files are not numbered 0..{len(numbered) - 1} "
                        f"(found {[n for n, _ in numbered]})")
    outputs = []
    for _, p in numbered:
        try:
            batch = json.load(open(p, encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{p} is not a readable JSON file ({e})") from None
        if not isinstance(batch, list) or not all(isinstance(o, str) for o in batch):
            raise DataError(f"{p} must be a JSON list of the teacher's raw outputs (strings)")
        outputs += batch
    if len(outputs) != len(records):
        raise DataError(f"{dataset_dir}/llm holds {len(outputs)} teacher outputs for {split}, but {source} has "
                        f"{len(records)} records; they are paired in order")
    return [{**r, "llm_output": o} for r, o in zip(records, outputs)], source, name


@writes("output_file")
def main(output_file: str, input_file: str = None, dataset_dir: str = None, split: str = "train", task: str = None,
         overwrite: bool = False, parse: str = "authors", label_format: str = None):
    """Convert step-by-step records (question, choices, gold label, teacher output) into a train.py file.

    Args:
        output_file: the training JSON (instruction, output, label, llm_label).
        input_file: records with question/input/instruction, optional choices, label/answer, and llm_output (raw), llm_rationale, or output (raw text or a list of them, as infer.py writes).
        dataset_dir: instead of input_file, the authors' directory (NAME_SPLIT.json and llm/SPLIT_CoT_N.json).
        split: the split read from dataset_dir (train, test, ...).
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: how labels are read (default from dataset_dir's name: cqa, svamp).
        overwrite: replace an existing output_file (never the input_file itself).
        parse: authors (their split: the rationale without its answer sentence) or ours (the rationale through it).
        label_format: CSQA labels as text (the choice's text, the authors'; the default) or letter (A-E).
    """
    from engine.runtime.errors import DataError
    from engine.runtime.fileio import atomic_write_text
    from engine.text.answers import CHOICE_TASKS, check_task
    from engine.text.records import read_records

    if (input_file is None) == (dataset_dir is None):
        raise DataError("pass exactly one of --input_file (records) and --dataset_dir (the authors' layout)")
    source = input_file
    if dataset_dir is not None and not os.path.isdir(dataset_dir):
        raise DataError(f"--dataset_dir {dataset_dir} is not a directory")
    if task is None:
        name = os.path.basename(os.path.normpath(dataset_dir)) if dataset_dir else None
        if name not in DATASET_TASKS:
            raise DataError("--task is needed to read the labels (GSM8K, SVAMP, ASDiv, CSQA, ARITH)")
        task = DATASET_TASKS[name]
    task = check_task(task)
    if parse not in PARSES:
        raise DataError(f"--parse {parse!r} is not one of {', '.join(PARSES)}")
    if label_format is not None and task not in CHOICE_TASKS:
        raise DataError(f"--label_format is for multiple-choice tasks (CSQA), not {task}")
    label_format = label_format or "text"
    if label_format not in LABEL_FORMATS:
        raise DataError(f"--label_format {label_format!r} is not one of {', '.join(LABEL_FORMATS)}")
    if os.path.exists(output_file):
        if input_file and os.path.exists(input_file) and os.path.samefile(input_file, output_file):
            raise DataError(f"--output_file {output_file} is the --input_file; write the training file elsewhere")
        if os.path.isdir(output_file):
            raise DataError(f"--output_file {output_file} is a directory")
        if not overwrite:
            raise DataError(f"--output_file {output_file} already exists; pass --overwrite True to replace it")
    if dataset_dir is not None:
        records, source, _ = read_dataset_dir(dataset_dir, split)
    else:
        records = read_records(input_file, required=())
    out, counts = convert(records, task, source, parse, label_format)
    if not out:
        raise DataError(f"{source}: no record kept a teacher rationale with a readable answer ({dict(counts)})")
    atomic_write_text(output_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    dropped = {k: counts[k] for k in ("authors_parser_raises", "no_answer_sentence", "no_rationale",
                                      "unreadable_teacher_label", "teacher_label_names_no_choice") if counts[k]}
    dropped.update({k: v for k, v in sorted(counts.items()) if k.startswith("rationales_") and v})
    differ = counts["teacher_label_differs_from_gold"]
    print(f"kept {counts['kept']} of {len(records)} records ({differ} with a teacher label other than the gold one)"
          + "".join(f"\n  dropped, {k}: {v}" for k, v in dropped.items())
          + ("\n  (train.py's --holdout_fraction and --subsample draw from the records kept, so their selection is "
             "no longer the authors' on these records)" if dropped else ""))
    print(json.dumps({"records": len(records), "kept": counts["kept"], "dropped": dropped,
                      "teacher_label_differs_from_gold": counts["teacher_label_differs_from_gold"],
                      "teacher_label_blank": counts["teacher_label_blank"], "parse": parse,
                      "label_format": label_format if task in CHOICE_TASKS else None, "task": task,
                      "output_file": output_file}))


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
