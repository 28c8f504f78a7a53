"""Reading answers: what a model's output (or a label) says, per task, and where a rationale spells it. Unparsable outputs are wrong, never dropped.

GSM8K / SVAMP / ASDiv: the last number of the sentence that states the answer ("... the answer is
18 ."), commas removed, compared by exact value (integers exactly, decimals by their exact decimal
value: 57505 is not 57500, 0.1 is 0.10); without such a sentence, the last number of the text.
Values are exact rationals (fractions.Fraction): no float rounding, any number of digits; a text that
is not a finite number ("nan", "inf") is unreadable, never a crash.
SVAMP: a label or an answer that is an equation ("( 15.0 - 4.0 )") counts as its value.
Numbers written in words ("twelve", "one hundred and five") are read where no digits are.
CSQA: the choice letter A-E of the answer sentence, else the last standalone letter; given the
choices (listed "(a) text" in the instruction, choices_in), an answer or label that is a choice's
text ("math problem", as the distilling step-by-step authors' labels are) reads as that choice's
letter, so text and letter labels score alike.

Scoring `exact` (--scoring exact, for reproducing distilling step-by-step; ours above is the
default): the whole output, whitespace at its ends aside, must equal the label string, as the
authors compare decoded predictions and labels (metrics.py:47); for SVAMP and ASDiv both are
evaluated as Python arithmetic and their values compared with == (metrics.py:30-36, 86; run.py:194-197).
Scoring `mcc` (for reproducing MCC-KD): the MCC-KD authors' runnable code's reading (DEC23
src/evaluator.py:44-70): the last number of the output's last line as written (commas kept), or
for CSQA its last capital A-G, equal to the label string.

Answer spans (MCC-KD): the response tokens that spell the final answer.
"""
from __future__ import annotations

import ast
import bisect
import operator
import re
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

from engine.runtime.errors import UserError

NUMERIC_TASKS = ("GSM8K", "SVAMP", "ASDIV", "ARITH", "MULT")
CHOICE_TASKS = ("CSQA",)
TASKS = NUMERIC_TASKS + CHOICE_TASKS
EQUATION_TASKS = ("SVAMP",)  # labels (and label-task outputs) may be equations, compared by their value
SCORINGS = ("ours", "exact", "mcc")
EXACT_EQUATION_TASKS = ("SVAMP", "ASDIV")  # step-by-step's run.py:194-197 scores these by eval()
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_CHOICE = re.compile(r"\(([A-Ea-e])\)|(?<![A-Za-z'])([A-E])(?![A-Za-z'])")
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9}


def check_task(task: str) -> str:
    t = str(task).upper()
    if t not in TASKS:
        raise UserError(f"--task {task!r} is unknown; known tasks: GSM8K, SVAMP, ASDiv, CSQA, ARITH, MULT")
    return t


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise UserError(f"--scoring must be ours, exact or mcc, got {scoring!r}")
    return scoring


_PY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def python_arithmetic(text: str):
    """The value Python's eval() gives `text` (an int or a float, with Python's own rounding) when
    the text is arithmetic on number literals: + - * / // % ** and parentheses, as step-by-step's
    eval_equation computes a SVAMP answer; None where eval would raise (eval's other powers, names
    and calls, are not run: None too). Exponents beyond 64 in magnitude are refused, not computed."""

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp) and type(node.op) in _PY_OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError(node)
            return _PY_OPS[type(node.op)](left, right)
        raise ValueError(node)

    body = str(text).strip(" \t")  # as eval() reads it: spaces and tabs at both ends dropped (not newlines)
    try:
        return value(ast.parse(body, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def _exact_answer(text, task: str) -> Optional[str]:
    """Exact scoring's reading of an output or a label: the text without whitespace at its ends
    (None when empty); for SVAMP / ASDiv the text eval() reads, when eval() would give it a value."""
    if text is None or isinstance(text, bool):
        return None
    if check_task(task) in EXACT_EQUATION_TASKS:  # as eval() reads it: spaces and tabs at the ends dropped
        body = str(text).strip(" \t")
        return body if python_arithmetic(body) is not None else None
    return str(text).strip() or None


_MCC_NUMBER = re.compile(r"(-?\d+)(,?\d+)?(\.\d+)?")


def _mcc_answer(text, task: str) -> Optional[str]:
    """The MCC-KD authors' reading (DEC23 src/evaluator.py:44-59): only the last line of the output;
    the last of its numbers, written as matched (commas kept), or for CSQA the last of its capital
    letters A-G (inside words too); None when the line has none."""
    endline = str(text).strip().split("\n")[-1]
    if check_task(task) in CHOICE_TASKS:
        matches = re.findall(r"[A-G]", endline)
    else:
        matches = ["".join(m) for m in _MCC_NUMBER.findall(endline)]
    return matches[-1] if matches else None


def _answer_sentence(text: str) -> Optional[str]:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    end = _SENTENCE_END.search(rest)
    return rest[: end.start()] if end else rest


MAX_NUMBER_CHARS = 1000  # longer "numbers" (or exponents) are not read: no answer is a 10^1000000


def _to_number(s: str) -> Optional[Fraction]:
    """The exact value of a number written with digits ("1,234", "-2.5", "3e4", "10/3"); None when `s`
    is not a finite number of reasonable size."""
    s = str(s).replace(",", "").strip()
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    exponent = re.search(r"[eE]([+-]?\d+)$", s)
    if exponent and abs(int(exponent.group(1))) > MAX_NUMBER_CHARS:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):  # also "nan", "inf", and ints beyond Python's digit limit
        return None


def word_numbers(text: str) -> List[Tuple[int, int, Fraction]]:
    """(start, end, value) of the numbers written in words: "twelve", "twenty-one", "one hundred and
    five", "three thousand". A word that cannot continue a number ("one two") starts a new one."""
    out = []
    words = list(re.finditer(r"[A-Za-z]+", text))
    i = 0
    while i < len(words):
        total = current = 0
        last = None  # kind of the previous word: unit, teen, tens, hundred, scale
        start, end, j = words[i].start(), None, i
        while j < len(words):
            w = words[j].group().lower()
            if j > i and text[words[j - 1].end():words[j].start()].strip(" -"):
                break  # only spaces or hyphens inside a number
            if w == "and" and last == "hundred" and j + 1 < len(words) and words[j + 1].group().lower() in {**_UNITS, **_TENS}:
                j += 1
                continue
            if w in _UNITS and last in (None, "tens", "hundred", "scale") and not (last == "tens" and _UNITS[w] >= 10):
                if last == "tens" and _UNITS[w] == 0:
                    break
                current, last = current + _UNITS[w], "unit" if _UNITS[w] < 10 else "teen"
            elif w in _TENS and last in (None, "hundred", "scale"):
                current, last = current + _TENS[w], "tens"
            elif w == "hundred" and last in ("unit", "teen", "tens") and current < 100:
                current, last = current * 100, "hundred"
            elif w in _SCALES and w != "hundred" and last in ("unit", "teen", "tens", "hundred"):
                total, current, last = total + current * _SCALES[w], 0, "scale"
            else:
                break
            end, j = words[j].end(), j + 1
        if end is None:
            i += 1
            continue
        out.append((start, end, Fraction(total + current)))
        i = j
    return out


def number_mentions(text: str, words: bool = False) -> List[Tuple[int, int, Fraction]]:
    """(start, end, value) of the numbers in `text`, in order: digits ("1,234", "-2.5") and, when there
    are none (or `words`), numbers written in words; a text that states its numbers in digits never
    has the "one" of "no one" read as an answer."""
    digits = [(m.start(), m.end(), _to_number(m.group())) for m in _NUMBER.finditer(text)]
    digits = [d for d in digits if d[2] is not None]
    return sorted(digits + word_numbers(text)) if words else digits or word_numbers(text)


def _format_number(value: Fraction) -> str:
    """An exact value as text that _to_number reads back to the same value: an integer ("57505"), a
    finite decimal ("0.125", every digit kept), or a fraction ("10/3") when no decimal is exact."""
    if value.denominator == 1:
        return str(value.numerator)
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10 ** places // value.denominator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


def equation_value(text: str) -> Optional[Fraction]:
    """The value of `text` when the whole of it (a final period aside) is arithmetic on numbers:
    + - * / and parentheses, e.g. SVAMP's "( 15.0 - 4.0 )"; None otherwise (or on division by zero).
    Exact (rational arithmetic); walks the parsed expression itself: nothing is ever passed to eval()."""
    body = str(text).strip().rstrip(".").strip()
    if not body or len(body) > 200 or not re.fullmatch(r"[\d\s.+\-*/()]+", body):
        return None
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            number = _to_number(ast.get_source_segment(body, node) or "")
            if number is None:
                raise ValueError(node)
            return number
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError(node)

    try:
        return value(ast.parse(body, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


_CHOICE_LINE = re.compile(r"^\(([a-eA-E])\) ?(.*)$", re.MULTILINE)


def choices_in(instruction) -> Optional[List[str]]:
    """The choice texts an instruction lists as "(a) text" lines, in letter order from (a); None
    when it lists none (or not from (a) on)."""
    lines = _CHOICE_LINE.findall(str(instruction or ""))
    letters = "".join(letter.lower() for letter, _ in lines)
    return [text for _, text in lines] if lines and letters == "abcde"[: len(lines)] else None


def _same_text(a: str) -> str:
    return " ".join(str(a).split()).rstrip(".").strip().casefold()


def choice_of_text(text, choices) -> Optional[str]:
    """The letter of the first choice whose text `text` is (case and spacing aside, a final period
    dropped), or None."""
    wanted = _same_text(text)
    for i, c in enumerate(choices or []):
        if wanted and _same_text(c) == wanted:
            return "ABCDE"[i]
    return None


def extract_answer(text: str, task: str, scoring: str = "ours", choices: Optional[Sequence[str]] = None
                   ) -> Optional[str]:
    """The answer a model's output states, normalised; None when nothing can be read. With scoring
    exact: the whole output (see the module's docstring). For CSQA (scoring ours), `choices` (the
    record's choice texts) let an output that is a choice's text, or whose answer sentence is, read
    as its letter."""
    task = check_task(task)
    if check_scoring(scoring) == "exact":
        return _exact_answer(text or "", task)
    if scoring == "mcc":
        return _mcc_answer(text or "", task)
    text = text or ""
    sentence = _answer_sentence(text)
    if task in CHOICE_TASKS and choices:
        for segment in (text, sentence):
            if segment and choice_of_text(segment, choices):
                return choice_of_text(segment, choices)
    if task in EQUATION_TASKS:  # an answer stated as an equation is its value ("The answer is (32 - 5).")
        for segment in (sentence, text):
            if segment and equation_value(segment) is not None:
                return _format_number(equation_value(segment))
    if task in CHOICE_TASKS:
        for segment in (sentence, text):
            if segment:
                letters = [(a or b).upper() for a, b in _CHOICE.findall(segment)]
                if letters:
                    return letters[0] if segment is sentence else letters[-1]
        return None
    for segment in (sentence, text):
        if segment:
            numbers = number_mentions(segment)
            if numbers:
                return _format_number(numbers[-1][2])
    return None


def parse_label(label, task: str, scoring: str = "ours", choices: Optional[Sequence[str]] = None) -> Optional[str]:
    """A gold label in the form extract_answer gives (None when it cannot be read for the task); a
    CSQA label may be a choice's text when `choices` are given (scoring ours)."""
    if check_scoring(scoring) == "exact":
        return _exact_answer(label, task)
    if scoring == "mcc":  # their labels are compared as the files write them
        return str(label) if label is not None and not isinstance(label, bool) and str(label) else None
    if label is None or isinstance(label, bool):
        return None
    text = str(label).strip()
    if check_task(task) in CHOICE_TASKS:
        if choice_of_text(text, choices):
            return choice_of_text(text, choices)
        m = _CHOICE.search(text)
        return (m.group(1) or m.group(2)).upper() if m else None
    value = _to_number(text)
    if value is None and check_task(task) in EQUATION_TASKS:
        value = equation_value(text)
    return None if value is None else _format_number(value)


def unreadable_labels(records, task: str, scoring: str = "ours") -> List[int]:
    """Indices of the records whose 'label' cannot be read as an answer of `task` (scored wrong); a
    CSQA label may be the text of a choice its instruction lists."""
    return [i for i, r in enumerate(records)
            if parse_label(r.get("label"), task, scoring, choices_in(r.get("instruction"))) is None]


def label_warning(bad: List[int], n: int, task: str, path: str) -> str:
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return (f"warning: {path}: {len(bad)} of {n} labels cannot be read as {task} answers (records {shown}); "
            f"they count as wrong and are reported as unparsable_labels")


def is_correct(prediction: Optional[str], label, task: str, scoring: str = "ours",
               choices: Optional[Sequence[str]] = None) -> bool:
    """Whether a prediction (extract_answer's, with the same scoring) answers the label (a CSQA label
    given as a choice's text needs `choices`)."""
    gold = parse_label(label, task, scoring, choices)
    if prediction is None or gold is None:
        return False
    if scoring == "exact":
        if check_task(task) in EXACT_EQUATION_TASKS:
            value = python_arithmetic(prediction)
            return value is not None and value == python_arithmetic(gold)
        return prediction == gold
    if scoring == "mcc" or check_task(task) in CHOICE_TASKS:
        return gold == prediction
    pred = _to_number(prediction)
    return pred is not None and pred == _to_number(gold)


def answer_char_span(text: str, answer: str):
    """(start, end) characters of the answer inside `text`: in the sentence that states the answer
    ("... the answer is 18") when there is one, else its last occurrence; numbers match by value
    ("1,234" for 1234). None when the answer does not appear."""
    answer = str(answer).strip()
    if not answer:
        return None
    target = _to_number(answer)
    if target is not None:  # digits or words ("twelve"), but not the 18 of "18.5"
        hits = [(s, e) for s, e, v in number_mentions(text, words=True)
                if v == target
                and not (text[e:e + 1] == "." and text[e + 1:e + 2].isdigit())]
    else:
        hits = [m.span() for m in re.finditer(r"(?<![\w])" + re.escape(answer) + r"(?![\w])", text)]
    if not hits:
        return None
    phrase = list(_ANSWER_PHRASE.finditer(text))
    if phrase:
        after = [h for h in hits if h[0] >= phrase[-1].end()]
        if after:
            return after[0]
    return hits[-1]


def find_answer_span(tokenizer, response_ids: Sequence[int], text: str, answer: str):
    """[s, e) indices into response_ids of the tokens that spell `answer` in `text`, or None when the
    answer is absent or shares a token with its neighbours (so no clean span exists).

    Token i covers characters [end(i-1), end(i)) of the decoded text, end(i) = len(decode(ids[:i+1]))
    (non-decreasing), so two binary searches find the covering tokens with O(log n) decodes."""
    chars = answer_char_span(text, answer)
    if chars is None or not response_ids:
        return None
    cs, ce = chars

    class _Ends:  # a lazy sequence of end(i) for bisect
        def __len__(self):
            return len(response_ids)

        def __getitem__(self, i):
            return len(tokenizer.decode(list(response_ids[: i + 1])))

    ends = _Ends()
    s = bisect.bisect_right(ends, cs)  # first token ending after the answer starts
    e = bisect.bisect_left(ends, ce) + 1  # through the first token ending at or after its end
    return (s, e) if span_spells(tokenizer, response_ids, s, e, text[cs:ce]) else None


def span_spells(tokenizer, ids: Sequence[int], s: int, e: int, answer: str) -> bool:
    return 0 <= s < e <= len(ids) and tokenizer.decode(list(ids[s:e])).strip() == str(answer).strip()


def answer_key(prediction: Optional[str], task: str, scoring: str = "ours"):
    """What two predictions share when is_correct would judge them the same answer (for a majority
    vote): the exact value of a number (`72`, `72.0` and `72.00` are one answer), an arithmetic
    expression's value under --scoring exact on SVAMP / ASDiv, the text itself otherwise; None for no
    answer."""
    if prediction is None:
        return None
    if scoring == "exact" and check_task(task) in EXACT_EQUATION_TASKS:
        value = python_arithmetic(prediction)
        return ("value", value) if value is not None else ("text", prediction)
    if scoring in ("exact", "mcc") or check_task(task) in CHOICE_TASKS:
        return ("text", prediction)
    value = _to_number(prediction)
    return ("value", value) if value is not None else None
