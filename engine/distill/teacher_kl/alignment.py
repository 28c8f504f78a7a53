"""Teacher and student with different tokenizers: what each token id spells, the alignment of two
tokenisations of the same text, and the teacher's distributions carried into the student's vocabulary.

  Vocab.of(tokenizer)        the text each id stands for (None: a special or unknown token)
  dtw_align(a, b)            dynamic time warping of two token-text sequences on per-token edit distance
  one_to_one(a, b, path)     for each token of a: the token of b it alone matches with the same text, or -1
  aligned_positions(...)     the same for a student and a teacher response (EOS paired with EOS)
  authors_alignment(s, t)    the rule of Fu et al.'s code instead (--alignment authors): whitespace-blind
                             cost, the full matrix, their tie order, a one-sided copy rule
  Vocab.map_to(student)      teacher id -> the student id with the same text (-1: the student lacks it)

A student position whose token is matched one-to-one with a teacher token of the same text learns the
teacher's distribution there, mapped into its own vocabulary (absent tokens dropped, the rest
renormalised: engine/distill/teacher_kl/teachers.py); every other position learns its own token (one-hot on the teacher's
text, as the student tokenizes it). Alignments are computed once per record and cached by the caller.
"""
from __future__ import annotations

import bisect
import functools
from typing import List, Optional, Sequence, Tuple

import numpy as np

from engine.text.vocab import Vocab


@functools.lru_cache(maxsize=1 << 16)
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _band(a: Sequence[str], b: Sequence[str], slack: int) -> List[Tuple[int, int]]:
    """For each token of a, the range [lo, hi] of tokens of b whose character span (in the text both
    spell) overlaps its own, widened by `slack` characters: the only cells DTW needs to look at when
    both sequences spell the same text. Without the band, DTW may pair a token with a piece of its
    neighbour whenever that costs no more edits (" is" with "wer" of " ans|wer")."""
    ends_a = np.cumsum([len(t) for t in a]).tolist()
    ends_b = np.cumsum([len(t) for t in b]).tolist()
    starts_b = [0] + ends_b[:-1]
    rows, prev_lo = [], 0
    for i, end in enumerate(ends_a):
        start = end - len(a[i])
        lo = bisect.bisect_right(ends_b, start - slack)  # first b ending after start - slack
        hi = bisect.bisect_left(starts_b, end + slack) - 1  # last b starting before end + slack
        lo = max(min(lo, len(b) - 1), prev_lo)
        rows.append((lo, max(lo, min(hi, len(b) - 1))))
        prev_lo = lo
    rows[0] = (0, rows[0][1])
    rows[-1] = (rows[-1][0], len(b) - 1)
    return rows


def dtw_align(a: Sequence[Optional[str]], b: Sequence[Optional[str]], slack: Optional[int] = None
              ) -> List[Tuple[int, int]]:
    """The dynamic-time-warping path between two token-text sequences: pairs (i, j), monotone in both,
    from (0, 0) to (len(a) - 1, len(b) - 1), every token of each side in at least one pair, minimising
    the summed edit distance of paired texts. A token of one side paired with several of the other is
    a merge/split. Unknown tokens (None) spell "" and so pair with their neighbours.

    slack: look only at pairs whose character spans overlap, give or take `slack` characters plus
    the two texts' difference in length plus 4 per unknown token (it may hide a few characters);
    None compares every pair. A band that leaves no path falls back to every pair."""
    a = [t or "" for t in a]
    b = [t or "" for t in b]
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    if slack is not None:
        drift = abs(sum(map(len, a)) - sum(map(len, b))) + 4 * (a.count("") + b.count(""))
        rows = _band(a, b, slack + drift)
    else:
        rows = [(0, m - 1)] * n
    inf = float("inf")
    cost = [dict() for _ in range(n)]  # cost[i][j]: best path cost ending at (i, j)
    for i, (lo, hi) in enumerate(rows):
        row, up = cost[i], cost[i - 1] if i else None
        for j in range(lo, hi + 1):
            d = edit_distance(a[i], b[j])
            if i == 0 and j == 0:
                row[j] = d
                continue
            best = min(up.get(j - 1, inf) if up is not None else inf, up.get(j, inf) if up is not None else inf,
                       row.get(j - 1, inf))
            if best < inf:
                row[j] = best + d
    if (m - 1) not in cost[n - 1]:
        return dtw_align(a, b, None)
    path, i, j = [(n - 1, m - 1)], n - 1, m - 1
    while i or j:
        moves = []  # ties prefer the diagonal, so equal texts pair one to one
        if i and j:
            moves.append((cost[i - 1].get(j - 1, inf), i - 1, j - 1))
        if i:
            moves.append((cost[i - 1].get(j, inf), i - 1, j))
        if j:
            moves.append((cost[i].get(j - 1, inf), i, j - 1))
        _, i, j = min(moves, key=lambda t: t[0])
        path.append((i, j))
    return path[::-1]


def one_to_one(a: Sequence[Optional[str]], b: Sequence[Optional[str]], path: Sequence[Tuple[int, int]]
               ) -> List[int]:
    """For each token of a: the token of b it is paired with when the pair is one-to-one on the path
    (neither token paired with any other) and both spell the same, non-empty text; else -1."""
    count_a, count_b = [0] * len(a), [0] * len(b)
    for i, j in path:
        count_a[i] += 1
        count_b[j] += 1
    match = [-1] * len(a)
    for i, j in path:
        if count_a[i] == 1 and count_b[j] == 1 and a[i] and a[i] == b[j]:
            match[i] = j
    return match


def authors_alignment(student: Sequence[Optional[str]], teacher: Sequence[Optional[str]]) -> List[int]:
    """Fu et al.'s alignment (FranxYao/FlanT5-CoT-Specialization @a8ffd51), on decoded token texts:
    for each student token, the teacher token whose distribution it copies, or -1.

      cost   edit distance of the two texts with the spaces removed: their dist_fn strips ' ' from
             the teacher (Codex) token and '▁' from the student (sentencepiece) piece
             (notebooks/dev_align_codex_to_flan_t5_dtw.ipynb:504-508); decoded, both are ' '.
             Newlines and every other character count.
      DTW    the full matrix with an infinite border (src/utils.py:649-662), the teacher as the first
             series (nb:1424), backtracked from the end taking the first minimum of (diagonal,
             teacher step, student step) (utils.py:668-682): ties go diagonal, then teacher, then student.
      copy   a student token matched with exactly one teacher token of the same text copies it
             (nb:1427-1433); whether that teacher token is also matched with other student tokens is
             not checked. Unknown texts (None) never copy.
    Ours (one_to_one over dtw_align) keeps whitespace, bands the matrix, breaks ties diagonal, student,
    teacher, and requires the pair to be one-to-one on both sides."""
    n, m = len(teacher), len(student)
    if n == 0 or m == 0:
        return [-1] * m
    t = [(x or "").replace(" ", "") for x in teacher]
    s = [(x or "").replace(" ", "") for x in student]
    inf = float("inf")
    cost = np.full((n + 1, m + 1), inf)
    cost[0, 0] = 0.0
    for i in range(n):
        up, row = cost[i], cost[i + 1]
        for j in range(m):
            row[j + 1] = edit_distance(t[i], s[j]) + min(up[j + 1], row[j], up[j])
    cost = cost[1:, 1:]
    i, j = n - 1, m - 1
    mapped: List[List[int]] = [[] for _ in range(m)]  # teacher indices matched with each student token
    while i > 0 or j > 0:
        mapped[j].append(i)
        options = (cost[i - 1, j - 1] if i > 0 and j > 0 else inf, cost[i - 1, j] if i > 0 else inf,
                   cost[i, j - 1] if j > 0 else inf)
        move = min(range(3), key=lambda k: options[k])  # the first minimum, as np.argmin
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    mapped[0].append(0)
    return [ts[0] if len(ts) == 1 and student[k] is not None and student[k] == teacher[ts[0]] else -1
            for k, ts in enumerate(mapped)]


ALIGNMENTS = ("ours", "authors")


def aligned_positions(student_ids: Sequence[int], teacher_ids: Sequence[int], student: Vocab, teacher: Vocab,
                      slack: int = 0, rule: str = "ours") -> List[int]:
    """For each student response token: the index of the teacher response token whose predicted
    distribution it learns (a same-text match of the DTW alignment: one-to-one both ways under our
    rule, one-sided under the authors' (authors_alignment); a final EOS pairs with the teacher's
    final EOS), or -1 where it learns its own token."""
    s_eos = bool(student_ids) and student_ids[-1] == student.eos_id
    t_eos = bool(teacher_ids) and teacher_ids[-1] == teacher.eos_id
    s_body = student_ids[:-1] if s_eos else student_ids
    t_body = teacher_ids[:-1] if t_eos else teacher_ids
    a, b = student.spell(s_body), teacher.spell(t_body)
    if rule == "authors":
        match = authors_alignment(a, b)
    else:
        match = one_to_one(a, b, dtw_align(a, b, slack))
    if s_eos:
        match.append(len(t_body) if t_eos else -1)
    return match
