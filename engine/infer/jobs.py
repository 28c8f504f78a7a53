"""The jobs behind infer.py: generating a response file (resumable, one JSON line per record) and
scoring outputs by log-likelihood. A job is its checked flags (engine/infer/args.py) and what they
resolve to once the files are read (`GenerationJob.of`, `ScoringJob.of`); these do the work."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch

from engine.checkpoint import adapter_and_base, load_for_inference
from engine.infer.args import GenerationFlags, ScoreArgs
from engine.infer.generation import Request, SamplingParams, StopStrings, generate_stream, request_seed
from engine.infer.metrics import Accuracy, SampleAccuracy, vote_fields
from engine.infer.prompting import check_room, encode_prompt, prompt_room
from engine.infer.topk_file import meta_path as teacher_meta_path, teacher_meta
from engine.runtime.cli import on_interrupt
from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_open, atomic_write_text, disk_errors, file_sha256
from engine.runtime.jobs import job as runtime_job
from engine.runtime.outputs import Output, args_inputs
from engine.runtime.progress import Progress
from engine.runtime.signature import first_difference, input_identities
from engine.text.answers import choices_in, extract_answer, is_correct, label_warning, parse_label, unreadable_labels
from engine.text.prompts import (
    few_shot_prompt,
    read_prompt_file,
    resolve_task_prefix,
    resolve_template,
    task_instruction,
)
from engine.text.records import read_records, validate_training_records
from engine.text.sequences import IGNORE, pad_batch
from models.vocab_parallel import sharded_token_logprobs, sharded_topk, token_cross_entropy

# Every setting that changes what an output line holds: a resumed file must have been written with the same.
SETTINGS = (
    "ckpt_dir",
    "lora_dir",
    "template",
    "task",
    "scoring",
    "dtype",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "top_p_bound",
    "num_samples",
    "seed",
    "stop",
    "long_prompts",
    "output_tokens",
    "task_prefix",
    "prompt_sha256",
)
# what a setting read from a .meta.json written before it existed was (such files resume as before)
SETTINGS_BEFORE = {"scoring": "ours", "top_p_bound": 0}


def model_inputs(flags) -> List[tuple]:
    """(flag, path) of everything an infer.py command reads: its file and directory flags, and the base
    checkpoint an adapter names."""
    inputs = args_inputs(flags)
    base, adapter = adapter_and_base(flags.ckpt_dir, flags.lora_dir)
    if adapter and base != flags.ckpt_dir:
        inputs.append(("--ckpt_dir (the adapter's base)", base))
    return inputs


def owned_outputs(flags, outputs: List[Output], continues=None) -> dict:
    """The keyword arguments of engine/runtime/jobs.job that guard a command's outputs."""
    return dict(outputs=outputs, inputs=model_inputs(flags), overwrite=flags.overwrite, continues=continues)


def _resumable(path: str) -> bool:
    return os.path.exists(path + ".meta.json")  # written by infer.py: resumed, not replaced


@dataclass(kw_only=True)
class Job:
    """The checked flags of a job on a model and its records, with the prompt settings they resolve to."""

    flags: object  # ModelSource + the command's own flags (engine/infer/args.py)
    records: List[dict]
    template: str  # --template, else the one recorded with the model
    task_prefix: Optional[str] = None  # a step-by-step model's task (label / rationale), None for others
    task_prefixes: Optional[dict] = None  # {task: instruction prefix} the model was trained with
    demos: Optional[str] = None  # few-shot demonstrations (--prompt_file) put before each question

    def instruction(self, rec: dict) -> str:
        text = task_instruction(rec["instruction"], self.task_prefix, self.task_prefixes)
        return few_shot_prompt(self.demos, text) if self.demos else text


@dataclass(kw_only=True)
class GenerationJob(Job):
    flags: GenerationFlags  # GenerateArgs, or CalibrationArgs (its fixed settings included)

    @classmethod
    def of(cls, flags: GenerationFlags) -> "GenerationJob":
        check_room(flags.max_new_tokens, flags.ckpt_dir, flags.lora_dir)
        task_prefix, task_prefixes = resolve_task_prefix(flags.task_prefix, flags.ckpt_dir, flags.lora_dir)
        demos = read_prompt_file(flags.prompt_file) if getattr(flags, "prompt_file", None) else None
        template = "none" if demos and flags.template is None else resolve_template(flags.template, flags.ckpt_dir,
                                                                                    flags.lora_dir)
        return cls(flags=flags, records=read_records(flags.data_file), template=template, task_prefix=task_prefix,
                   task_prefixes=task_prefixes, demos=demos)

    @property
    def params(self) -> SamplingParams:
        f = self.flags
        return SamplingParams(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p, top_k=f.top_k,
                              top_p_bound=f.top_p_bound, seed=f.seed)

    def meta(self) -> dict:
        f = self.flags
        return {
            "data_file": os.path.abspath(f.data_file),
            "data_sha256": file_sha256(f.data_file),
            "ckpt_dir": f.ckpt_dir,
            "lora_dir": f.lora_dir,
            "template": self.template,
            "task": f.task,
            "scoring": f.scoring,
            "dtype": str(f.dtype).replace("torch.", ""),
            "max_new_tokens": f.max_new_tokens,
            "temperature": f.temperature,
            "top_p": f.top_p,
            "top_k": f.top_k,
            "top_p_bound": f.top_p_bound,
            "num_samples": f.num_samples,
            "seed": f.seed,
            "stop": list(f.stops),
            "long_prompts": f.long_prompts,
            "output_tokens": f.output_tokens,
            "task_prefix": self.task_prefix,
            "prompt_file": getattr(f, "prompt_file", None),
            "prompt_sha256": file_sha256(f.prompt_file) if getattr(f, "prompt_file", None) else None,
            **self.weights(),
        }

    def weights(self) -> dict:
        """The identity of the weights the lines come from (checkpoint, adapter, the adapter's base):
        a resumed file must come from the same weights, wherever they now lie."""
        models = [(k, p) for k, p in model_inputs(self.flags) if not k.startswith("--data_file")]
        return {"weights": input_identities(models), "weight_paths": {k: os.path.abspath(p) for k, p in models}}


@dataclass(kw_only=True)
class ScoringJob(Job):
    flags: ScoreArgs

    @classmethod
    def of(cls, flags: ScoreArgs) -> "ScoringJob":
        records = read_records(flags.data_file)
        validate_training_records(records, flags.data_file)
        task_prefix, task_prefixes = resolve_task_prefix(flags.task_prefix, flags.ckpt_dir, flags.lora_dir)
        return cls(flags=flags, records=records, template=resolve_template(flags.template, flags.ckpt_dir,
                                                                           flags.lora_dir),
                   task_prefix=task_prefix, task_prefixes=task_prefixes)


def _read_lines(path: str) -> Dict[int, dict]:
    """index -> line of a JSON-lines output (possibly interrupted); a torn last line is cut off."""
    done, good_bytes = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                done[rec["index"]] = rec
                good_bytes += len(raw)
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    if good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


PART_SUFFIX = r"\.part[1-9][0-9]*"  # replica r > 0 writes OUTPUT.part{r} (OutputFile.part_path)


class OutputFile:
    """The JSON-lines output of a generation job and its `.meta.json`: lines are appended as records
    finish (so a killed job loses nothing finished), a rerun with the same settings resumes, and the
    finished file is rewritten in input order.

    With data-parallel replicas (`--tp_size` below the world size) replica 0 appends to the file itself
    and replica r > 0 to `OUTPUT.part{r}` beside it; reading the finished lines (resume) takes the
    union of all of them, whatever the replica count of the run that wrote them, and `finish` merges
    them into the one file and removes the parts."""

    def __init__(self, path: str, meta: dict, overwrite: bool = False):
        self.path, self.meta, self.meta_path = path, meta, path + ".meta.json"
        self.resuming = os.path.exists(path) and not overwrite  # decided while this job owns the file
        self._f = None

    def part_path(self, replica: int) -> str:
        return self.path if replica == 0 else f"{self.path}.part{replica}"

    def parts(self) -> List[str]:
        """The replicas' part files now beside the output (any run's)."""
        folder, base = os.path.split(os.path.abspath(self.path))
        pattern = re.compile(re.escape(base) + PART_SUFFIX)
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if pattern.fullmatch(n))

    def check_resume(self) -> None:
        if not self.resuming:
            return
        if not os.path.exists(self.meta_path):
            raise UserError(f"--output_file {self.path} exists but was not written by infer.py "
                            f"(no {os.path.basename(self.meta_path)}); choose another output file")
        old = json.load(open(self.meta_path))
        if old.get("data_sha256") != self.meta["data_sha256"]:
            raise UserError(f"--output_file {self.path} was written for a different data file "
                            f"({old.get('data_file')}); choose another output file to start afresh")
        for key in SETTINGS:
            was = old.get(key, SETTINGS_BEFORE.get(key))
            if was != self.meta.get(key):
                flag = "the precision (--use_float16 / --use_bfloat16)" if key == "dtype" else f"--{key}"
                raise UserError(
                    f"--output_file {self.path} was written with {flag} {was!r}, not "
                    f"{self.meta.get(key)!r}; rerun with the same flags to resume it, or choose another "
                    f"output file"
                )
        changed = first_difference(old.get("weights", self.meta["weights"]), self.meta["weights"], self.meta["weights"])
        if changed:
            raise UserError(
                f"--output_file {self.path} was written by other weights: {changed} "
                f"{self.meta['weight_paths'].get(changed, '')} has changed since; choose another output file, "
                f"or pass --overwrite True to start afresh"
            )

    def read_done(self) -> Dict[int, dict]:
        """index -> line of every finished record, in the output and its replicas' parts."""
        done = _read_lines(self.path)
        for part in self.parts():
            done.update(_read_lines(part))
        return done

    def open(self) -> Dict[int, dict]:
        """Start (meta written, file emptied, parts of an older run removed) or resume (finished lines
        kept); returns the finished ones. Rank 0 only."""
        with disk_errors(self.path):
            if self.resuming:
                done = self.read_done()
            else:
                for part in self.parts():  # left by a run whose output is gone: not lines of this one
                    os.remove(part)
                atomic_write_text(self.meta_path, json.dumps(self.meta, indent=2) + "\n")
                open(self.path, "w").close()
                done = {}
        self._f = open(self.path, "a", encoding="utf-8")
        return done

    def open_part(self, replica: int) -> None:
        """Replica r > 0's writer: its lines go to its part file (appended to, on a resume)."""
        with disk_errors(self.part_path(replica)):
            self._f = open(self.part_path(replica), "a", encoding="utf-8")

    def append(self, line: dict) -> None:
        with disk_errors(self.path):
            self._f.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def finish(self, summary_of, n_records: int) -> dict:
        """Merge the parts, rewrite the file in input order; record the summary (summary_of(lines)) in
        the meta file. Rank 0, once every replica has closed its part."""
        self.close()
        parts = self.parts()
        lines = sorted(self.read_done().values(), key=lambda r: r["index"])
        with atomic_open(self.path, "w") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        for part in parts:  # their lines are in the file now
            os.remove(part)
        summary = summary_of(lines)
        self.meta.update(complete=len(lines) == n_records, summary=summary)
        atomic_write_text(self.meta_path, json.dumps(self.meta, indent=2) + "\n")
        return summary


class Lines:
    """The output line of a record: its samples' texts, finishes, tokens, answers and correctness."""

    def __init__(self, job: GenerationJob):
        self.job, self.prompts = job, {}

    def __call__(self, i: int, texts, finishes, error=None, token_ids=None) -> dict:
        f, rec = self.job.flags, self.job.records[i]
        one = f.num_samples == 1
        line = {"id": rec.get("id", i), "index": i, "instruction": rec["instruction"], "prompt": self.prompts[i],
                "output": texts[0] if one else texts, "finish": finishes[0] if one else finishes}
        if f.output_tokens:
            token_ids = token_ids or [[] for _ in texts]
            line["tokens"] = token_ids[0] if one else token_ids
        if error:
            line["error"] = error
        if "label" in rec:
            line["label"] = rec["label"]
        if f.task:
            options = choices_in(rec.get("instruction"))  # CSQA answers and labels may be choice texts
            preds = [extract_answer(t, f.task, f.scoring, options) for t in texts]
            oks = [is_correct(p, rec.get("label"), f.task, f.scoring, options) for p in preds]
            line["prediction"], line["correct"] = (preds[0], oks[0]) if one else (preds, oks)
            if not one:  # self-consistency and pass@k over the samples
                line.update(vote_fields(preds, oks, rec.get("label"), f.task, f.scoring, options))
        return line


def _plan(job: GenerationJob, tok, max_seq_len: int, mine: List[int], lines: Lines, write):
    """Requests for the records `mine` (num_samples each); prompts too long for the budget are skipped
    (a line with an error) or cut from the left. Returns (requests, skipped, truncated)."""
    f = job.flags
    room = prompt_room(max_seq_len, f.max_new_tokens)
    requests, skipped, truncated = [], 0, 0
    for i in mine:
        prompt = encode_prompt(tok, job.instruction(job.records[i]), job.template, room)
        lines.prompts[i] = prompt.text
        if prompt.cut:
            if f.long_prompts == "skip":
                skipped += 1
                write(lines(i, [""] * f.num_samples, ["skipped"] * f.num_samples,
                            error=f"prompt of {prompt.n_tokens} tokens exceeds {room} (max_seq_len {max_seq_len} - "
                                  f"max_new_tokens {f.max_new_tokens})"))
                continue
            truncated += 1
        for k in range(f.num_samples):
            requests.append(Request((i, k), prompt.ids, request_seed(f.seed, i, k)))
    return requests, skipped, truncated


def _already_done(out: OutputFile, info) -> set:
    """The records a resumed output file has finished (read on rank 0, the same set on every rank)."""
    done = out.open() if info.is_main else {}
    if info.world_size > 1:
        box = [sorted(done)]
        torch.distributed.broadcast_object_list(box, src=0)
        return set(box[0])
    return set(done)


def replica_share(n_records: int, done: set, replica: int, replicas: int) -> List[int]:
    """The records a data-parallel replica generates: those not finished yet, dealt round-robin in
    index order (so the replicas' shares stay even on a resume, whoever finished more before)."""
    return [i for i in range(n_records) if i not in done][replica::replicas]


def _replica_writer(out: OutputFile, info):
    """Who writes a replica's lines: its first tensor-parallel rank (to the output on replica 0, to its
    part file on the others); the other ranks of a replica compute the same lines and drop them."""
    if info.tp_rank != 0:
        return lambda line: None
    if info.dp_rank != 0:
        out.open_part(info.dp_rank)
    return out.append


def _job_totals(info, *counts: int) -> List[int]:
    """Each count summed over the data-parallel replicas (counted once per replica, on its first
    tensor-parallel rank). Every rank takes part; it is also where the replicas wait for the slowest."""
    if info.world_size == 1:
        return list(counts)
    mine = list(counts) if info.tp_rank == 0 else [0] * len(counts)
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return [sum(g[n] for g in gathered) for n in range(len(counts))]


def _write_completions(job: GenerationJob, model, tok, requests: List[Request], lines: Lines, write,
                       progress: bool) -> tuple:
    """Generate every request; a record's line is written once all its samples are done. Returns the
    number of tokens generated and of draws whose nucleus --top_p_bound cut."""
    f = job.flags
    stop_strings = StopStrings(tok, f.stops) if f.stops else None
    stop_ids = [tok.eos_id] if tok.eos_id is not None else []
    samples: Dict[int, dict] = {}
    n_new_tokens = 0
    bar = Progress(len(requests), "generating", "seq") if progress else None
    params, stats = replace(job.params, vocab_size=tok.vocab_size), {}
    for c in generate_stream(model, requests, params, f.batch_size, stop_ids, stop_strings, f.prefill_tokens,
                             compiled=f.compiled, share_prompts=f.share_prompts, stats=stats):
        i, k = c.key
        n_new_tokens += len(c.tokens)
        text = tok.decode([t for t in c.tokens if t not in stop_ids])
        if stop_strings:
            text = stop_strings.cut(text)
        samples.setdefault(i, {})[k] = (text, c.finish, c.tokens)
        if len(samples[i]) == f.num_samples:
            finished = samples.pop(i)
            got = [finished[k] for k in range(f.num_samples)]
            write(lines(i, [s[0] for s in got], [s[1] for s in got], token_ids=[s[2] for s in got]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return n_new_tokens, stats.get("top_p_cut", 0)


def run_generation(job: GenerationJob) -> None:
    """Every record not finished yet, generated by world / --tp_size data-parallel replicas (each one
    --tp_size-way tensor parallel) taking a share each (replica_share); one output file and summary."""
    f = job.flags
    output = Output("--output_file", f.output_file, beside=(f.output_file + ".meta.json",),
                    beside_suffixes=PART_SUFFIX)
    with runtime_job(tp_size=f.tp_size, device=f.device, **owned_outputs(f, [output], continues=_resumable)) as info:
        out = OutputFile(f.output_file, job.meta(), overwrite=f.overwrite)
        out.check_resume()
        on_interrupt(
            f"the records finished so far are kept in {f.output_file}; run the same command again to resume "
            f"(they are not generated again)"
        )
        if f.task and info.is_main:
            bad = unreadable_labels(job.records, f.task, f.scoring)
            if bad:
                print(label_warning(bad, len(job.records), f.task, f.data_file), flush=True)
        model, tok, _ = load_for_inference(f.ckpt_dir, f.lora_dir, f.dtype, info.device)
        model.eval()
        model.decode_attention(f.decode_attention)
        done = _already_done(out, info)
        write = _replica_writer(out, info)
        lines = Lines(job)
        mine = replica_share(len(job.records), done, info.dp_rank, info.dp_size)
        requests, skipped, truncated = _plan(job, tok, model.args.max_seq_len, mine, lines, write)
        start = time.time()
        n_new_tokens, cut = _write_completions(job, model, tok, requests, lines, write, info.is_main and f.progress)
        out.close()  # a replica's part is complete before rank 0 merges it
        n_new_tokens, skipped, truncated, cut = _job_totals(info, n_new_tokens, skipped, truncated, cut)
        wall = time.time() - start
        if info.is_main:
            def summary_of(finished):
                summary = {"records": len(finished), "generated_this_run": len(job.records) - len(done) - skipped,
                           "skipped_long_prompts": sum(1 for r in finished if r.get("error")),
                           "truncated_prompts": truncated, "new_tokens": n_new_tokens,
                           "tokens_per_s": round(n_new_tokens / max(wall, 1e-9), 1), "wall_s": round(wall, 2)}
                if f.top_p_bound and f.top_p < 1 and not f.top_k:
                    summary["top_p_cut_draws"] = cut  # this run's draws whose nucleus the bound cut
                if f.task:
                    summary.update(_accuracy(finished, job).as_dict(f.report))
                    if f.num_samples > 1:
                        summary.update(_sample_accuracy(finished))
                return summary

            print(json.dumps(out.finish(summary_of, len(job.records))), flush=True)


def _accuracy(lines: List[dict], job: GenerationJob) -> Accuracy:
    acc, task, one = Accuracy(), job.flags.task, job.flags.num_samples == 1
    for r in lines:
        rec = job.records[r["index"]]
        readable = parse_label(rec.get("label"), task, job.flags.scoring, choices_in(rec.get("instruction"))) is not None
        preds, oks = ([r["prediction"]], [r["correct"]]) if one else (r["prediction"], r["correct"])
        for p, ok in zip(preds, oks):
            acc.count(p, ok, readable)
    return acc


def _sample_accuracy(lines: List[dict]) -> dict:
    """maj@k, pass@k and pass@1 of the records' samples (lines skipped for a long prompt count wrong)."""
    acc = SampleAccuracy()
    for r in lines:
        acc.add(r["correct"], r.get("majority_correct", False))
    return acc.as_dict()


def run_scoring(job: ScoringJob) -> None:
    """Per-record log-likelihood of `output` given `instruction` (sum, mean, token count), computed on
    vocabulary shards without gathering full logits; written in input order. --top_k > 0 also writes,
    per output token, the model's k most likely tokens and their log-probabilities (a teacher file
    for train.py --objective teacher_kl, described by OUTPUT.meta.json)."""
    f = job.flags
    output = Output("--output_file", f.output_file, beside=(teacher_meta_path(f.output_file),) if f.top_k else ())
    with runtime_job(tp_size=f.tp_size, device=f.device, **owned_outputs(f, [output])) as info:
        model, tok, base_dir = load_for_inference(f.ckpt_dir, f.lora_dir, f.dtype, info.device)
        model.eval()
        vocab = model.args.vocab_size
        if f.top_k > vocab:
            raise UserError(f"--top_k {f.top_k} exceeds the vocabulary of the model in {f.ckpt_dir} ({vocab})")
        items, truncated = _scoring_items(job, tok, model.args.max_seq_len)
        mine = [items[n] for n in _shortest_first(items)[info.dp_rank::info.dp_size]]
        results, topk = _gather_scores(info, *_score(model, mine, f.batch_size, f.top_k, tok.padding_id, info.device))
        if info.is_main:
            _write_scores(job, results, topk)
            if f.top_k:
                atomic_write_text(teacher_meta_path(f.output_file), json.dumps(teacher_meta(
                    f.top_k, base_dir, tok, vocab, f.include_eos, job.template, f.data_file)) + "\n")
            print(json.dumps({"records": len(job.records), "sequences": len(items), "truncated": truncated}),
                  flush=True)


def _scoring_items(job: ScoringJob, tok, max_seq_len: int):
    """([(record index, output index, input ids, labels)], how many sequences were cut to max_seq_len)."""
    items, truncated = [], 0
    for i, rec in enumerate(job.records):
        prompt = encode_prompt(tok, job.instruction(rec), job.template).ids
        for j, text in enumerate(_outputs(rec)):
            resp = tok.encode(text, bos=False, eos=job.flags.include_eos)
            seq = (prompt + resp)[: max_seq_len + 1]
            truncated += len(prompt + resp) > len(seq)
            labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]
            items.append((i, j, seq[:-1], labels[: len(seq) - 1]))
    return items, truncated


def _shortest_first(items: list) -> List[int]:
    return sorted(range(len(items)), key=lambda n: len(items[n][2]))


def _gather_scores(info, results: dict, topk: dict):
    """Every replica's (results, topk), merged on rank 0 ({} elsewhere): each sequence is scored by
    one replica (world / --tp_size data-parallel replicas take every dp_size-th, shortest first)."""
    if info.dp_size == 1:
        return results, topk
    gathered = [None] * info.world_size if info.is_main else None
    torch.distributed.gather_object((results, topk) if info.tp_rank == 0 else ({}, {}), gathered, dst=0)
    merged = ({}, {})
    for r, t in gathered or []:
        merged[0].update(r)
        merged[1].update(t)
    return merged


@torch.no_grad()
def _score(model, items: list, batch_size: int, top_k: int, pad_id: int, device):
    """(results, topk), both keyed by (record, output): (sum log-probability, token count), and with
    top_k the (tokens, top-k ids, top-k log-probabilities) of the output tokens. Shortest first."""
    results, topk = {}, {}
    order = _shortest_first(items)
    for s in range(0, len(order), batch_size):
        chunk = [items[n] for n in order[s:s + batch_size]]
        x, y = pad_batch([(it[2], it[3]) for it in chunk], pad_id)
        x, y = x.to(device), y.to(device)
        logits = model(x, gather=False)
        if top_k:  # before the cross-entropy, which shifts fp32 logits in place
            topk.update(_top_k(logits, y, chunk, top_k))
        for b, it in enumerate(chunk):
            n_tok = int((y[b] != IGNORE).sum())
            nll = float(token_cross_entropy(logits[b:b + 1], y[b:b + 1])) if n_tok else 0.0
            results[(it[0], it[1])] = (-nll, n_tok)
    return results, topk


def _top_k(logits: torch.Tensor, y: torch.Tensor, chunk: list, top_k: int) -> dict:
    """(record, output) -> (output tokens, their top-k ids, top-k log-probabilities and each token's own
    log-probability, rounded to 1e-6)."""
    labelled = y != IGNORE
    rows = logits[labelled]
    ids, logp = sharded_topk(rows, top_k)
    own = sharded_token_logprobs(rows, y[labelled]).tolist()  # each output token's own log-probability
    ids, logp = ids.tolist(), logp.tolist()
    out, start = {}, 0
    for b, it in enumerate(chunk):
        n = int(labelled[b].sum())
        out[(it[0], it[1])] = (y[b][labelled[b]].tolist(), ids[start:start + n],
                               [[round(v, 6) for v in row] for row in logp[start:start + n]],
                               [round(v, 6) for v in own[start:start + n]])
        start += n
    return out


def _write_scores(job: ScoringJob, results: dict, topk: dict) -> None:
    with atomic_open(job.flags.output_file, "w") as f:
        for i, rec in enumerate(job.records):
            vals = [results[(i, j)] for j in range(len(_outputs(rec)))]
            sums, counts = [v[0] for v in vals], [v[1] for v in vals]
            means = [v[0] / v[1] if v[1] else 0.0 for v in vals]
            one = not isinstance(rec["output"], list)
            line = {"id": rec.get("id", i), "index": i, "sum_logprob": sums[0] if one else sums,
                    "mean_logprob": means[0] if one else means, "n_tokens": counts[0] if one else counts}
            if job.flags.top_k:
                got = [topk[(i, j)] for j in range(len(_outputs(rec)))]
                for n, key in enumerate(("tokens", "topk_ids", "topk_logprobs", "token_logprobs")):
                    line[key] = got[0][n] if one else [g[n] for g in got]
            f.write(json.dumps(line) + "\n")


def _outputs(rec: dict) -> list:
    return rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
