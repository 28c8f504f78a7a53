"""Greedy generation throughput: this engine vs HF transformers `generate()`, same random LLaMA model,
prompts and device, in the same run, with a check that both produce the same tokens. Also measures
the device's read bandwidth, and for batch 1 how close a decode step comes to the bandwidth limit
(the bytes a step must read: the weights + the KV cache so far). `--e2e True` adds `infer.py` end to
end (tokenising, generation, writing the output file) against HF (tokenising, `generate()`,
decoding, writing) on the same prompts.

  python bench/generate.py [--batches 1,64,384] [--dim 512] [--n_layers 4] [--new_tokens 32] [--device cuda]
  python bench/generate.py --dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8 --dtype bf16 \
      --new_tokens 128 --device cuda --e2e True                         # the GPU numbers in BENCHMARKS.md
  python bench/generate.py --samples 10 --batches 40 [--few_shot True]  # --num_samples 10: prompt KV shared or not

`--samples K` times K sampled rationales of each of several GSM8K questions (the test split's
questions with the LLaMA-2 tokenizer where ../shared holds them, else random prompts of their
lengths) in `--batches`' first size of slots, the prompt prefilled once into a shared prompt segment
of the KV cache read by its K rows, against the same requests with the prompt prefilled into every
row (what `--share_prompts False` runs), in the same
run: tokens/s, prompt tokens prefilled, KV cache bytes, identical tokens.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def read_bandwidth(device: str, n_bytes: int) -> float:
    """Bytes/s of reading one large tensor (a sum: one read of every byte, negligible writes)."""
    import torch

    x = torch.ones(n_bytes // 2, dtype=torch.bfloat16 if device == "cuda" else torch.float16, device=device)
    x = x.float() if device == "cpu" else x  # CPU half reductions are slow; read fp32 there
    x.sum()
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _hf_generate(hf, prompts, new_tokens, device, eos=None):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens if eos is None else 0, do_sample=False, pad_token_id=0,
                          eos_token_id=eos)
    return out[:, width:].tolist()


def main(batches="1,64,384", dim: int = 512, n_layers: int = 4, n_heads: int = 8, n_kv_heads: int = 4,
         vocab: int = 32000, min_prompt: int = 16, max_prompt: int = 96, new_tokens: int = 32, dtype: str = "fp32",
         device: str = None, seed: int = 0, compile: bool = None, e2e: bool = False, e2e_batch: int = 384,  # noqa: A002 (--compile)
         e2e_records: int = 768, samples: int = 0, few_shot: bool = False, decode_attention: str = "dense"):
    """Print tokens/s of both engines at each batch size, their ratio, whether the tokens agree, and
    for batch 1 the fraction of the read-bandwidth limit reached.

    Args:
        batches: comma-separated batch sizes (a size that runs out of memory is reported and skipped).
        dim, n_layers, n_heads, n_kv_heads, vocab: the random LLaMA model's shape.
        min_prompt, max_prompt: prompt lengths are drawn uniformly between these.
        new_tokens: tokens generated per prompt (no early stop, so both sides do the same work).
        dtype: fp32, bf16 or fp16.
        device: cpu or cuda (default: cuda when available).
        seed: prompt and weight seed.
        compile: our decode path (default: CUDA graphs on a GPU, eager on CPU; False: eager).
        e2e: also time infer.py end to end against an HF script doing the same work.
        e2e_batch: slots of the end-to-end run.
        e2e_records: records of the end-to-end run.
        samples: K > 0 times K samples of each question, prompt keys shared vs a copy per row, instead.
        few_shot: with samples, each question after GSM8K's 8 chain-of-thought demonstrations.
        decode_attention: our decode attention (auto, dense, ragged, fused); "dense,fused" times both in one run.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.checkpoint import load_for_inference
    from engine.infer.generation import SamplingParams, make_runner
    from engine.runtime import distributed
    from models.args import DECODE_ATTENTION

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sizes = [int(b) for b in str(batches).split(",")] if not isinstance(batches, (list, tuple)) else list(batches)
    info = distributed.setup(1, device=device)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 64 * 64, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_prompt + new_tokens + 8)
    tmp = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dt).to(device).eval()
    ours = load_for_inference(tmp, None, dt, info.device, tokenizer=False).model.eval()  # as infer.py loads it
    bandwidth = read_bandwidth(device, 4 * 1024 ** 3 if device == "cuda" else 512 * 1024 ** 2)
    element = torch.tensor([], dtype=dt).element_size()
    # a decode step reads every weight once except the embedding table (one row per token)
    weight_bytes = sum(p.numel() for p in ours.parameters()) * element
    if ours.output is not None:
        weight_bytes -= ours.tok_embeddings.weight.numel() * element
    kv_per_token = 2 * n_layers * n_kv_heads * (dim // n_heads) * element
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{dtype}; read bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per step {weight_bytes / 1e9:.3f} GB",
          flush=True)
    if samples:
        print(json.dumps(shared_prefill(ours, samples, sizes[0], new_tokens, device, seed, max_prompt, few_shot)))
        return
    g = torch.Generator().manual_seed(seed)
    results = []
    for bsz in sizes:
        lens = torch.randint(min_prompt, max_prompt + 1, (bsz,), generator=g).tolist()
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
        greedy = SamplingParams(max_new_tokens=new_tokens)
        try:
            if device == "cuda":  # cuBLAS warm-up of HF outside the timing
                _hf_generate(hf, prompts[:1], 2, device)
            theirs, t_hf = _timed(lambda: _hf_generate(hf, prompts, new_tokens, device), device)
            kinds = decode_attention if isinstance(decode_attention, (list, tuple)) else str(decode_attention).split(",")
            for kind in kinds:
                if kind not in DECODE_ATTENTION:
                    raise SystemExit(f"--decode_attention takes some of {', '.join(DECODE_ATTENTION)}, got {kind!r}")
                ours.decode_attention(kind)
                results.append(_ours_row(ours, make_runner(ours, compile), prompts, greedy, theirs, t_hf, device))
                results[-1]["decode_attention"] = kind
                if bsz == 1:  # bytes a step must read / step time / measured bandwidth
                    step_s = bsz * new_tokens / results[-1]["ours_tokens_per_s"] / new_tokens
                    kv_bytes = kv_per_token * (lens[0] + new_tokens / 2)
                    results[-1]["bandwidth_fraction"] = (weight_bytes + kv_bytes) / step_s / bandwidth
                print(f"batch {bsz:4d} ({kind}): " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in results[-1].items()), flush=True)
        except torch.OutOfMemoryError:
            print(f"batch {bsz}: out of memory, skipped", flush=True)
            continue
        ours.decode_attention("dense")
    summary = {"device": device, "dtype": dtype, "dim": dim, "n_layers": n_layers, "n_heads": n_heads,
               "n_kv_heads": n_kv_heads, "vocab": vocab, "new_tokens": new_tokens,
               "read_bandwidth_gb_s": bandwidth / 1e9, "results": results}
    if e2e:
        summary["e2e"] = end_to_end(tmp, hf, device, dtype, e2e_batch, e2e_records, new_tokens, min_prompt, seed)
    print(json.dumps(summary))


def _ours_row(ours, runner, prompts, greedy, theirs, t_hf: float, device: str) -> dict:
    """Our tokens/s on `prompts` (after a warm-up on a GPU: compile, capture) against HF's run."""
    from engine.infer.generation import complete_prompts

    bsz = len(prompts)
    if device == "cuda":
        complete_prompts(ours, prompts, greedy, [], bsz, runner=runner)
    mine, t_ours = _timed(lambda: complete_prompts(ours, prompts, greedy, [], bsz, runner=runner), device)
    n_tok = bsz * greedy.max_new_tokens
    return {"batch": bsz, "ours_tokens_per_s": n_tok / t_ours, "hf_tokens_per_s": n_tok / t_hf, "ratio": t_hf / t_ours,
            "identical_sequences": f"{sum(a == b for a, b in zip(mine, theirs))}/{bsz}"}


def gsm8k_prompts(n: int, vocab: int, seed: int, max_len: int, few_shot: bool = False):
    """(n GSM8K test questions as LLaMA-2 token ids cut to max_len, or random ids of about their
    lengths where the shared data is not at hand; which of the two). few_shot: each question after
    the 8 demonstrations of shared/data/prompts/gsm8k_complex_cot.txt, as `infer.py --prompt_file`
    puts them (cut from the left to max_len)."""
    import random

    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    data = os.path.join(shared, "mcc", "GSM8K", "test.json")
    tok_path = os.path.join(shared, "tokenizers", "llama2.model")
    demos = os.path.join(shared, "prompts", "gsm8k_complex_cot.txt")
    if os.path.exists(data) and os.path.exists(tok_path) and vocab >= 32000 and (os.path.exists(demos) or not few_shot):
        from engine.text.prompts import few_shot_prompt, read_prompt_file
        from engine.text.tokenizer import load_tokenizer

        tok, texts = load_tokenizer(tok_path), [r["instruction"] for r in json.load(open(data))[:n]]
        if few_shot:
            texts = [few_shot_prompt(read_prompt_file(demos), t) for t in texts]
        return ([tok.encode(t)[-max_len:] for t in texts],
                "GSM8K test questions" + (" after 8 demonstrations" if few_shot else ""))
    rng = random.Random(seed)
    mean = 1900 if few_shot else 70
    return [[rng.randrange(3, vocab) for _ in range(min(max_len, max(8, int(rng.gauss(mean, 26)))))]
            for _ in range(n)], "random prompts of GSM8K lengths" + (" with 8 demonstrations" if few_shot else "")


def shared_prefill(model, k: int, slots: int, new_tokens: int, device: str, seed: int, max_prompt: int,
                   few_shot: bool = False) -> dict:
    """K sampled rows per question (2 * slots / K questions, two refills' worth), the prompt's keys in a
    shared segment of the cache (prefilled once, one copy) vs a copy per row (prefilled per row), each
    timed once in the same run (after a warm-up of both on a GPU); no stop, so both do the same work.
    Then both greedy, untimed: the same tokens? (Sampled tokens may differ where a draw falls within
    rounding of a token's boundary: the two layouts sum the attention in different orders.)"""
    import torch

    from engine.infer.generation import Batcher, Request, SamplingParams, make_runner, request_seed

    questions, source = gsm8k_prompts(max(1, 2 * slots // k), model.args.vocab_size, seed, max_prompt, few_shot)
    sampled = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=seed)
    reqs = [Request((i, j), q, request_seed(seed, i, j)) for i, q in enumerate(questions) for j in range(k)]
    max_len = max(map(len, questions)) + new_tokens
    runner, out, tokens = make_runner(model), {}, {}

    @torch.no_grad()  # as generate_stream runs it
    def run(share: bool, params=sampled):
        batcher = Batcher(model, runner, params, slots, max_len, share_prompts=share)
        done = sorted((c.key, c.tokens) for c in batcher.run(reqs))
        return done, batcher.prefilled, batcher.cache.nbytes()

    for share in (False, True) if device == "cuda" else ():
        run(share)  # warm-up: capture, compile
    for share, name in ((False, "copy_per_row"), (True, "shared_segment")):
        (tokens[name], prefilled, kv), wall = _timed(lambda: run(share), device)
        out[name] = {"tokens_per_s": round(len(reqs) * new_tokens / wall, 1), "wall_s": round(wall, 2),
                     "prompt_tokens_prefilled": prefilled, "kv_cache_bytes": kv}
        print(f"{name}: {out[name]['tokens_per_s']} tok/s, {wall:.2f} s, {prefilled} prompt tokens prefilled, "
              f"KV cache {kv / 2 ** 20:.1f} MiB", flush=True)
    same = sum(a == b for a, b in zip(tokens["copy_per_row"], tokens["shared_segment"]))
    greedy = SamplingParams(max_new_tokens=new_tokens)
    greedy_same = sum(a == b for a, b in zip(run(False, greedy)[0], run(True, greedy)[0]))
    return {"samples": k, "questions": len(questions), "prompts": source, "slots": slots, "new_tokens": new_tokens,
            "mean_prompt_tokens": round(sum(map(len, questions)) / len(questions), 1),
            "identical_sampled_rows": f"{same}/{len(reqs)}", "identical_greedy_rows": f"{greedy_same}/{len(reqs)}",
            "device": device, **out}


def end_to_end(hf_dir: str, hf, device: str, dtype: str, batch: int, n_records: int, new_tokens: int,
               min_prompt: int, seed: int) -> dict:
    """infer.py's generate (checkpoint and records in, JSON lines out) vs the same job written with HF."""
    import random

    import infer
    from engine.text.tokenizer import load_tokenizer

    tok_path = os.path.join(os.path.dirname(ROOT), "shared", "data", "tokenizers", "llama2.model")
    if not os.path.exists(tok_path):  # a tokenizer trained here; its ids fit any vocabulary >= 320
        from data.make_tokenizer import default_corpus, train_tokenizer

        tok_path = train_tokenizer(os.path.join(hf_dir, "bench-tokenizer.model"), default_corpus(500))
    import shutil

    shutil.copy(tok_path, os.path.join(hf_dir, "tokenizer.model"))
    tok = load_tokenizer(hf_dir)
    rng = random.Random(seed)
    words = "the a of to and in is was for on that with as by at from are this be or it an which".split()
    records = [{"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(min_prompt, 3 * min_prompt)))}
               for _ in range(n_records)]
    data = os.path.join(hf_dir, "e2e.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = os.path.join(hf_dir, "e2e-out.jsonl")
    flags = dict(ckpt_dir=hf_dir, data_file=data, batch_size=batch, max_new_tokens=new_tokens, template="none",
                 progress=False, use_bfloat16=dtype == "bf16", use_float16=dtype == "fp16", output_tokens=True)
    if device == "cuda":  # warm-up (compile) outside the timing
        infer.generate(**{**flags, "output_file": out + ".warm", "max_new_tokens": 4})
    _, t_ours = _timed(lambda: infer.generate(**flags, output_file=out), device)
    ours_tokens = sum(len([t for t in json.loads(line)["tokens"] if t != tok.eos_id]) for line in open(out))

    def hf_job():  # loading the model is part of the job on both sides
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=hf.dtype).to(device).eval()
        n = 0
        with open(out + ".hf", "w") as f:
            for s in range(0, len(records), batch):
                chunk = records[s:s + batch]
                outs = _hf_generate(model, [tok.encode(r["instruction"]) for r in chunk], new_tokens, device,
                                    eos=tok.eos_id)
                for r, ids in zip(chunk, outs):
                    ids = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
                    n += len(ids)
                    f.write(json.dumps({"instruction": r["instruction"], "output": tok.decode(ids)}) + "\n")
        return n

    hf_tokens, t_hf = _timed(hf_job, device)
    row = {"records": n_records, "batch": batch, "ours_tokens_per_s": ours_tokens / t_ours,
           "hf_tokens_per_s": hf_tokens / t_hf, "ours_wall_s": t_ours, "hf_wall_s": t_hf}
    row["ratio"] = row["ours_tokens_per_s"] / row["hf_tokens_per_s"]
    print(f"end to end, {n_records} records at batch {batch}: infer.py {row['ours_tokens_per_s']:.1f} tok/s "
          f"({t_ours:.1f} s)  HF {row['hf_tokens_per_s']:.1f} tok/s ({t_hf:.1f} s)  ratio x{row['ratio']:.2f}",
          flush=True)
    return row


if __name__ == "__main__":
    import fire

    fire.Fire(main)
