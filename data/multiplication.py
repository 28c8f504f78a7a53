"""Generated n x m multiplication in the implicit chain-of-thought line format of seed 003's files
(`shared/data/implicit_cot/4_by_4_mult/*.txt`), so a training split never has to be downloaded:

  9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) + 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1

Every number is written least significant digit first (3719 * 3349 above). The chain of thought
lists the partial products a * b_i * 10^i, zero-padded to n + 1 + i digits, with the running sum
after each one but the first and the last in parentheses (same width); the answer has n + m digits.
Operands have no leading zero (a in [10^(n-1), 10^n), likewise b), as in the seed's files.

  python data/multiplication.py --out_dir D --n 3 --m 3 [--n_train 20000] [--n_valid 500] [--n_test 500]
      [--seed 0] [--exclude shared/data/implicit_cot/4_by_4_mult/test_bigbench.txt]

Writes train.txt, valid.txt, test.txt (empty splits are not written); no question appears in two
splits, nor in any --exclude file.
"""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402  (the output guard: never an input, --overwrite, lock)


def reversed_digits(x: int, width: int) -> str:
    """x zero-padded to `width` digits, least significant first, one digit per word."""
    return " ".join(str(x).zfill(width)[::-1])


def multiplication_line(a: int, b: int, n: int, m: int) -> str:
    """The `input||cot #### answer` line of a * b (a of n digits, b of m digits)."""
    b_digits = str(b).zfill(m)[::-1]
    steps, total = [], 0
    for i in range(m):
        partial = a * int(b_digits[i]) * 10 ** i
        total += partial
        width = n + 1 + i
        if i == 0:
            steps.append(reversed_digits(partial, width))
            continue
        steps.append("+ " + reversed_digits(partial, width))
        if i < m - 1:
            steps.append("( " + reversed_digits(total, width) + " )")
    return f"{reversed_digits(a, n)} * {reversed_digits(b, m)}||{' '.join(steps)} #### {reversed_digits(a * b, n + m)}"


def operands(input_text: str):
    """(a, b, n, m) from an input such as '9 1 7 3 * 9 4 3 3'."""
    left, right = input_text.split("*")
    da, db = left.split(), right.split()
    return int("".join(reversed(da))), int("".join(reversed(db))), len(da), len(db)


def make_splits(n: int, m: int, sizes: dict, seed: int = 0, exclude=()):
    """{split: [lines]} of distinct questions, none of them in `exclude` (input strings)."""
    space = 9 * 10 ** (n - 1) * 9 * 10 ** (m - 1)
    taken = set(exclude)
    if sum(sizes.values()) > space - len(taken):
        raise ValueError(f"only {space} distinct {n} x {m} questions exist ({len(taken)} excluded)")
    rng = random.Random(seed)
    out = {}
    for split, count in sizes.items():
        lines = []
        while len(lines) < count:
            a, b = rng.randrange(10 ** (n - 1), 10 ** n), rng.randrange(10 ** (m - 1), 10 ** m)
            line = multiplication_line(a, b, n, m)
            question = line.split("||", 1)[0]
            if question in taken:
                continue
            taken.add(question)
            lines.append(line)
        out[split] = lines
    return out


@writes("out_dir", dirs=("out_dir",), inputs=("exclude",))
def main(out_dir: str, n: int = 3, m: int = 3, n_train: int = 20000, n_valid: int = 500, n_test: int = 500,
         seed: int = 0, exclude: str = None, overwrite: bool = False):
    """Write train.txt / valid.txt / test.txt of n x m multiplication under out_dir.

    Args:
        out_dir: output directory.
        n: digits of the first operand.
        m: digits of the second operand (= steps of the chain of thought).
        n_train: training questions.
        n_valid: validation questions.
        n_test: test questions.
        seed: generator seed.
        exclude: comma-separated files of `input||cot #### answer` lines whose questions no split may hold (e.g. a real test file).
        overwrite: write into an out_dir that already holds files (its split files are replaced).
    """
    from engine.distill.implicit.data import read_cot_lines
    from engine.runtime.errors import UserError
    from engine.runtime.fileio import atomic_write_text

    if n < 1 or m < 1:
        raise UserError(f"--n and --m must be >= 1, got {n} and {m}")
    for name, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    held_out = []
    for path in (exclude.split(",") if isinstance(exclude, str) else list(exclude or [])):
        held_out += [" ".join(line.input.split()) for line in read_cot_lines(path, "--exclude")]
    try:
        splits = make_splits(n, m, {"train": n_train, "valid": n_valid, "test": n_test}, seed, held_out)
    except ValueError as e:
        raise UserError(f"--n_train/--n_valid/--n_test: {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    for name, lines in splits.items():
        if lines:
            atomic_write_text(os.path.join(out_dir, f"{name}.txt"), "\n".join(lines) + "\n")
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in splits.items() if v)} {n} x {m} multiplications to "
          f"{out_dir}" + (f" ({len(held_out)} excluded questions)" if held_out else ""))


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
