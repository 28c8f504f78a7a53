"""Implicit chain-of-thought data: `input||cot #### answer` lines (seed 003's format), and their
token ids for each model of a stage (teacher, student and emulator may use different tokenizers:
every position below is counted in the tokens of the model it belongs to).

Teacher sequence:  BOS x EOS cot EOS answer EOS   (loss on cot, EOS, answer, EOS)
No-CoT sequence:   BOS x EOS answer EOS           (the no-CoT baseline; also the student's)
Emulator input:    BOS x EOS
s1 is the position of the EOS ending x, s2 that of the EOS ending the CoT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from engine.runtime.errors import DataError
from engine.text.records import read_text
from engine.text.sequences import IGNORE

SEPARATOR, ANSWER_MARK = "||", "####"


@dataclass(frozen=True)
class CoTLine:
    input: str
    cot: str
    answer: str


def read_cot_lines(path: str, flag: str = "--train_file") -> List[CoTLine]:
    """Every non-blank line of `path` as (input, cot, answer); one sentence naming the line otherwise."""
    text = read_text(path, flag)
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if SEPARATOR not in line:
            raise DataError(f"{flag} {path} line {number} has no '||' between the input and the chain of thought "
                            f"(expected `input||cot #### answer`)")
        question, rest = line.split(SEPARATOR, 1)
        if ANSWER_MARK not in rest:
            raise DataError(f"{flag} {path} line {number} has no '####' before the answer after its '||' "
                            f"(expected `input||cot #### answer`)")
        cot, answer = rest.rsplit(ANSWER_MARK, 1)
        if not question.strip():
            raise DataError(f"{flag} {path} line {number} has an empty input before '||'")
        if not answer.strip():
            raise DataError(f"{flag} {path} line {number} has an empty answer after '####'")
        out.append(CoTLine(question.strip(), cot.strip(), answer.strip()))
    if not out:
        raise DataError(f"{flag} {path} holds no `input||cot #### answer` line")
    return out


def same_answer(predicted: str, gold: str) -> bool:
    """Exact match up to whitespace (answers are digit strings or numbers)."""
    return predicted.split() == gold.split()


@dataclass
class Encoded:
    """One line in one model's tokens: x (with BOS), the CoT and the answer (neither with EOS)."""

    x: List[int]
    cot: List[int]
    answer: List[int]

    @property
    def s1(self) -> int:
        return len(self.x)

    @property
    def s2(self) -> int:
        return len(self.x) + 1 + len(self.cot)

    def teacher_sequence(self, eos: int, cot: bool = True) -> List[int]:
        middle = self.cot + [eos] if cot else []
        return self.x + [eos] + middle + self.answer + [eos]

    def prompt(self, eos: int) -> List[int]:
        return self.x + [eos]


def encode_lines(lines: List[CoTLine], tok) -> List[Encoded]:
    if tok.eos_id is None:
        raise DataError(f"{tok.path} defines no EOS token, which separates input, chain of thought and answer")
    return [Encoded(tok.encode(l.input, bos=True), tok.encode(l.cot, bos=False) if l.cot else [],
                    tok.encode(l.answer, bos=False)) for l in lines]


def shifted(seq: List[int], first_target: int):
    """(input ids, next-token labels) of `seq`, labels IGNORE for targets before index first_target."""
    labels = [t if i + 1 >= first_target else IGNORE for i, t in enumerate(seq[1:])]
    return seq[:-1], labels


class CoTExamples:
    """The lines of a stage in the tokens of each model it runs (`views`: name -> tokenizer), keeping
    only lines whose longest sequence fits max_seq_len (the others are counted, never cut: a cut
    chain of thought would move s2)."""

    def __init__(self, lines: List[CoTLine], views: dict, max_seq_len: int, path: str, cot_views=("teacher",)):
        self.lines = lines
        self.enc = {name: encode_lines(lines, tok) for name, tok in views.items()}
        self.eos = {name: tok.eos_id for name, tok in views.items()}
        self.max_seq_len = max_seq_len

        def fits(i):  # the longest sequence a view runs (its input is one token shorter)
            return all(len(e[i].teacher_sequence(0, name in cot_views)) - 1 <= max_seq_len
                       for name, e in self.enc.items())

        self.keep = [i for i in range(len(lines)) if fits(i)]
        self.dropped = len(lines) - len(self.keep)
        if not self.keep:
            raise DataError(f"{path}: no line fits --max_seq_len={max_seq_len} tokens")

    def __len__(self) -> int:
        return len(self.keep)

    def describe(self) -> str:
        msg = f"{len(self)} lines"
        if self.dropped:
            msg += f", {self.dropped} left out (longer than --max_seq_len={self.max_seq_len} tokens)"
        return msg

    def get(self, view: str, position: int) -> Encoded:
        return self.enc[view][self.keep[position]]

    def answer_text(self, position: int) -> str:
        return self.lines[self.keep[position]].answer


def padded(rows: List[List[int]], pad: int):
    """[B, T] LongTensor of right-padded rows."""
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
