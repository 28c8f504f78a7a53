"""Train a small sentencepiece tokenizer for tiny models (tests and the demo): digits split one per
token, so arithmetic is learnable by a small model.

  python data/make_tokenizer.py --output tokenizer.model [--corpus FILE ...] [--vocab_size 320]
"""
from __future__ import annotations

import io
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402  (the output guard: never an input, --overwrite, lock)

# words the tiny models meet in the generated data sets and the prompt template
BASE_TEXT = """Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
### Response:
Question: What is the result? Let's think step by step. First, then, next, finally, so, therefore, the answer is
plus minus times add subtract multiply total sum difference product each apples books has have had gives gave
Tom Mary Anna John buys sells eats has left more fewer how many much altogether in all
The answer is (A) (B) (C) (D) (E) A B C D E yes no
"""


def default_corpus(n: int = 2000, seed: int = 0):
    rng = random.Random(seed)
    lines = BASE_TEXT.splitlines()
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        c = eval(f"{a}{op}{b}")
        lines.append(f"Question: What is {a} {op} {b} ? Answer: {a} {op} {b} = {c} . Therefore, the answer is {c} .")
    return lines


def train_tokenizer(output: str, corpus_lines, vocab_size: int = 320, split_digits: bool = True) -> str:
    import sentencepiece as spm

    from engine.runtime.fileio import atomic_open

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        split_digits=split_digits, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, add_dummy_prefix=True)
    with atomic_open(output, "wb") as f:
        f.write(buf.getvalue())
    return output


@writes("output", inputs=("corpus",))
def main(output: str = "tokenizer.model", corpus: str = None, vocab_size: int = 320, seed: int = 0,
         split_digits: bool = True, overwrite: bool = False):
    """Train the tokenizer.

    Args:
        output: where to write the sentencepiece .model file.
        corpus: optional text file(s), comma separated, added to the built-in arithmetic corpus.
        vocab_size: target vocabulary size (a soft limit for small corpora).
        seed: seed of the built-in corpus.
        split_digits: one token per digit (False: numbers may merge into one token, e.g. a second, different tokenizer).
        overwrite: replace an existing output file.
    """
    lines = default_corpus(seed=seed)
    from engine.text.records import read_text

    for path in corpus.split(",") if isinstance(corpus, str) else corpus or []:
        lines += [line for line in read_text(path, "--corpus").split("\n") if line.strip()]
    train_tokenizer(output, lines, vocab_size, split_digits)
    print(f"wrote {output}")


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
