"""The jobs behind infer.py: generating a response file (resumable, one JSON line per record) and
scoring outputs by log-likelihood. The launcher checks flags; these do the work."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from engine.runtime.jobs import job as runtime_job
from engine.text.answers import extract_answer, is_correct, label_warning, parse_label, unreadable_labels
from engine.checkpoint import load_for_inference
from engine.text.sequences import IGNORE, pad_batch
from engine.runtime.errors import UserError
from engine.infer.metrics import Accuracy
from engine.runtime.fileio import atomic_open, atomic_write_text, disk_errors, file_sha256
from engine.infer.generation import Request, SamplingParams, StopStrings, fit_prompt, generate_stream, request_seed
from models.vocab_parallel import sharded_token_logprobs, sharded_topk, token_cross_entropy
from engine.runtime.progress import Progress
from engine.text.prompts import format_prompt, task_instruction
from engine.infer.topk_file import meta_path as teacher_meta_path, teacher_meta
from engine.text.tokenizer import check_tokenizer_fits, load_tokenizer

# Every setting that changes what an output line holds: a resumed file must have been written with the same.
SETTINGS = ("ckpt_dir", "lora_dir", "template", "task", "dtype", "max_new_tokens", "temperature", "top_p", "top_k",
            "num_samples", "seed", "stop", "long_prompts", "output_tokens", "task_prefix")


@dataclass
class GenerationJob:
    ckpt_dir: str
    data_file: str
    output_file: str
    records: List[dict]
    template: str
    dtype: torch.dtype
    params: SamplingParams
    task: Optional[str] = None
    num_samples: int = 1
    batch_size: int = 32
    lora_dir: Optional[str] = None
    stops: tuple = ()
    long_prompts: str = "skip"
    prefill_tokens: int = 16384
    progress: bool = True
    output_tokens: bool = False
    compile: Optional[bool] = None
    device: Optional[str] = None
    task_prefix: Optional[str] = None  # a step-by-step model's task (label / rationale), None for others
    task_prefixes: Optional[dict] = None  # {task: instruction prefix} the model was trained with

    def instruction(self, rec: dict) -> str:
        return task_instruction(rec["instruction"], self.task_prefix, self.task_prefixes)

    def meta(self) -> dict:
        p = self.params
        return {"data_file": os.path.abspath(self.data_file), "data_sha256": file_sha256(self.data_file),
                "ckpt_dir": self.ckpt_dir, "lora_dir": self.lora_dir, "template": self.template, "task": self.task,
                "dtype": str(self.dtype).replace("torch.", ""), "max_new_tokens": p.max_new_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "num_samples": self.num_samples,
                "seed": p.seed, "stop": list(self.stops), "long_prompts": self.long_prompts,
                "output_tokens": self.output_tokens, "task_prefix": self.task_prefix}


class OutputFile:
    """The JSON-lines output of a generation job and its `.meta.json`: lines are appended as records
    finish (so a killed job loses nothing finished), a rerun with the same settings resumes, and the
    finished file is rewritten in input order."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta, self.meta_path = path, meta, path + ".meta.json"
        self.resuming = os.path.exists(path)  # decided while this job owns the file
        self._f = None

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
            if old.get(key) != self.meta.get(key):
                flag = "the precision (--use_float16 / --use_bfloat16)" if key == "dtype" else f"--{key}"
                raise UserError(f"--output_file {self.path} was written with {flag} {old.get(key)!r}, not "
                                f"{self.meta.get(key)!r}; rerun with the same flags to resume it, or choose another "
                                f"output file")

    def read_done(self) -> Dict[int, dict]:
        """index -> line of a (possibly interrupted) output file; a torn last line is cut off."""
        done, good_bytes = {}, 0
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    done[rec["index"]] = rec
                    good_bytes += len(raw)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break
        if good_bytes != os.path.getsize(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return done

    def open(self) -> Dict[int, dict]:
        """Start (meta written, file emptied) or resume (finished lines kept); returns the finished ones."""
        with disk_errors(self.path):
            if self.resuming:
                done = self.read_done()
            else:
                atomic_write_text(self.meta_path, json.dumps(self.meta, indent=2) + "\n")
                open(self.path, "w").close()
                done = {}
        self._f = open(self.path, "a", encoding="utf-8")
        return done

    def append(self, line: dict) -> None:
        with disk_errors(self.path):
            self._f.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._f.flush()

    def finish(self, summary_of, n_records: int) -> dict:
        """Rewrite the file in input order; record the summary (summary_of(lines)) in the meta file."""
        self._f.close()
        lines = sorted(self.read_done().values(), key=lambda r: r["index"])
        with atomic_open(self.path, "w") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        summary = summary_of(lines)
        self.meta.update(complete=len(lines) == n_records, summary=summary)
        atomic_write_text(self.meta_path, json.dumps(self.meta, indent=2) + "\n")
        return summary


class Lines:
    """The output line of a record: its samples' texts, finishes, tokens, answers and correctness."""

    def __init__(self, job: GenerationJob):
        self.job, self.prompts = job, {}

    def __call__(self, i: int, texts, finishes, error=None, token_ids=None) -> dict:
        job, rec = self.job, self.job.records[i]
        one = job.num_samples == 1
        line = {"id": rec.get("id", i), "index": i, "instruction": rec["instruction"], "prompt": self.prompts[i],
                "output": texts[0] if one else texts, "finish": finishes[0] if one else finishes}
        if job.output_tokens:
            token_ids = token_ids or [[] for _ in texts]
            line["tokens"] = token_ids[0] if one else token_ids
        if error:
            line["error"] = error
        if "label" in rec:
            line["label"] = rec["label"]
        if job.task:
            preds = [extract_answer(t, job.task) for t in texts]
            oks = [is_correct(p, rec.get("label"), job.task) for p in preds]
            line["prediction"], line["correct"] = (preds[0], oks[0]) if one else (preds, oks)
        return line


def _plan(job: GenerationJob, tok, max_seq_len: int, skip: set, lines: Lines, write):
    """Requests for every record not finished yet (num_samples each); prompts too long for the budget
    are skipped (a line with an error) or cut from the left. Returns (requests, skipped, truncated)."""
    limit = max(1, max_seq_len - job.params.max_new_tokens)
    requests, skipped, truncated = [], 0, 0
    for i, rec in enumerate(job.records):
        if i in skip:
            continue
        lines.prompts[i] = format_prompt(job.instruction(rec), job.template)
        ids = tok.encode(lines.prompts[i])
        if len(ids) > limit:
            if job.long_prompts == "skip":
                skipped += 1
                write(lines(i, [""] * job.num_samples, ["skipped"] * job.num_samples,
                            error=f"prompt of {len(ids)} tokens exceeds {limit} (max_seq_len {max_seq_len} - "
                                  f"max_new_tokens {job.params.max_new_tokens})"))
                continue
            truncated += 1
            ids = fit_prompt(ids, limit, tok.bos_id)
        for k in range(job.num_samples):
            requests.append(Request((i, k), ids, request_seed(job.params.seed, i, k)))
    return requests, skipped, truncated


def run_generation(job: GenerationJob) -> None:
    with runtime_job(device=job.device, lock_file=job.output_file + ".lock", what=f"--output_file {job.output_file}") as info:
        out = OutputFile(job.output_file, job.meta())
        out.check_resume()
        if job.task and info.is_main:
            bad = unreadable_labels(job.records, job.task)
            if bad:
                print(label_warning(bad, len(job.records), job.task, job.data_file), flush=True)
        model, base_dir = load_for_inference(job.ckpt_dir, job.lora_dir, job.dtype, info.device)
        model.eval()
        tok = load_tokenizer(base_dir)
        check_tokenizer_fits(tok, model.args.vocab_size, base_dir)
        done = out.open() if info.is_main else {}
        if info.world_size > 1:  # every rank generates the same remaining records
            box = [sorted(done)]
            torch.distributed.broadcast_object_list(box, src=0)
            skip = set(box[0])
        else:
            skip = set(done)
        write = out.append if info.is_main else (lambda line: None)
        lines = Lines(job)
        requests, skipped, truncated = _plan(job, tok, model.args.max_seq_len, skip, lines, write)
        stop_strings = StopStrings(tok, job.stops) if job.stops else None
        stop_ids = [tok.eos_id] if tok.eos_id is not None else []
        samples: Dict[int, dict] = {}
        n_new_tokens, start = 0, time.time()
        bar = Progress(len(requests), "generating", "seq") if info.is_main and job.progress else None
        for c in generate_stream(model, requests, job.params, job.batch_size, stop_ids, stop_strings,
                                 job.prefill_tokens, compile=job.compile):
            i, k = c.key
            n_new_tokens += len(c.tokens)
            text = tok.decode([t for t in c.tokens if t not in stop_ids])
            if stop_strings:
                text = stop_strings.cut(text)
            samples.setdefault(i, {})[k] = (text, c.finish, c.tokens)
            if len(samples[i]) == job.num_samples:
                finished = samples.pop(i)
                got = [finished[k] for k in range(job.num_samples)]
                write(lines(i, [s[0] for s in got], [s[1] for s in got], token_ids=[s[2] for s in got]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        wall = time.time() - start
        if info.is_main:
            def summary_of(finished):
                summary = {"records": len(finished), "generated_this_run": len(job.records) - len(skip) - skipped,
                           "skipped_long_prompts": sum(1 for r in finished if r.get("error")),
                           "truncated_prompts": truncated, "new_tokens": n_new_tokens,
                           "tokens_per_s": round(n_new_tokens / max(wall, 1e-9), 1), "wall_s": round(wall, 2)}
                if job.task:
                    summary.update(_accuracy(finished, job).as_dict())
                return summary

            print(json.dumps(out.finish(summary_of, len(job.records))), flush=True)


def _accuracy(lines: List[dict], job: GenerationJob) -> Accuracy:
    acc = Accuracy()
    for r in lines:
        readable = parse_label(job.records[r["index"]].get("label"), job.task) is not None
        preds, oks = (([r["prediction"]], [r["correct"]]) if job.num_samples == 1 else (r["prediction"], r["correct"]))
        for p, ok in zip(preds, oks):
            acc.count(p, ok, readable)
    return acc


def run_scoring(ckpt_dir: str, records: List[dict], output_file: str, template: str, dtype, batch_size: int,
                lora_dir: Optional[str], include_eos: bool, device: Optional[str] = None,
                task_prefix: Optional[str] = None, task_prefixes: Optional[dict] = None, top_k: int = 0,
                data_file: Optional[str] = None) -> None:
    """Per-record log-likelihood of `output` given `instruction` (sum, mean, token count), computed on
    vocabulary shards without gathering full logits; written in input order. top_k > 0 also writes,
    per output token, the model's k most likely tokens and their log-probabilities (a teacher file
    for train.py --objective teacher_kl, described by OUTPUT.meta.json)."""
    with runtime_job(device=device, lock_file=output_file + ".lock", what=f"--output_file {output_file}") as info:
        model, base_dir = load_for_inference(ckpt_dir, lora_dir, dtype, info.device)
        model.eval()
        tok = load_tokenizer(base_dir)
        check_tokenizer_fits(tok, model.args.vocab_size, base_dir)
        if top_k > model.args.vocab_size:
            raise UserError(f"--top_k {top_k} exceeds the vocabulary of the model in {ckpt_dir} ({model.args.vocab_size})")
        topk = {}  # (record, output) -> (tokens, top-k ids, top-k log-probabilities)
        items = []  # (record index, output index, input ids, labels)
        truncated = 0
        for i, rec in enumerate(records):
            prompt = tok.encode(format_prompt(task_instruction(rec["instruction"], task_prefix, task_prefixes), template))
            for j, text in enumerate(_outputs(rec)):
                resp = tok.encode(text, bos=False, eos=include_eos)
                seq = (prompt + resp)[: model.args.max_seq_len + 1]
                truncated += len(prompt + resp) > len(seq)
                labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]
                items.append((i, j, seq[:-1], labels[: len(seq) - 1]))
        results = {}
        order = sorted(range(len(items)), key=lambda n: len(items[n][2]))
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                chunk = [items[n] for n in order[s:s + batch_size]]
                x, y = pad_batch([(it[2], it[3]) for it in chunk], tok.padding_id)
                x, y = x.to(info.device), y.to(info.device)
                logits = model(x, gather=False)
                if top_k:  # before the cross-entropy, which shifts fp32 logits in place
                    labelled = y != IGNORE
                    rows = logits[labelled]
                    ids, logp = sharded_topk(rows, top_k)
                    own = sharded_token_logprobs(rows, y[labelled]).tolist()  # each output token's own
                    ids, logp = ids.tolist(), logp.tolist()
                    start = 0
                    for b, it in enumerate(chunk):
                        n = int(labelled[b].sum())
                        topk[(it[0], it[1])] = (y[b][labelled[b]].tolist(), ids[start:start + n],
                                                [[round(v, 6) for v in row] for row in logp[start:start + n]],
                                                [round(v, 6) for v in own[start:start + n]])
                        start += n
                for b, it in enumerate(chunk):
                    n_tok = int((y[b] != IGNORE).sum())
                    nll = float(token_cross_entropy(logits[b:b + 1], y[b:b + 1])) if n_tok else 0.0
                    results[(it[0], it[1])] = (-nll, n_tok)
        if info.is_main:
            with atomic_open(output_file, "w") as f:
                for i, rec in enumerate(records):
                    vals = [results[(i, j)] for j in range(len(_outputs(rec)))]
                    sums, counts = [v[0] for v in vals], [v[1] for v in vals]
                    means = [v[0] / v[1] if v[1] else 0.0 for v in vals]
                    one = not isinstance(rec["output"], list)
                    line = {"id": rec.get("id", i), "index": i, "sum_logprob": sums[0] if one else sums,
                            "mean_logprob": means[0] if one else means, "n_tokens": counts[0] if one else counts}
                    if top_k:
                        got = [topk[(i, j)] for j in range(len(_outputs(rec)))]
                        for n, key in enumerate(("tokens", "topk_ids", "topk_logprobs", "token_logprobs")):
                            line[key] = got[0][n] if one else [g[n] for g in got]
                    f.write(json.dumps(line) + "\n")
            if top_k:
                atomic_write_text(teacher_meta_path(output_file), json.dumps(teacher_meta(
                    top_k, base_dir, tok, model.args.vocab_size, include_eos, template, data_file)) + "\n")
            print(json.dumps({"records": len(records), "sequences": len(items), "truncated": truncated}), flush=True)


def _outputs(rec: dict) -> list:
    return rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
