"""Where train.py --objective teacher_kl gets the teacher's next-token distributions.

  TeacherFile     offline: the top-k ids and log-probabilities per response token that
                  `infer.py score --top_k K` wrote (a 70B teacher run once, its file reused by many
                  students); `FILE.meta.json` holds the teacher's vocabulary, so no teacher tokenizer
                  or model is needed to train.
  OnlineTeacher   online: another checkpoint of ours, loaded frozen in this job under the same
                  tensor parallelism (no gradients, no KV cache), run on each batch.

Either way the student learns, at each response token, a distribution in its OWN vocabulary: with the
same tokenizer the teacher's (top-k, or with an online teacher optionally the full distribution);
with a different tokenizer the teacher's where the DTW alignment pairs the student token one-to-one
with a teacher token of the same text (mapped into the student vocabulary, tokens it lacks dropped,
renormalised), and one-hot on the student's own token elsewhere (engine/distill/teacher_kl/alignment.py). Top-k mass is
RENORMALISED over the kept tokens (the rest of the vocabulary gets nothing; nothing is spread).
Targets and alignments are computed once per record and cached, never per step.

The authors' targets (Fu et al., FranxYao/FlanT5-CoT-Specialization), by flag:
  --teacher_probs raw    the teacher's own token with its own probability, then its top k, each
                         exp(log-probability), duplicates and tokens the student lacks dropped, NOT
                         renormalised (their Codex dump, scripts/codex_decode_gsm8k.py:141-147, and its
                         transform, notebooks/dev_align_codex_to_flan_t5_dtw.ipynb:1433-1441)
  --eos_target one_hot   the EOS ending the response learns EOS one-hot (src/data_utils.py:324-325)
  --alignment authors    their DTW and copy rule (alignment.authors_alignment)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.distill.teacher_kl.alignment import aligned_positions
from engine.infer.topk_file import FILE_KIND, meta_path
from engine.runtime.distributed import to_device
from engine.runtime.errors import DataError, UserError
from engine.text.prompts import format_prompt
from engine.text.sequences import IGNORE
from engine.text.vocab import Vocab
from models.vocab_parallel import (
    DenseTarget,
    SparseTarget,
    sharded_token_logprobs,
    sharded_topk,
)


def _outputs(rec: dict) -> list:
    return rec["output"] if isinstance(rec["output"], list) else [rec["output"]]


def _one_hot_rows(student_ids: List[int], match: List[int], width: int):
    """One-hot targets [n, width] on the student's own tokens, and the rows matched to a teacher token
    (match[i] >= 0) with their teacher positions: (ids, probs, rows, cols)."""
    ids = np.full((len(student_ids), width), -1, dtype=np.int64)
    probs = np.zeros((len(student_ids), width), dtype=np.float32)
    ids[:, 0], probs[:, 0] = student_ids, 1.0
    rows = np.array([i for i, j in enumerate(match) if j >= 0], dtype=np.int64)
    return ids, probs, rows, np.array([match[i] for i in rows], dtype=np.int64)


def _row_targets(student_ids: List[int], match: List[int], topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                 id_map: np.ndarray, temperature: float) -> Tuple[np.ndarray, np.ndarray]:
    """Sparse targets [n, k] for one response: the teacher's top-k (mapped, renormalised) where the
    student token is matched to teacher token match[i]; one-hot on the student token elsewhere, and
    where none of the teacher's tokens exists in the student vocabulary."""
    ids, probs, rows, cols = _one_hot_rows(student_ids, match, topk_ids.shape[1])
    if rows.size:
        t_ids = topk_ids[cols]
        mapped = np.where((t_ids >= 0) & (t_ids < len(id_map)), id_map[np.clip(t_ids, 0, len(id_map) - 1)], -1)
        p = sparse_probs(torch.from_numpy(topk_logprobs[cols]), torch.from_numpy(mapped >= 0), temperature).numpy()
        ok = p.sum(axis=1) > 0
        ids[rows[ok]] = np.where(mapped[ok] >= 0, mapped[ok], -1)
        probs[rows[ok]] = p[ok]
    return ids, probs


def raw_targets(teacher_ids: torch.Tensor, logprobs: torch.Tensor, id_map: torch.Tensor, own: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' target at rows that copy the teacher (--teacher_probs raw): entries = the
    teacher's own token first, then its top k ([N, 1 + k] teacher ids and log-probabilities), mapped
    into the student vocabulary (id_map; -1: the student lacks it, dropped), a student id seen
    earlier in the row dropped (the first occurrence, the own token's, wins), probability
    exp(log-probability), not renormalised (nb-dtw:1434-1439). Where no entry maps, the row is one-hot
    on `own` (the student's own token) instead. Returns (ids [N, 1 + k], probs [N, 1 + k])."""
    inside = (teacher_ids >= 0) & (teacher_ids < id_map.shape[0])
    mapped = torch.where(inside, id_map[teacher_ids.clamp(0, id_map.shape[0] - 1)], -1)
    width = mapped.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=mapped.device).tril(-1)
    seen = ((mapped[:, :, None] == mapped[:, None, :]) & earlier).any(dim=-1)
    keep = (mapped >= 0) & ~seen
    ids = torch.where(keep, mapped, -1)
    probs = torch.where(keep, logprobs.float().exp(), 0.0)
    empty = ~keep.any(dim=-1)
    if bool(empty.any()):
        ids[empty] = -1
        probs[empty] = 0.0
        ids[empty, 0] = own[empty]
        probs[empty, 0] = 1.0
    return ids, probs


def check_target_flags(teacher_probs: str, eos_target: str, alignment: str, temperature: float) -> None:
    from engine.distill.teacher_kl.alignment import ALIGNMENTS

    if teacher_probs not in TEACHER_PROBS:
        raise UserError(f"--teacher_probs {teacher_probs!r} is not one of {', '.join(TEACHER_PROBS)}")
    if eos_target not in EOS_TARGETS:
        raise UserError(f"--eos_target {eos_target!r} is not one of {', '.join(EOS_TARGETS)}")
    if alignment not in ALIGNMENTS:
        raise UserError(f"--alignment {alignment!r} is not one of {', '.join(ALIGNMENTS)}")
    if teacher_probs == "raw" and temperature != 1:
        raise UserError(f"--teacher_probs raw takes the teacher's probabilities as they are (exp of its "
                        f"log-probabilities, no temperature, as the authors); pass --kl_temperature 1, not "
                        f"{temperature}")


TEACHER_PROBS = ("renormalised", "raw")
EOS_TARGETS = ("teacher", "one_hot")


def _raw_row_targets(student_ids: List[int], match: List[int], tokens: np.ndarray, own_logprobs: np.ndarray,
                     topk_ids: np.ndarray, topk_logprobs: np.ndarray, id_map: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """_row_targets under --teacher_probs raw: [n, 1 + k], raw_targets where the student token is
    matched to teacher token match[i] (the teacher's own token tokens[j] first), one-hot elsewhere."""
    ids, probs, rows, cols = _one_hot_rows(student_ids, match, topk_ids.shape[1] + 1)
    if rows.size:
        t_ids = np.concatenate([tokens[cols][:, None], topk_ids[cols]], axis=1)
        t_lp = np.concatenate([own_logprobs[cols][:, None], topk_logprobs[cols]], axis=1)
        r_ids, r_p = raw_targets(torch.from_numpy(t_ids), torch.from_numpy(t_lp), torch.from_numpy(id_map),
                                 torch.tensor(student_ids, dtype=torch.long)[torch.from_numpy(rows)])
        ids[rows], probs[rows] = r_ids.numpy(), r_p.numpy()
    return ids, probs


def read_meta(path: str) -> dict:
    """FILE.meta.json, every field the reader uses checked (type and range), naming the file and field."""
    where = meta_path(path)
    try:
        with open(where, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{where} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != FILE_KIND:
        raise UserError(f"{where} does not describe a teacher top-k file (write it with `infer.py score --top_k K`)")
    top_k, vocab = meta.get("top_k"), meta.get("vocab")
    if not _is_int(top_k) or top_k < 1:
        raise UserError(f"{where}: 'top_k' must be a whole number >= 1, got {top_k!r}")
    if not isinstance(meta.get("include_eos", True), bool):
        raise UserError(f"{where}: 'include_eos' must be true or false, got {meta['include_eos']!r}")
    limit = meta.get("model_vocab_size")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise UserError(f"{where}: 'model_vocab_size' must be a whole number >= 1, got {limit!r}")
    texts = vocab.get("texts") if isinstance(vocab, dict) else None
    if not isinstance(texts, list) or not texts or not all(t is None or isinstance(t, str) for t in texts):
        raise UserError(f"{where}: 'vocab' must be an object whose 'texts' is a list of the tokens' texts")
    eos = vocab.get("eos_id")
    if eos is not None and (not _is_int(eos) or not 0 <= eos < len(texts)):
        raise UserError(f"{where}: 'vocab.eos_id' must be a token id below {len(texts)}, got {eos!r}")
    fallback = vocab.get("fallback", [])
    if not isinstance(fallback, list) or not all(_is_int(t) for t in fallback):
        raise UserError(f"{where}: 'vocab.fallback' must be a list of token ids")
    return meta


def read_lines(path: str) -> List[dict]:
    """The teacher file's records (blank lines skipped); a line that is not UTF-8 JSON holding an object is
    named."""
    lines = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"--teacher_file {path} line {n + 1} is not UTF-8 text (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"--teacher_file {path} line {n + 1} is not valid JSON ({e.msg})") from None
            if not isinstance(line, dict):
                raise UserError(f"--teacher_file {path} line {n + 1} is not a JSON object but {type(line).__name__}")
            lines.append(line)
    return lines


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_array(value, kind: str, where: str, field: str, limit: int = 0) -> np.ndarray:
    """One field of a teacher record as an array: `ids` whole numbers in [0, limit), `logprobs` finite
    numbers <= 0 (a small positive rounding error allowed); anything else is one sentence."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise UserError(f"{where}: '{field}' is not a rectangular list of numbers") from None
    if array.size == 0:
        return array.astype(np.int64 if kind == "ids" else np.float32)
    if kind == "ids":
        if array.dtype.kind not in "iu":
            raise UserError(f"{where}: '{field}' must hold whole-number token ids, got {array.dtype.name} values")
        if array.min() < 0 or array.max() >= limit:
            bad = int(array.min() if array.min() < 0 else array.max())
            raise UserError(f"{where}: '{field}' holds token id {bad}, outside the teacher's vocabulary [0, {limit})")
        return array.astype(np.int64)
    if array.dtype.kind not in "iuf":
        raise UserError(f"{where}: '{field}' must hold numbers, got {array.dtype.name} values")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise UserError(f"{where}: '{field}' holds a value that is not finite (NaN or infinity)")
    if array.max() > 1e-3:
        raise UserError(f"{where}: '{field}' holds {float(array.max()):g}, but log-probabilities are <= 0")
    return array


@dataclass(frozen=True)
class TargetRule:
    """How the teacher's distributions become the student's targets (teacher_kl's flags):
    --kl_temperature, --teacher_probs, --eos_target, --alignment."""

    temperature: float = 1.0
    teacher_probs: str = "renormalised"
    eos_target: str = "teacher"
    alignment: str = "ours"


class TeacherFile:
    """The offline teacher: a JSON-lines file from `infer.py score --top_k K` over the SAME training
    file (record for record, output for output), and its FILE.meta.json. Checked whole at start:
    record count, outputs per record, token count (and ids, same tokenizer) or text (different
    tokenizer) of every output, and that it holds at least --teacher_top_k tokens per position."""

    online = False
    dense = False

    def __init__(self, path: str, data, student_vocab: Vocab, top_k: int, rule: TargetRule,
                 same_tokenizer: Optional[bool], train_file: str):
        self.path, self.data, self.top_k, self.temperature = path, data, top_k, rule.temperature
        self.raw, self.eos_one_hot = rule.teacher_probs == "raw", rule.eos_target == "one_hot"
        self.alignment = rule.alignment
        if not os.path.isfile(path):
            raise UserError(f"--teacher_file {path} does not exist")
        if not os.path.isfile(meta_path(path)):
            raise UserError(f"--teacher_file {path} has no {os.path.basename(meta_path(path))} beside it; write the "
                            f"file with `infer.py score --top_k K`")
        meta = read_meta(path)
        if meta["top_k"] < top_k:
            raise UserError(f"--teacher_file {path} holds the teacher's top {meta['top_k']} tokens per position but "
                            f"--teacher_top_k asks for {top_k}; pass --teacher_top_k {meta['top_k']} or rewrite the "
                            f"file with `infer.py score --top_k {top_k}`")
        if not meta.get("include_eos", True):
            raise UserError(f"--teacher_file {path} was scored with --include_eos False, but the student also learns "
                            f"the EOS ending each output; rewrite it with --include_eos True")
        self.vocab = Vocab.from_dict(meta["vocab"])
        self.id_limit = max(meta.get("model_vocab_size") or 0, len(self.vocab))
        difference = self.vocab.first_difference(student_vocab)
        if same_tokenizer and difference:
            raise UserError(f"--same_tokenizer True, but the vocabulary of --teacher_file {path} (tokenizer "
                            f"{meta.get('tokenizer_file')}) differs from the student's: {difference}")
        self.same = difference is None if same_tokenizer is None else bool(same_tokenizer)
        self.student_vocab = student_vocab
        if self.same:
            self.id_map = np.where(np.arange(len(self.vocab)) < len(student_vocab), np.arange(len(self.vocab)), -1)
        else:
            self.id_map = self.vocab.map_to(student_vocab)
        self.items = self._read(train_file)
        self._cache: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}
        self._matches: Dict[Tuple[int, int], List[int]] = {}

    def _read(self, train_file: str) -> List[List[tuple]]:
        records, path = self.data.records, self.path
        lines = read_lines(path)
        if len(lines) != len(records):
            raise UserError(f"--teacher_file {path} holds {len(lines)} records but --train_file {train_file} has "
                            f"{len(records)}; score this training file with `infer.py score --top_k K`")
        items = []
        for i, (line, rec) in enumerate(zip(lines, records)):
            items.append(self._read_record(i, line, rec, train_file))
        return items

    def _read_record(self, i: int, line: dict, rec: dict, train_file: str) -> List[tuple]:
        path, k = self.path, self.top_k
        fields = ("tokens", "topk_ids", "topk_logprobs")
        if not all(key in line for key in fields):
            raise UserError(f"--teacher_file {path} record {i} has no tokens/topk_ids/topk_logprobs; write it with "
                            f"`infer.py score --top_k K`")
        if self.raw and "token_logprobs" not in line:
            raise UserError(f"--teacher_probs raw adds the teacher's own token with its own probability, but "
                            f"--teacher_file {path} record {i} has no token_logprobs; rewrite the file with "
                            f"`infer.py score --top_k K`")
        fields += ("token_logprobs",) if self.raw else ()
        outs, many = _outputs(rec), isinstance(rec["output"], list)
        file_many = isinstance(line["tokens"], list) and bool(line["tokens"]) and isinstance(line["tokens"][0], list)
        scored = len(line["tokens"]) if file_many else 1
        if file_many != many or scored != len(outs):
            raise UserError(f"--teacher_file {path} record {i} scores {scored} output(s) but --train_file "
                            f"{train_file} record {i} has {len(outs)}")
        per_output = [line[key] if many else [line[key]] for key in fields]
        if any(not isinstance(values, list) or len(values) != len(outs) for values in per_output):
            raise UserError(f"--teacher_file {path} record {i}: {', '.join(fields)} must each hold one list per "
                            f"output ({len(outs)})")
        row = []
        for j, (text, *values) in enumerate(zip(outs, *per_output)):
            where = f"--teacher_file {path} record {i} output {j}"
            t = checked_array(values[0], "ids", where, "tokens", self.id_limit)
            tid = checked_array(values[1], "ids", where, "topk_ids", self.id_limit)
            tlp = checked_array(values[2], "logprobs", where, "topk_logprobs")
            if tid.ndim != 2 or tid.shape != tlp.shape or tid.shape[0] != len(t) or tid.shape[1] < k:
                raise UserError(f"{where}: topk_ids/topk_logprobs must be [{len(t)} tokens x >= {k}], got "
                                f"{list(tid.shape)} / {list(tlp.shape)}")
            olp = checked_array(values[3], "logprobs", where, "token_logprobs") if self.raw else None
            if olp is not None and olp.shape != (len(t),):
                raise UserError(f"{where}: token_logprobs must hold {len(t)} numbers, got shape {list(olp.shape)}")
            self._check_tokens(i, j, t, text, train_file)
            row.append((t, tid[:, :k], tlp[:, :k], olp))
        return row

    def _check_tokens(self, i: int, j: int, tokens: np.ndarray, text: str, train_file: str) -> None:
        where = f"--teacher_file {self.path} record {i}" + (f" output {j}" if j else "")
        if self.same:
            student = self.data.response(i, j)
            if len(student) != len(tokens) or list(tokens) != student:
                raise UserError(f"{where} holds {len(tokens)} tokens but the student tokenizes --train_file "
                                f"{train_file}'s output into {len(student)} (a different text, or a cut by "
                                f"max_seq_len when scoring)" if len(student) != len(tokens) else
                                f"{where}: its tokens differ from the student's tokens of --train_file {train_file}'s "
                                f"output (another text with as many tokens)")
            return
        spelt = self.vocab.spell([int(t) for t in tokens if t != self.vocab.eos_id])
        if any(s is None for s in spelt):
            return  # unknown tokens hide their text: nothing to compare
        if "".join("".join(spelt).split()) != "".join(text.split()):
            raise UserError(f"{where} spells {''.join(spelt)[:60]!r}..., not --train_file {train_file}'s output "
                            f"{text[:60]!r}...; score this training file with `infer.py score --top_k K`")

    def coverage(self, n: int = 50) -> float:
        """Fraction of the response tokens of the first n records aligned to a teacher token (the rest
        learn their own token); those records' targets stay cached."""
        for i in self.data.keep[:n]:
            self.host_targets(i, 0)
        matches = [self._matches[(i, 0)] for i in self.data.keep[:n]]
        return sum(j >= 0 for m in matches for j in m) / max(1, sum(len(m) for m in matches))

    def host_targets(self, index: int, which: int) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, probs) [response tokens, k] of one output, computed once."""
        key = (index, which)
        if key not in self._cache:
            tokens, tid, tlp, own_lp = self.items[index][which]
            student = self.data.response(index, which)
            if self.same:
                match = list(range(len(student)))
            else:
                match = aligned_positions(student, [int(t) for t in tokens], self.student_vocab, self.vocab,
                                          rule=self.alignment)
            if self.eos_one_hot:  # the EOS learns EOS, never the teacher's distribution there
                eos = self.data.tok.eos_id
                match = [-1 if sid == eos else j for sid, j in zip(student, match)]
            if self.raw:
                self._cache[key] = _raw_row_targets(student, match, tokens, own_lp, tid, tlp, self.id_map)
            else:
                self._cache[key] = _row_targets(student, match, tid, tlp, self.id_map, self.temperature)
            self._matches[key] = match
        return self._cache[key]

    def batch_extra(self, items, lengths, device) -> dict:
        parts = [self.host_targets(i, w) for i, w in items]
        ids = np.concatenate([p[0][:n] for p, n in zip(parts, lengths)])
        probs = np.concatenate([p[1][:n] for p, n in zip(parts, lengths)])
        return {"target": SparseTarget(to_device(torch.from_numpy(ids), device), to_device(torch.from_numpy(probs), device))}

    def target(self, batch) -> SparseTarget:
        return batch.extra["target"]


class OnlineTeacher:
    """A frozen checkpoint run in this job (same tensor parallelism, no gradients, eval mode, in the
    run's compute precision). Same tokenizer: it reads the student's batch, and gives its full
    distribution (top_k 0, shard by shard) or its top k. Different tokenizer: it reads its own
    tokenisation of the same prompt and output, and its top k at the aligned positions is mapped
    into the student's vocabulary."""

    online = True

    def __init__(self, ckpt_dir: str, data, student_tok, student_model_vocab: int, top_k: Optional[int],
                 rule: TargetRule, same_tokenizer: Optional[bool], template: str, dtype, device):
        from engine.train.teacher import FrozenTeacher

        frozen = FrozenTeacher(ckpt_dir, dtype, device)  # loaded frozen, the student's tensor parallelism
        self.model, self.tok = frozen.model, frozen.tok
        self.data, self.template, self.temperature, self.device = data, template, rule.temperature, device
        self.raw, self.eos_one_hot = rule.teacher_probs == "raw", rule.eos_target == "one_hot"
        self.alignment = rule.alignment
        self.eos_id = student_tok.eos_id
        self.student_vocab, self.vocab = Vocab.of(student_tok), frozen.vocab
        difference = self.vocab.first_difference(self.student_vocab)
        if same_tokenizer and difference:
            raise UserError(f"--same_tokenizer True, but the tokenizer of --teacher_ckpt_dir {ckpt_dir} differs from "
                            f"the student's: {difference}")
        self.same = difference is None if same_tokenizer is None else bool(same_tokenizer)
        self.top_k = (0 if self.same else 5) if top_k is None else top_k
        if self.top_k == 0:
            if not self.same:
                raise UserError(f"--teacher_top_k 0 (the full distribution) needs a teacher with the student's "
                                f"tokenizer; --teacher_ckpt_dir {ckpt_dir} has another, so pass --teacher_top_k K")
            if self.model.args.vocab_size != student_model_vocab:
                raise UserError(f"--teacher_top_k 0 compares full distributions shard by shard, but the model in "
                                f"--teacher_ckpt_dir {ckpt_dir} has a vocabulary of {self.model.args.vocab_size} and "
                                f"the student {student_model_vocab}; pass --teacher_top_k K")
        elif self.top_k > self.model.args.vocab_size:
            raise UserError(f"--teacher_top_k {self.top_k} exceeds the vocabulary of --teacher_ckpt_dir {ckpt_dir} "
                            f"({self.model.args.vocab_size})")
        self.dense = self.top_k == 0
        vocab_ids = np.arange(self.model.args.vocab_size)
        id_map = np.where(vocab_ids < len(self.student_vocab), vocab_ids, -1) if self.same else \
            np.concatenate([self.vocab.map_to(self.student_vocab),
                            np.full(max(0, self.model.args.vocab_size - len(self.vocab)), -1)])
        self.id_map = torch.from_numpy(id_map).to(device)
        self.max_len = min(data.max_seq_len, self.model.args.max_seq_len)
        self._plans: Dict[Tuple[int, int], tuple] = {}

    def _plan(self, index: int, which: int):
        """(teacher input ids, teacher prompt length, teacher index per student response token or -1,
        the teacher's response tokens), computed once per output: the teacher's own tokens of the same
        prompt and output, cut like the student's, and the DTW alignment of the two responses."""
        key = (index, which)
        if key not in self._plans:
            rec = self.data.records[index]
            prompt = self.tok.encode(format_prompt(rec["instruction"], self.template), bos=True)
            resp = self.tok.encode(_outputs(rec)[which], bos=False, eos=True)
            seq = (prompt + resp)[: self.max_len + 1]
            match = aligned_positions(self.data.response(index, which), resp, self.student_vocab, self.vocab,
                                      rule=self.alignment)
            room = len(seq) - len(prompt)  # teacher response tokens that survive the cut
            self._plans[key] = (seq[:-1], len(prompt), [j if j < room else -1 for j in match], resp)
        return self._plans[key]

    def coverage(self, n: int = 50) -> float:
        """Fraction of the response tokens of the first n records aligned to a teacher token (the rest
        learn their own token); the teacher's tokens missing from the student vocabulary aside."""
        plans = [self._plan(i, 0)[2] for i in self.data.keep[:n]]
        return sum(j >= 0 for m in plans for j in m) / max(1, sum(len(m) for m in plans))

    def batch_extra(self, items, lengths, device) -> dict:
        if self.same:
            return {}
        plans = [self._plan(i, w) for i, w in items]
        width = max(len(p[0]) for p in plans)
        inputs = torch.full((len(plans), width), self.tok.padding_id, dtype=torch.long)
        rows, aligned, own, n = [], [], [], 0
        for b, ((ids, prompt_len, match, resp), count) in enumerate(zip(plans, lengths)):
            inputs[b, :len(ids)] = torch.tensor(ids)
            for i, j in enumerate(match[:count]):
                if j >= 0:
                    aligned.append(n + i)
                    rows.append(b * width + prompt_len - 1 + j)
                    own.append(resp[j])
            n += count
        return {"teacher_inputs": to_device(inputs, device),
                "teacher_rows": to_device(torch.tensor(rows, dtype=torch.long), device),
                "aligned": to_device(torch.tensor(aligned, dtype=torch.long), device),
                "teacher_own": to_device(torch.tensor(own, dtype=torch.long), device)}

    @torch.no_grad()
    def target(self, batch):
        extra = batch.extra
        inputs = extra.get("teacher_inputs", batch.inputs)
        hidden = self.model.forward_hidden(inputs)
        rows = extra.get("teacher_rows", batch.label_rows)
        t_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        head = self.model.head_weight
        own = extra["own"]
        eos = own == self.eos_id if self.eos_one_hot else None
        if self.dense:
            return DenseTarget(t_rows, head, torch.where(eos, own, -1) if eos is not None else None)
        width = self.top_k + (1 if self.raw else 0)
        ids = torch.full((own.shape[0], width), -1, dtype=torch.long, device=own.device)
        probs = torch.zeros((own.shape[0], width), dtype=torch.float32, device=own.device)
        ids[:, 0], probs[:, 0] = own, 1.0  # one-hot on the student's own token unless the teacher says more
        if t_rows.shape[0] == 0:
            return SparseTarget(ids, probs)
        aligned = extra.get("aligned")
        if aligned is None:
            aligned = torch.arange(own.shape[0], device=own.device)
        chunk = max(64, (1 << 26) // head.shape[0])
        t_own = extra.get("teacher_own", own)  # the teacher's own next token at each of its rows
        parts = []
        for s in range(0, t_rows.shape[0], chunk):
            logits = F.linear(t_rows[s:s + chunk].to(head.dtype), head)
            top = sharded_topk(logits, self.top_k)
            parts.append((*top, sharded_token_logprobs(logits, t_own[s:s + chunk]) if self.raw else None))
        t_ids, t_logp, t_own_lp = zip(*parts)
        if self.raw:
            r_ids, r_p = raw_targets(torch.cat([t_own[:, None], torch.cat(t_ids)], dim=1),
                                     torch.cat([torch.cat(t_own_lp)[:, None], torch.cat(t_logp)], dim=1),
                                     self.id_map, own[aligned])
            ids[aligned], probs[aligned] = r_ids, r_p
        else:
            mapped = self.id_map[torch.cat(t_ids)]
            p = sparse_probs(torch.cat(t_logp), mapped >= 0, self.temperature)
            ok = (p.sum(dim=-1) > 0)[:, None]
            ids[aligned] = torch.where(ok, torch.where(mapped >= 0, mapped, -1), ids[aligned])
            probs[aligned] = torch.where(ok, p, probs[aligned])
        if eos is not None:  # the EOS learns EOS one-hot
            ids[eos] = -1
            probs[eos] = 0.0
            ids[eos, 0], probs[eos, 0] = own[eos], 1.0
        return SparseTarget(ids, probs)


def kl_rows(labels: torch.Tensor) -> Tuple[List[int], List[int], List[int]]:
    """(flat row index, label, count per sequence) of every labelled position of a [B, T] batch, in
    order: sequence by sequence, response token by response token."""
    flat, own, counts = [], [], []
    width = labels.shape[1]
    for b, row in enumerate(labels.tolist()):
        pos = [t for t, y in enumerate(row) if y != IGNORE]
        flat += [b * width + t for t in pos]
        own += [row[t] for t in pos]
        counts.append(len(pos))
    return flat, own, counts


def check_teacher_flags(teacher_ckpt_dir, teacher_file, top_k, kl_weight, temperature) -> None:
    """The teacher flags' own checks, before anything loads."""
    if bool(teacher_ckpt_dir) == bool(teacher_file):
        raise UserError("--objective teacher_kl needs exactly one teacher: --teacher_ckpt_dir (online) or "
                        "--teacher_file (offline, from `infer.py score --top_k K`)")
    if not 0 <= kl_weight <= 1:
        raise UserError(f"--kl_weight must be in [0, 1], got {kl_weight}")
    if not temperature > 0:
        raise UserError(f"--kl_temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise UserError(f"--teacher_top_k must be >= 0, got {top_k}")
    if teacher_file and top_k == 0:
        raise UserError(f"--teacher_top_k 0 (the full distribution) needs an online teacher; --teacher_file "
                        f"{teacher_file} holds only the teacher's top k")
    if teacher_file and not os.path.isfile(teacher_file):
        raise DataError(f"--teacher_file {teacher_file} does not exist")
    if teacher_ckpt_dir and not os.path.exists(teacher_ckpt_dir):
        raise UserError(f"--teacher_ckpt_dir {teacher_ckpt_dir} does not exist")


def check_kl_formats(kl_formats: List[str], records: List[dict], formats, path: str) -> None:
    """--kl_formats needs records that carry their format, and names formats this run trains on."""
    from engine.train.batching import parse_formats

    where = next((i for i, r in enumerate(records) if "format" not in r), None)
    if where is not None:
        raise UserError(f"--kl_formats {','.join(kl_formats)} picks the loss by each batch's data format, but "
                        f"--train_file {path} record {where} has no 'format' (write the file with data/make_formats.py)")
    trained = set(parse_formats(formats) or {r["format"] for r in records})
    if not trained & set(kl_formats):
        raise UserError(f"--kl_formats {','.join(kl_formats)} names no format this run trains on "
                        f"({', '.join(sorted(trained))}); the KL would never be used")


def sparse_probs(logprobs: torch.Tensor, keep: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's top-k renormalised: softmax(logprob / T) over the entries `keep`s (0 elsewhere).
    The mass outside the kept entries (the rest of the vocabulary, tokens the student lacks) is
    dropped, not spread: what the teacher file does not hold is not guessed. A row keeping nothing
    is all zeros."""
    z = torch.where(keep, logprobs.float() / temperature, float("-inf"))
    z = z - z.max(dim=-1, keepdim=True).values.clamp(min=-1e30)
    p = torch.where(keep, z.exp(), 0.0)
    return p / p.sum(dim=-1, keepdim=True).clamp(min=1e-30)
