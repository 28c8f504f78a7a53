"""Batches of an epoch: seeded order, length bucketing, one data format per batch."""
from __future__ import annotations

import zlib
from typing import List, Optional, Sequence

from engine.runtime.errors import DataError
from engine.text.sequences import stable_rng


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True) -> List[List[int]]:
    """Positions 0..n-1 grouped into batches of exactly batch_size for one epoch; the order depends
    only on (seed, epoch). Bucketing sorts windows of 32 batches by length to cut padding, then
    shuffles the batches. The last batch is completed with the epoch's first positions."""
    rng = stable_rng("order", seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if len(order) % batch_size:
        order += order[: batch_size - len(order) % batch_size]
        while len(order) % batch_size:  # fewer records than one batch
            order += order[: batch_size - len(order) % batch_size]
    if bucket:
        window = batch_size * 32
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if bucket:
        rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------
# Data formats (data/make_formats.py): one format per batch
# ----------------------------------------------------------------------------------------------
FORMATS = ("icl_answer", "icl_cot", "zs_answer", "zs_cot")


def parse_formats(formats) -> Optional[List[str]]:
    """--formats "icl_cot,zs_cot" -> the names, checked; None/"" -> None (every format of the file)."""
    if formats is None or formats == "":
        return None
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    for name in names:
        if name not in FORMATS:
            raise DataError(f"--formats {name!r} is not one of {', '.join(FORMATS)}")
    if not names or len(set(names)) != len(names):
        raise DataError(f"--formats {formats!r} must name each format once")
    return names


def format_groups(records: List[dict], formats, path: str) -> Optional[List[Optional[str]]]:
    """The data format of each record when the file carries them (`format`, written by
    data/make_formats.py), None for records of formats left out by --formats; None when the file
    carries no formats and none were asked for (batches are then formed as always)."""
    names = parse_formats(formats)
    marked = [i for i, r in enumerate(records) if "format" in r]
    if not marked:
        if names:
            raise DataError(f"--formats {','.join(names)} needs records with a 'format' (written by "
                            f"data/make_formats.py), but {path} record 0 has none")
        return None
    if len(marked) != len(records):
        first = next(i for i, r in enumerate(records) if "format" not in r)
        raise DataError(f"{path} record {first} has no 'format' while record {marked[0]} has one")
    for i, r in enumerate(records):
        if r["format"] not in FORMATS:
            raise DataError(f"{path} record {i}: format {r['format']!r} is not one of {', '.join(FORMATS)}")
    present = {r["format"] for r in records}
    missing = [n for n in names or [] if n not in present]
    if missing:
        raise DataError(f"--formats asks for {missing[0]} but {path} holds no record of that format "
                        f"(it has {', '.join(sorted(present))})")
    chosen = set(names or present)
    return [r["format"] if r["format"] in chosen else None for r in records]


def grouped_epoch_batches(lengths: Sequence[int], groups: Sequence[Optional[str]], batch_size: int, seed: int,
                          epoch: int, bucket: bool = True) -> List[List[int]]:
    """epoch_batches within each group (each batch holds one data format; positions whose group is
    None are left out), then all batches shuffled together; depends only on (seed, epoch)."""
    batches = []
    for g in sorted({x for x in groups if x is not None}):
        members = [p for p, x in enumerate(groups) if x == g]
        group_seed = zlib.crc32(repr((seed, g)).encode())
        for b in epoch_batches([lengths[p] for p in members], batch_size, group_seed, epoch, bucket):
            batches.append([members[i] for i in b])
    stable_rng("formats", seed, epoch).shuffle(batches)
    return batches


def group_by_format(task, record_groups) -> str:
    """Group the task's examples by their records' data format (format_groups; Task.group_by): the
    trainer then forms every batch from one group and leaves out examples whose group is None.
    Returns a line saying so ("" when the records carry no formats)."""
    if record_groups is None:
        return ""
    task.group_by(record_groups)
    counts = {g: task.groups.count(g) for g in sorted(set(task.groups) - {None})}
    left_out = task.groups.count(None)
    return ("one data format per batch: " + ", ".join(f"{g} {n}" for g, n in counts.items())
            + (f" examples ({left_out} of other formats left out)" if left_out else " examples"))
