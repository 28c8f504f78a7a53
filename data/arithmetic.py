"""Generated arithmetic tasks with step-by-step rationales, in the MCC-KD JSON format.

  python data/arithmetic.py --out_dir D [--kind add|sum3] [--n_train 2000] [--n_test 200] [--seed 0]

kind=add:  "What is 47 + 38 ?" -> "7 + 8 = 15 , write 5 carry 1 . 4 + 3 + 1 = 8 , write 8 .
           Therefore, the answer is 85 ."   (digit by digit, least significant first)
           With --multi True each training question also gets the rationale with the operands swapped.
kind=sum3: "What is 12 + 7 + 30 ?" -> several valid rationales that add the same three numbers in
           different orders ("12 + 7 = 19 . 19 + 30 = 49 . Therefore, the answer is 49 ."), all
           kept in `output` as a list (the multi-rationale input of MCC-KD).
Test questions never appear in the training split. Writes train.json, test.json (and dev.json).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime.outputs import writes  # noqa: E402  (the output guard: never an input, --overwrite, lock)


def add_rationale_fixed(a: int, b: int, width: int) -> str:
    """Fixed-width steps (every operand digit and carry written, sums as two digits): each step
    sits at the same offset from the digits it reads, which a small model learns quickly."""
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry = [], 0
    for i in range(width):
        s = int(da[i]) + int(db[i]) + carry
        steps.append(f"{da[i]} + {db[i]} + {carry} = {s:02d} .")
        carry = s // 10
    return " ".join(steps) + f" Therefore, the answer is {a + b} ."


def add_rationale(a: int, b: int) -> str:
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        expr = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = s // 10
        steps.append(f"{expr} = {s} , write {s % 10}" + (f" carry {carry}" if carry else "") + " .")
    if carry:
        steps.append(f"write {carry} .")
    return " ".join(steps) + f" Therefore, the answer is {a + b} ."


def sum3_rationales(nums) -> list:
    """Every order of adding the three numbers pairwise: distinct rationales, same answer."""
    out = []
    for x, y, z in itertools.permutations(range(3)):
        if x > y:
            continue  # a + b and b + a are the same first step
        first = nums[x] + nums[y]
        text = f"{nums[x]} + {nums[y]} = {first} . {first} + {nums[z]} = {first + nums[z]} . " \
               f"Therefore, the answer is {sum(nums)} ."
        if text not in out:
            out.append(text)
    return out


def make_splits(kind: str = "add", n_train: int = 2000, n_test: int = 200, n_dev: int = 0, max_value: int = 99,
              seed: int = 0, min_value: int = 0, style: str = "natural", multi: bool = False):
    rng = random.Random(seed)
    seen, splits = set(), {"train": [], "dev": [], "test": []}
    want = {"test": n_test, "dev": n_dev, "train": n_train}
    space = (max_value - min_value + 1) ** (2 if kind == "add" else 3)
    width = len(str(max_value))
    if sum(want.values()) > space:
        raise ValueError(f"only {space} distinct questions exist for --max_value={max_value}")
    for split in ("test", "dev", "train"):
        while len(splits[split]) < want[split]:
            nums = tuple(rng.randint(min_value, max_value) for _ in range(2 if kind == "add" else 3))
            if nums in seen:
                continue
            seen.add(nums)
            question = "What is " + " + ".join(map(str, nums)) + " ?"
            if kind == "add":
                make = (lambda x, y: add_rationale_fixed(x, y, width)) if style == "fixed" else add_rationale
                output = make(*nums)
                if multi and split == "train" and nums[0] != nums[1]:
                    output = [output, make(nums[1], nums[0])]  # the same steps with the operands swapped
            elif kind == "sum3":
                output = sum3_rationales(nums)
                if split != "train":
                    output = output[0]
            else:
                raise ValueError(f"--kind {kind!r} is not add or sum3")
            splits[split].append({"instruction": question, "output": output, "label": str(sum(nums))})
    return splits


@writes("out_dir", dirs=("out_dir",))
def main(out_dir: str, kind: str = "add", n_train: int = 2000, n_test: int = 200, n_dev: int = 0, max_value: int = 99,
         seed: int = 0, min_value: int = 0, style: str = "natural", multi: bool = False, overwrite: bool = False):
    """Write train.json / test.json (and dev.json when n_dev > 0) under out_dir.

    Args:
        out_dir: output directory.
        kind: add (two numbers, digit-by-digit rationale) or sum3 (three numbers, several rationales each).
        n_train: training questions.
        n_test: held-out test questions.
        n_dev: held-out dev questions.
        max_value: operands are drawn from min_value..max_value.
        seed: generator seed.
        min_value: smallest operand.
        style: natural (digit steps as a person writes them) or fixed (fixed-width steps, kind=add).
        multi: kind=add: two rationales per training question (the operands taken in either order).
        overwrite: write into an out_dir that already holds files (its split files are replaced).
    """
    from engine.runtime.fileio import atomic_write_text

    splits = make_splits(kind, n_train, n_test, n_dev, max_value, seed, min_value, style, multi)
    os.makedirs(out_dir, exist_ok=True)
    for name, records in splits.items():
        if records:
            atomic_write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(records, indent=1) + "\n")
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in splits.items() if v)} questions to {out_dir}")


if __name__ == "__main__":
    from engine.runtime.cli import run_cli

    run_cli(main)
