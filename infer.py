"""Offline generation, scoring and evaluation (fire CLI).

  torchrun --nproc_per_node N infer.py --ckpt_dir C --data_file F --output_file O.jsonl [--task GSM8K]
      [--batch_size 384] [--max_new_tokens 256] [--temperature 0] [--top_p 1] [--num_samples 1]
      [--template default|none] [--lora_dir L]
  python infer.py evaluate --task T --predictions_file O.jsonl [--label_file F] [--field output]
  torchrun --nproc_per_node N infer.py score --ckpt_dir C --data_file F --output_file O.jsonl
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from engine.cli import run_cli

# Every flag that changes what an output line holds: a resumed file must have been written with the same.
SETTINGS = ("ckpt_dir", "lora_dir", "template", "task", "dtype", "max_new_tokens", "temperature", "top_p", "top_k",
            "num_samples", "seed", "stop", "long_prompts", "output_tokens")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_done(output_file: str) -> dict:
    """index -> line of a (possibly interrupted) output file; a torn last line is cut off."""
    done, good_bytes = {}, 0
    with open(output_file, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                done[rec["index"]] = rec
                good_bytes += len(raw)
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    if good_bytes != os.path.getsize(output_file):
        with open(output_file, "r+b") as f:
            f.truncate(good_bytes)
    return done


def _check_resume(output_file: str, meta_path: str, meta: dict) -> None:
    from engine.errors import UserError

    if not os.path.exists(meta_path):
        raise UserError(f"--output_file {output_file} exists but was not written by infer.py "
                        f"(no {os.path.basename(meta_path)}); choose another output file")
    old = json.load(open(meta_path))
    if old.get("data_sha256") != meta["data_sha256"]:
        raise UserError(f"--output_file {output_file} was written for a different data file "
                        f"({old.get('data_file')}); choose another output file to start afresh")
    for key in SETTINGS:
        if old.get(key) != meta.get(key):
            flag = "the precision (--use_float16 / --use_bfloat16)" if key == "dtype" else f"--{key}"
            raise UserError(f"--output_file {output_file} was written with {flag} {old.get(key)!r}, not "
                            f"{meta.get(key)!r}; rerun with the same flags to resume it, or choose another "
                            f"output file")


def _resolve_template(template, ckpt_dir: str, lora_dir: str) -> str:
    """--template when given, else the one recorded with the checkpoint (or its LoRA adapter) by
    training, else "default"."""
    from engine.data import format_prompt, recorded_template

    recorded, where = recorded_template(lora_dir, ckpt_dir)
    main = os.environ.get("RANK", "0") == "0"
    if template is None:
        template = recorded or "default"
        if recorded and main:
            print(f"using the prompt template {template!r} recorded with {where}", flush=True)
    elif recorded and template != recorded and main:
        print(f"warning: --template {template} differs from the template {recorded!r} that {where} was "
              f"trained with", flush=True)
    format_prompt("", template)  # an unknown name ends here, before anything loads
    return template


def generate(ckpt_dir: str, data_file: str, output_file: str, task: str = None, batch_size: int = 32,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, template: str = None, seed: int = 0, use_float16: bool = False,
             use_bfloat16: bool = False, lora_dir: str = None, stop: str = None, long_prompts: str = "skip",
             prefill_tokens: int = 16384, progress: bool = True, output_tokens: bool = False, compile: bool = True):
    """Generate responses for every record of data_file; one JSON line per record in output_file.

    Args:
        ckpt_dir: native checkpoint (one shard per tensor-parallel rank), an HF directory, or a LoRA adapter directory.
        data_file: MCC-KD JSON list or JSON lines with 'instruction' (and optional 'label', 'id').
        output_file: JSON lines; rerunning with the same file resumes (finished records are kept).
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: extract the answers and score them against 'label'.
        batch_size: sequences decoded together (continuous batching refills finished slots).
        max_new_tokens: generation budget per response.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus sampling mass in (0, 1].
        top_k: sample from the k most likely tokens only (0: off).
        num_samples: responses per record, sampled independently (seeded by --seed and the record).
        template: prompt template: default (instruction / response) or none (verbatim after BOS); default: the checkpoint's.
        seed: sampling seed.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        lora_dir: a LoRA adapter from training, merged into the weights.
        stop: stop string(s), comma separated, besides EOS; the output is cut before them.
        long_prompts: prompts leaving < max_new_tokens of room: skip (written with an error, counted wrong) or truncate (left).
        prefill_tokens: token budget of one prefill pass.
        progress: show a progress bar.
        output_tokens: also write the generated token ids ('tokens') of each response.
        compile: on a GPU, decode with CUDA graphs of a compiled step (False: eager; CPU is always eager).
    """
    import torch

    from engine import distributed
    from engine.data import format_prompt, read_records
    from engine.errors import UserError
    from engine.evaluation import Accuracy, check_task, extract_answer, is_correct, parse_label
    from engine.fileio import atomic_open, atomic_write_text, disk_errors
    from engine.generation import Request, SamplingParams, StopStrings, fit_prompt, generate_stream, request_seed
    from engine.lock import own_output
    from engine.lora import load_for_inference
    from engine.precision import dtype_from_flags
    from engine.tokenizer import check_tokenizer_fits, load_tokenizer

    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0: off), got {top_k}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("prefill_tokens", prefill_tokens)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if long_prompts not in ("skip", "truncate"):
        raise UserError(f"--long_prompts must be skip or truncate, got {long_prompts!r}")
    if os.path.isdir(output_file):
        raise UserError(f"--output_file {output_file} is a directory")
    task = check_task(task) if task else None
    stops = [s for s in (stop.split(",") if isinstance(stop, str) else list(stop or [])) if s]
    dtype = dtype_from_flags(use_float16, use_bfloat16)
    records = read_records(data_file)
    template = _resolve_template(template, ckpt_dir, lora_dir)
    info = distributed.setup()
    lock = own_output(output_file + ".lock", f"--output_file {output_file}", info)
    try:
        meta_path = output_file + ".meta.json"
        meta = {"data_file": os.path.abspath(data_file), "data_sha256": _sha256(data_file), "ckpt_dir": ckpt_dir,
                "lora_dir": lora_dir, "template": template, "task": task, "dtype": str(dtype).replace("torch.", ""),
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "num_samples": num_samples, "seed": seed, "stop": stops, "long_prompts": long_prompts,
                "output_tokens": output_tokens}
        resuming = os.path.exists(output_file)  # decided while this job owns the file
        if resuming:
            _check_resume(output_file, meta_path, meta)
        if task and info.is_main:
            from engine.evaluation import label_warning, unreadable_labels

            bad = unreadable_labels(records, task)
            if bad:
                print(label_warning(bad, len(records), task, data_file), flush=True)
        model, base_dir = load_for_inference(ckpt_dir, lora_dir, dtype, info.device)
        model.eval()
        tok = load_tokenizer(base_dir)
        check_tokenizer_fits(tok, model.args.vocab_size, base_dir)
        done = {}
        if info.is_main:
            with disk_errors(output_file):
                if resuming:
                    done = _read_done(output_file)
                else:
                    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
                    open(output_file, "w").close()
        if info.world_size > 1:  # every rank generates the same remaining records
            box = [sorted(done)]
            torch.distributed.broadcast_object_list(box, src=0)
            todo_skip = set(box[0])
        else:
            todo_skip = set(done)

        limit = max(1, model.args.max_seq_len - max_new_tokens)
        stop_strings = StopStrings(tok, stops) if stops else None
        stop_ids = [tok.eos_id] if tok.eos_id is not None else []
        out_f = open(output_file, "a", encoding="utf-8") if info.is_main else None
        prompts, requests, skipped, truncated = {}, [], 0, 0

        def line_for(i: int, texts, finishes, error=None, token_ids=None) -> dict:
            rec = records[i]
            one = num_samples == 1
            line = {"id": rec.get("id", i), "index": i, "instruction": rec["instruction"], "prompt": prompts[i],
                    "output": texts[0] if one else texts, "finish": finishes[0] if one else finishes}
            if output_tokens:
                token_ids = token_ids or [[] for _ in texts]
                line["tokens"] = token_ids[0] if one else token_ids
            if error:
                line["error"] = error
            if "label" in rec:
                line["label"] = rec["label"]
            if task:
                preds = [extract_answer(t, task) for t in texts]
                oks = [is_correct(p, rec.get("label"), task) for p in preds]
                line["prediction"], line["correct"] = (preds[0], oks[0]) if num_samples == 1 else (preds, oks)
            return line

        def write(line: dict) -> None:
            if out_f:
                with disk_errors(output_file):
                    out_f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    out_f.flush()

        for i, rec in enumerate(records):
            if i in todo_skip:
                continue
            prompts[i] = format_prompt(rec["instruction"], template)
            ids = tok.encode(prompts[i])
            if len(ids) > limit:
                if long_prompts == "skip":
                    skipped += 1
                    write(line_for(i, [""] * num_samples, ["skipped"] * num_samples,
                                   error=f"prompt of {len(ids)} tokens exceeds {limit} (max_seq_len "
                                         f"{model.args.max_seq_len} - max_new_tokens {max_new_tokens})"))
                    continue
                truncated += 1
                ids = fit_prompt(ids, limit, tok.bos_id)
            for k in range(num_samples):
                requests.append(Request((i, k), ids, request_seed(seed, i, k)))

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        pending = {}
        n_new_tokens, start = 0, time.time()
        bar = None
        if info.is_main and progress:
            from engine.progress import Progress

            bar = Progress(len(requests), "generating", "seq")
        for c in generate_stream(model, requests, params, batch_size, stop_ids, stop_strings, prefill_tokens,
                                 compile=None if compile else False):
            i, k = c.key
            n_new_tokens += len(c.tokens)
            text = tok.decode([t for t in c.tokens if t not in stop_ids])
            if stop_strings:
                text = stop_strings.cut(text)
            pending.setdefault(i, {})[k] = (text, c.finish, c.tokens)
            if len(pending[i]) == num_samples:
                samples = [pending[i][k] for k in range(num_samples)]
                del pending[i]
                write(line_for(i, [s[0] for s in samples], [s[1] for s in samples], token_ids=[s[2] for s in samples]))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        wall = time.time() - start
        if out_f:
            out_f.close()
            lines = sorted(_read_done(output_file).values(), key=lambda r: r["index"])
            with atomic_open(output_file, "w") as f:  # the finished file is in input order
                for line in lines:
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
            summary = {"records": len(lines), "generated_this_run": len(records) - len(todo_skip) - skipped,
                       "skipped_long_prompts": sum(1 for r in lines if r.get("error")),
                       "truncated_prompts": truncated, "new_tokens": n_new_tokens,
                       "tokens_per_s": round(n_new_tokens / max(wall, 1e-9), 1), "wall_s": round(wall, 2)}
            if task:
                acc = Accuracy()
                for r in lines:
                    readable = parse_label(records[r["index"]].get("label"), task) is not None
                    for p, ok in zip(*(([r["prediction"]], [r["correct"]]) if num_samples == 1 else (r["prediction"], r["correct"]))):
                        acc.count(p, ok, readable)
                summary.update(acc.as_dict())
            meta.update(complete=len(lines) == len(records), summary=summary)
            atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
            print(json.dumps(summary), flush=True)
    finally:
        if lock is not None:
            lock.release()
    distributed.barrier()
    distributed.teardown()


def score(ckpt_dir: str, data_file: str, output_file: str, batch_size: int = 16, template: str = None,
          lora_dir: str = None, use_float16: bool = False, use_bfloat16: bool = False, include_eos: bool = True):
    """Per-record log-likelihood of `output` given `instruction`: sum and mean over the output tokens.

    Args:
        ckpt_dir: native checkpoint, HF directory, or LoRA adapter directory.
        data_file: records with 'instruction' and 'output' (a string, or a list: one score each).
        output_file: JSON lines in input order: id, index, sum_logprob, mean_logprob, n_tokens (lists for list outputs).
        batch_size: sequences per forward pass.
        template: prompt template: default or none; default: the one recorded with the checkpoint.
        lora_dir: a LoRA adapter merged into the weights.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        include_eos: score the EOS that ends each output too.
    """
    import torch

    from engine import distributed
    from engine.data import IGNORE, format_prompt, pad_batch, read_records, validate_training_records
    from engine.fileio import atomic_open
    from engine.lora import load_for_inference
    from engine.objectives import token_cross_entropy
    from engine.errors import UserError
    from engine.precision import dtype_from_flags
    from engine.tokenizer import check_tokenizer_fits, load_tokenizer

    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if os.path.isdir(output_file):
        raise UserError(f"--output_file {output_file} is a directory")
    dtype = dtype_from_flags(use_float16, use_bfloat16)
    records = read_records(data_file)
    validate_training_records(records, data_file)
    template = _resolve_template(template, ckpt_dir, lora_dir)
    info = distributed.setup()
    model, base_dir = load_for_inference(ckpt_dir, lora_dir, dtype, info.device)
    model.eval()
    tok = load_tokenizer(base_dir)
    check_tokenizer_fits(tok, model.args.vocab_size, base_dir)
    items = []  # (record index, output index, input ids, labels)
    truncated = 0
    for i, rec in enumerate(records):
        prompt = tok.encode(format_prompt(rec["instruction"], template))
        outs = rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
        for j, text in enumerate(outs):
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
            for b, it in enumerate(chunk):
                n_tok = int((y[b] != IGNORE).sum())
                nll = float(token_cross_entropy(logits[b:b + 1], y[b:b + 1])) if n_tok else 0.0
                results[(it[0], it[1])] = (-nll, n_tok)
    if info.is_main:
        with atomic_open(output_file, "w") as f:
            for i, rec in enumerate(records):
                outs = rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
                vals = [results[(i, j)] for j in range(len(outs))]
                sums = [v[0] for v in vals]
                means = [v[0] / v[1] if v[1] else 0.0 for v in vals]
                counts = [v[1] for v in vals]
                one = not isinstance(rec["output"], list)
                f.write(json.dumps({"id": rec.get("id", i), "index": i,
                                    "sum_logprob": sums[0] if one else sums, "mean_logprob": means[0] if one else means,
                                    "n_tokens": counts[0] if one else counts}) + "\n")
        print(json.dumps({"records": len(records), "sequences": len(items), "truncated": truncated}), flush=True)
    distributed.barrier()
    distributed.teardown()


def evaluate(task: str, predictions_file: str, label_file: str = None, field: str = "output"):
    """Accuracy of a predictions file (or of any text field, e.g. the gold rationales of a data file).

    Args:
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH.
        predictions_file: JSON list or JSON lines holding `field` (and 'label' unless label_file is given).
        label_file: records whose 'label' is the gold answer, in the same order as the predictions.
        field: the text field to score; a list (several samples) scores each of its items.
    """
    from engine.data import DataError, read_records
    from engine.evaluation import Accuracy, check_task, extract_answer

    task = check_task(task)
    preds = read_records(predictions_file, required=())
    labels_src = read_records(label_file, required=()) if label_file else preds
    if len(labels_src) != len(preds):
        raise DataError(f"{label_file} has {len(labels_src)} records but {predictions_file} has {len(preds)}")
    acc = Accuracy()
    for i, (p, l) in enumerate(zip(preds, labels_src)):
        if "label" not in l:
            raise DataError(f"{label_file or predictions_file} record {i} lacks the key 'label'")
        value = p.get(field, "")
        for text in (value if isinstance(value, list) else [value]) or [""]:
            acc.add(extract_answer(text if isinstance(text, str) else "", task), l["label"], task)
    print(json.dumps(acc.as_dict()))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("generate", "evaluate", "score"):
        run_cli({"generate": generate, "evaluate": evaluate, "score": score})
    else:
        run_cli(generate)
