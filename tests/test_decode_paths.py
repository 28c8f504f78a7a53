"""The decode fast paths (issue 22, items 6-8) give the tokens of the plain paths: the read-back that
overlaps the next block, stop strings looked at only after tokens that could end one, top-k sampling
without sorting the vocabulary, and the prompt prefilled once for its --num_samples rows."""
import dataclasses
import os
import shutil

import pytest
import torch

from engine.infer import generation as g
from engine.text.tokenizer import load_tokenizer
from tests.helpers import save_hf

PROMPTS = ["What is 1 + 2 ?", "Tom has 3 apples.", "What is 48 + 17 ? Let's think step by step, first add the ones",
           "A", "Mary buys 12 books and sells 5 . How many books are left ?", "What is 999 * 12 ?",
           "The answer is (A) bank", "2 + 2", "Sam walks 4 miles each day for 6 days ."]
SAMPLED = g.SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=40, seed=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    """(our model, HF's, tokenizer, encoded prompts, its directory) of one random Mistral (GQA, sliding window)."""
    from engine.checkpoint import load_for_inference
    from engine.runtime import distributed

    distributed.setup(tp_size=1, device="cpu", own=False)
    path = tmp_path_factory.mktemp("decode") / "mistral"
    hf = save_hf("mistral", str(path), seed=3, vocab_size=320).eval()
    shutil.copy(tiny_tokenizer, path / "tokenizer.model")
    model = load_for_inference(str(path), None, torch.float32, "cpu")[0].eval()
    tok = load_tokenizer(str(path))
    return model, hf, tok, [tok.encode(p) for p in PROMPTS], str(path)


def _run(model, prompts, params, runner, stop_ids=(), stop_strings=None, slots=3, **kw):
    reqs = [g.Request(i, p, g.request_seed(params.seed, i)) for i, p in enumerate(prompts)]
    return sorted((c.key, c.tokens, c.finish) for c in g.generate_stream(model, reqs, params, slots, stop_ids,
                                                                           stop_strings, runner=runner, **kw))


def _peaked_and_flat_logits(gen, rows=4096, vocab=320):
    """Rows of peaked to flat logits, every other row rounded to bf16 as a bf16 model's are (equal
    logits, so equal probabilities, in the nucleus and at the top-k boundary)."""
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.3, 6.0, rows)[:, None]
    logits[::2] = logits[::2].bfloat16().float()
    return logits


def _full_sort_choice(logits, params, seeds, draws):
    """choose_tokens as it was: the whole vocabulary sorted, the tail past top_k zeroed."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # equal ones by token id
    if params.top_k:
        sorted_probs[:, params.top_k:] = 0.0
    if params.top_p < 1.0:
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= params.top_p, 0.0)
    cdf = sorted_probs.cumsum(-1)
    u = g.uniform(seeds, draws).to(cdf.dtype)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (40, 0.9), (40, 0.3), (300, 0.95), (320, 1.0),
                                         (1000, 0.8), (0, 0.9)])
def test_top_k_sampling_without_the_full_sort_draws_the_same_tokens(top_k, top_p):
    """The k most likely tokens (most_likely) give the token the sorted vocabulary gives, draw for draw
    (4,096 rows of peaked and flat distributions, half of them with bf16's equal logits; top_k past
    the vocabulary too)."""
    gen = torch.Generator().manual_seed(top_k)
    logits = _peaked_and_flat_logits(gen)
    seeds = torch.randint(0, 1 << 31, (4096,), generator=gen)
    draws = torch.randint(0, 500, (4096,), generator=gen)
    params = g.SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    got = g.choose_tokens(logits, params, seeds, draws)
    assert torch.equal(got, _full_sort_choice(logits, params, seeds, draws))
    assert len(set(got.tolist())) > 20


@pytest.mark.parametrize("bound,top_p", [(8, 0.9), (40, 0.95), (100, 0.5), (320, 0.99)])
def test_top_p_bound_draws_the_full_sorts_token_wherever_its_tokens_hold_top_p(bound, top_p):
    """--top_p_bound B: among the B most likely tokens (torch.topk) the draw is the full sort's wherever
    they hold top_p of the mass; `short` marks exactly the other rows (the B tokens' mass from the full
    sort), and there the token is one of the B (4,096 rows of peaked and flat distributions, half of
    them with bf16's equal logits)."""
    gen = torch.Generator().manual_seed(bound)
    logits = _peaked_and_flat_logits(gen)
    seeds = torch.randint(0, 1 << 31, (4096,), generator=gen)
    draws = torch.randint(0, 500, (4096,), generator=gen)
    params = g.SamplingParams(temperature=0.8, top_p=top_p, top_p_bound=bound)
    short = torch.ones(4096, dtype=torch.bool)
    got = g.choose_tokens(logits, params, seeds, draws, short)
    exact = _full_sort_choice(logits, params, seeds, draws)
    probs, order = torch.softmax(logits / 0.8, -1).sort(dim=-1, descending=True, stable=True)
    assert torch.equal(short, probs[:, :bound].cumsum(-1)[:, -1] < top_p)
    assert torch.equal(got[~short], exact[~short])
    assert (got[:, None] == order[:, :bound]).any(-1).all()
    assert (0 < short.sum() < 4096) if bound < 320 else not short.any()


def test_top_p_bound_counts_the_draws_it_cut_in_generation(tiny):
    """In generation the tokens whose draw's nucleus the bound cut are counted, those of the outputs
    only (in 4 slots, eager and static steps, as in 1 slot: idle slots and throw-away tokens do not
    count); a bound of the whole vocabulary cuts none and gives the exact tokens."""
    model, _, tok, prompts, _ = tiny
    exact = g.SamplingParams(max_new_tokens=12, temperature=0.2, top_p=0.9, seed=4)  # a third of the draws cut
    reqs = [g.Request(i, p, g.request_seed(4, i)) for i, p in enumerate(prompts)]
    runs, stops = {}, g.StopStrings(tok, ["e"])  # rows end at different steps
    for bound in (16, 320):
        params = dataclasses.replace(exact, top_p_bound=bound)
        for name, runner, slots in (("eager", g.EagerSteps(model), 4), ("static", g.StaticSteps(model, 3, 4), 4),
                                    ("one slot", g.EagerSteps(model), 1)):
            stats = {}
            done = sorted((c.key, c.tokens) for c in g.generate_stream(model, reqs, params, slots, [tok.eos_id],
                                                                       stops, runner=runner, stats=stats))
            runs[bound, name] = done, stats["top_p_cut"]
    want = sorted((c.key, c.tokens) for c in g.generate_stream(model, reqs, exact, 4, [tok.eos_id], stops,
                                                                runner=g.EagerSteps(model)))
    assert runs[320, "eager"] == runs[320, "static"] == (want, 0)
    assert runs[16, "eager"] == runs[16, "static"] == runs[16, "one slot"]
    cut, (outputs, counted) = 0, runs[16, "eager"]
    for (i, out) in outputs:  # each kept token's distribution again, from one forward over its sequence
        seq = torch.tensor([prompts[i] + out[:-1]])
        with torch.no_grad():
            probs = torch.softmax(model(seq)[0, len(prompts[i]) - 1:].float() / 0.2, -1)
        cut += int((probs.topk(16, -1).values.sum(-1) < 0.9).sum())
    assert counted == cut and 0 < cut < sum(len(t) for _, t in outputs) and outputs != want
    assert len({len(t) for _, t in outputs}) > 2


def test_stop_strings_are_looked_for_only_after_tokens_that_could_end_one(tiny):
    """Sampled runs with stop strings of every kind (a space at either end, a digit, a word, a letter)
    finish every row where looking after every token does, with far fewer tails decoded."""
    model, _, tok, prompts, _ = tiny
    stops = ["e ", " t", "3", "the", "a", ".", "?"]
    for strings in ([s] for s in stops):
        params = g.SamplingParams(max_new_tokens=40, temperature=1.2, seed=len(strings[0]))
        every, filtered = g.StopStrings(tok, strings), g.StopStrings(tok, strings)
        every.could_end = lambda token: True
        calls = []
        hit = filtered.hit
        filtered.hit = lambda out: calls.append(1) or hit(out)
        runs = [_run(model, prompts, params, g.EagerSteps(model), [tok.eos_id], s) for s in (every, filtered)]
        assert runs[0] == runs[1], strings
        n_tokens = sum(len(t) for _, t, _ in runs[0])
        assert sum(f == "stop" for *_, f in runs[0]) >= 2, strings
        assert len(calls) < n_tokens * 0.75, strings


@pytest.mark.parametrize("params", [g.SamplingParams(max_new_tokens=20), SAMPLED], ids=["greedy", "sampled"])
def test_overlapped_read_back_gives_the_tokens_of_the_plain_loop(tiny, params):
    """Static-shape blocks of 3 steps with the next block queued before the last is read (rows that
    stop decode a block more, free rows are refilled a block later) give the tokens of the same blocks
    without overlap and of the eager step-by-step loop: 9 prompts in 3 slots (refills), a stop string
    met inside a block, EOS, and the length limit."""
    model, _, tok, prompts, _ = tiny
    plain = _run(model, prompts, params, g.EagerSteps(model))
    stop = tok.decode(max(plain, key=lambda r: len(r[1]))[1][:8])[-2:]
    runs = {}
    for name, runner in (("eager", g.EagerSteps(model)),
                         ("blocks", g.StaticSteps(model, sync_every=3, first_bucket=4, overlap=False)),
                         ("overlap", g.StaticSteps(model, sync_every=3, first_bucket=4))):
        runs[name] = _run(model, prompts, params, runner, [tok.eos_id], g.StopStrings(tok, [stop]))
    assert runs["overlap"] == runs["eager"] and runs["blocks"] == runs["eager"]
    assert {f for *_, f in runs["eager"]} == {"stop", "length"}


@pytest.mark.parametrize("params", [g.SamplingParams(max_new_tokens=16), SAMPLED], ids=["greedy", "sampled"])
def test_samples_of_a_prompt_share_one_prefill_and_one_copy_of_its_keys(tiny, params, monkeypatch):
    """4 samples of each of 9 prompts (request seeds as infer.py draws them; a stop string ends rows at
    different steps) in 6 slots: each prompt prefilled once into a shared prompt segment of 4 rows
    (refills wait for a free one) and read there by its samples gives the tokens of prefilling every
    copy into its own row, eager and overlapped static steps (and --decode_attention ragged, dense
    with a segment), with about a quarter of the prompt tokens prefilled and a cache of 6 x new
    tokens + 4 x the longest prompt slots a layer instead of 6 x both; some rows join a prompt
    prefilled by an earlier refill (its logits kept)."""
    model, _, tok, prompts, _ = tiny
    reqs = [g.Request((i, k), p, g.request_seed(params.seed, i, k)) for i, p in enumerate(prompts) for k in range(4)]
    longest = max(map(len, prompts))
    max_len = longest + params.max_new_tokens
    assert g.prompt_layout(reqs, 6) == (4, longest) and g.prompt_layout(reqs[::4], 6) is None
    mixed = reqs[:4] + [g.Request(i, [3, i]) for i in range(20)]  # one prompt 4 times among 20 single ones
    few = reqs[:8] + reqs[20:22]  # 3 prompts, 10 requests: rows for 2 x 6 / 3.3, but 3 prompts only
    assert g.prompt_layout(mixed, 6) is None and g.prompt_layout(few, 6) == (3, max(len(r.prompt) for r in few))
    joined, prefill = [], g.Batcher.prefill

    def watched(self, rows, group):
        if self.prompts is not None:
            joined.extend(r for r in group if tuple(r.prompt) in self.prompts.of)
        prefill(self, rows, group)

    monkeypatch.setattr(g.Batcher, "prefill", watched)
    runs, prefilled, kv = {}, {}, {}
    for share in (False, True):
        for name, runner in (("eager", g.EagerSteps(model)), ("static", g.StaticSteps(model, 3, 4))):
            batcher = g.Batcher(model, runner, params, 6, max_len, [tok.eos_id], g.StopStrings(tok, ["r"]),
                                share_prompts=share)
            runs[share, name] = sorted((c.key, c.tokens, c.finish) for c in batcher.run(reqs))
            prefilled[share, name], kv[share, name] = batcher.prefilled, batcher.cache.nbytes()
            assert (batcher.cache.prompts is not None) == share
    try:  # ragged attention reads one cache row per row: with a prompt segment it is the dense read
        model.decode_attention("ragged")
        batcher = g.Batcher(model, g.EagerSteps(model), params, 6, max_len, [tok.eos_id], g.StopStrings(tok, ["r"]))
        runs["ragged"] = sorted((c.key, c.tokens, c.finish) for c in batcher.run(reqs))
    finally:
        model.decode_attention("dense")
    assert all(run == runs[False, "eager"] for run in runs.values())
    assert prefilled[False, "eager"] == 4 * sum(map(len, prompts))
    assert prefilled[True, "eager"] <= 0.35 * prefilled[False, "eager"]
    slot = kv[False, "eager"] // (6 * max_len)
    assert kv[True, "eager"] == slot * (6 * params.max_new_tokens + 4 * longest)
    assert joined, "no row joined a prompt prefilled earlier"
    if params.temperature:
        assert all(len({tuple(t) for (i, _), t, _ in runs[True, "eager"] if i == j}) > 1 for j in range(9))


def test_a_prompt_segment_keeps_its_shape_from_call_to_call(tiny):
    """Calls of the same slots and max_len (the on-policy sampler's, step after step) with other
    prompts, 2 samples each, reuse the runner's cache (and so its captured graphs): the segment is as
    wide as max_len leaves a prompt, not as the call's longest prompt."""
    model, _, tok, prompts, _ = tiny
    runner, params, caches = g.StaticSteps(model, 3, 4), g.SamplingParams(max_new_tokens=6), []
    for batch in (prompts[:3], prompts[3:6]):
        assert max(map(len, batch)) < 34
        reqs = [g.Request((i, k), p, k) for i, p in enumerate(batch) for k in range(2)]
        assert len(list(g.Batcher(model, runner, params, 4, 40, [tok.eos_id]).run(reqs))) == 6
        caches.append(runner.cache)
    assert caches[0] is caches[1] and caches[0].prompts.max_len == 34


def test_eager_decode_reads_each_prompt_row_once_not_a_copy_per_row(tiny):
    """An eager decode step over rows sharing a prompt segment (rows in no order of their prompt, groups
    of 1-4 rows, a prompt row nobody reads, prompts of 0 to all of the segment's slots) scores each
    prompt row for its rows at once: the logits of copying each row's prompt block out for it (what a
    static-shape step does), and no tensor of the step is as large as such a copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _, _, _, _ = tiny
    rows, width, own, n_kv, head_dim = 9, 24, 6, model.args.local_kv_heads(1), model.args.head_dim
    cache = model.new_cache(rows, own, prompts=(5, width))
    gen = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v + cache.prompts.k + cache.prompts.v:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.prompt_of.copy_(torch.tensor([3, 0, 3, 4, 0, 3, 1, 3, 4]))  # prompt row 2 unused; row 3 four times
    cache.prompt_len.copy_(torch.tensor([20, 24, 20, 0, 24, 20, 7, 20, 0]))
    positions = (cache.prompt_len + torch.tensor([5, 2, 0, 5, 3, 4, 1, 5, 2]))[:, None]
    tokens = torch.randint(3, model.args.vocab_size, (rows, 1), generator=gen)

    class Largest(TorchDispatchMode):  # the largest block of prompt keys or values [..., width, head_dim] made
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and tuple(t.shape[-2:]) == (width, head_dim):
                    self.numel = max(self.numel, t.numel())
            return out

    with torch.no_grad():
        with model.static_shapes(), Largest() as copied:
            want = model(tokens, positions=positions, cache=cache, kv_len=own)
        with Largest() as grouped:
            got = model(tokens, positions=positions, cache=cache, kv_len=own)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    copy = rows * n_kv * width * head_dim  # one row's prompt block, for every row
    assert copied.numel == copy and grouped.numel == 4 * n_kv * width * head_dim  # the 4 prompt rows read


@pytest.mark.parametrize("window,block", [(None, 64), (None, 4), (6, 4), (5, 3)])
def test_ragged_decode_attention_equals_the_dense_read(window, block):
    """Each row reading only its live blocks (GQA, rows at positions 0 .. past several blocks, a cache
    whose length is no multiple of the block, a sliding window) gives the dense masked attention."""
    from models.transformer import attention_mask, grouped_attention, ragged_decode_attention

    gen = torch.Generator().manual_seed(block)
    keys, values = torch.randn(7, 2, 29, 8, generator=gen), torch.randn(7, 2, 29, 8, generator=gen)
    q = torch.randn(6, 6, 1, 8, generator=gen)
    positions = torch.tensor([0, 3, 4, 17, 28, 11])
    dense = grouped_attention(q, keys[:6], values[:6], attention_mask(positions[:, None], torch.arange(29), window))
    ragged = ragged_decode_attention(q, keys, values, positions, window, block)
    assert torch.allclose(ragged, dense, atol=1e-5, rtol=1e-5)


def test_ragged_and_fused_decode_attention_give_hf_greedy_tokens_through_infer(tiny, tmp_path):
    """infer.py --decode_attention ragged and fused (its torch twin on the CPU) write HF generate()'s
    greedy tokens (batched, left-padded) and the dense path's sampled ones, refills and a sliding
    window of 8 included; a bad value is refused."""
    import json

    import infer
    from engine.runtime.errors import UserError

    model, hf, tok, prompts, path = tiny
    width = max(map(len, prompts))
    ids, mask = torch.full((len(prompts), width), 3), torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=3)[:, width:].tolist()
    ref = [row[: row.index(tok.eos_id) + 1] if tok.eos_id in row else row for row in gen]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS))
    flags = dict(ckpt_dir=path, data_file=str(data), template="none", batch_size=3, max_new_tokens=14,
                 output_tokens=True, progress=False)
    import models.decode_kernels as dk
    import models.transformer as tf

    runs, calls = {}, []
    with pytest.MonkeyPatch.context() as spy:  # each kind's own path runs: the flag is not ignored
        for module, name in ((tf, "ragged_decode_attention"), (dk, "reference")):
            real = getattr(module, name)
            spy.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
        for name, kw in (("greedy", {}), ("sampled", dict(temperature=0.9, top_p=0.9, seed=2))):
            for kind in ("dense", "ragged", "fused"):
                out = tmp_path / f"{name}-{kind}.jsonl"
                calls.clear()
                infer.generate(**flags, **kw, decode_attention=kind, output_file=str(out))
                runs[name, kind] = [json.loads(line)["tokens"] for line in open(out)]
                assert set(calls) == {"dense": set(), "ragged": {"ragged_decode_attention"},
                                      "fused": {"reference"}}[kind], (kind, set(calls))
    model.decode_attention("dense")
    assert runs["greedy", "ragged"] == ref and runs["greedy", "dense"] == ref and runs["greedy", "fused"] == ref
    assert runs["sampled", "ragged"] == runs["sampled", "dense"] == runs["sampled", "fused"] != ref
    with pytest.raises(UserError, match="--decode_attention must be auto, dense, ragged or fused, got 'sparse'"):
        infer.generate(**flags, decode_attention="sparse", output_file=str(tmp_path / "bad.jsonl"))


def test_a_decode_block_copies_no_tokens_between_its_steps(tiny):
    """The steps of a block write their tokens into the slots' ring themselves: outside its steps a
    block dispatches the same few operations whether it runs 6 steps or 5 (the ring's counter reset
    and the one copy of its tokens), not a copy per step, and its tokens are those of the eager loop."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _, tok, prompts, _ = tiny
    params = g.SamplingParams(max_new_tokens=12)
    runner = g.StaticSteps(model, sync_every=6, first_bucket=4, overlap=False)
    outside, inside = [], [False]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and not func.is_view:
                outside.append(func)
            return func(*args, **(kwargs or {}))

    run = runner.run

    def counted(step, m, kv_len):
        inside[0] = True
        try:
            run(step, m, kv_len)
        finally:
            inside[0] = False

    runner.run = counted
    batcher = g.Batcher(model, runner, params, 3, 64, [tok.eos_id])
    decode_block = batcher.decode_block

    def block(live):
        outside.clear()
        with Count():
            decode_block(live)
        blocks.append(list(outside))

    blocks = []
    batcher.decode_block = block
    got = sorted((c.key, c.tokens, c.finish) for c in batcher.run(
        [g.Request(i, p) for i, p in enumerate(prompts[:3])]))
    assert got == _run(model, prompts[:3], params, g.EagerSteps(model), [tok.eos_id])
    assert len(blocks) == 2 and blocks[0] == blocks[1] and len(blocks[0]) <= 3, blocks
    assert blocks[0].count(torch.ops.aten.cat.default) == 1


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Triton kernels run by Triton's CPU interpreter (the kernel code itself, not its torch twin);
    conftest.py set TRITON_INTERPRET=1 before anything imported triton."""
    import triton  # noqa: F401  (requirements-ci.txt)

    from models import decode_kernels

    if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py: a GPU is visible
        pytest.skip("a GPU is visible: Triton compiles the kernels for it here (tests/test_cuda.py, bench/gpu_check.py)")
    monkeypatch.setattr(decode_kernels, "CPU_KERNEL", True)


def _decode_inputs(gen, rows, n_kv, group, head_dim, max_len, dtype):
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    angles = torch.rand(rows, head_dim // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    return (rand(rows, n_kv * group, head_dim), rand(rows, n_kv, head_dim), rand(rows, n_kv, head_dim), cos, sin,
            rand(rows + 2, n_kv, max_len, head_dim), rand(rows + 2, n_kv, max_len, head_dim))


@pytest.mark.parametrize("rows,n_kv,group,head_dim,max_len,kv_len,window,dtype", [
    (3, 2, 2, 16, 40, 40, None, torch.float32),  # one block, GQA
    (2, 1, 1, 8, 200, 130, None, torch.float32),  # head_dim under 16 (padded), a cache longer than the bucket
    (4, 2, 4, 32, 300, 256, 50, torch.float32),  # sliding window across pieces
    (5, 8, 1, 64, 700, 640, None, torch.float32),  # several pieces per row (split-K, merged), plain MHA
    (2, 2, 4, 32, 1100, 1024, 300, torch.float32),  # 16 pieces, a window spanning several
    (3, 2, 3, 16, 100, 70, 7, torch.bfloat16),  # a group of 3 (padded), bf16 cache
])
def test_fused_decode_kernel_is_its_torch_twin(triton_interpreter, rows, n_kv, group, head_dim, max_len, kv_len,
                                               window, dtype):
    """The Triton kernel (RoPE, cache write, attention over each row's live slots, in one piece or in
    pieces merged by log-sum-exp) computes what its twin computes, for rows at position 0, mid-block and at the bucket's
    last slot: the same output and the same cache, with the rows past the batch untouched."""
    from models import decode_kernels as dk

    gen = torch.Generator().manual_seed(kv_len)
    q, k, v, cos, sin, k_cache, v_cache = _decode_inputs(gen, rows, n_kv, group, head_dim, max_len, dtype)
    positions = torch.randint(0, kv_len, (rows,), generator=gen)
    positions[0], positions[-1] = kv_len - 1, 0
    caches = (k_cache.clone(), v_cache.clone())
    got = dk.triton_decode_attention(q, k, v, cos, sin, k_cache, v_cache, positions, window, kv_len)
    want = dk.reference(q, k, v, cos, sin, *caches, positions, window, kv_len)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol
    assert torch.equal(v_cache, caches[1])
    assert torch.allclose(k_cache.float(), caches[0].float(), atol=tol, rtol=tol)
    if dtype == torch.float32:
        assert torch.equal(k_cache, caches[0])


@pytest.mark.parametrize("rows,width,own_len,kv_len,window,dtype", [
    (4, 40, 30, 20, None, torch.float32),  # one piece: prompt and own slots in one block
    (5, 300, 500, 448, None, torch.float32),  # pieces across the prompt's end, merged
    (3, 130, 90, 64, 50, torch.float32),  # a sliding window reaching back into the prompt or not
    (3, 70, 40, 33, None, torch.bfloat16),
])
def test_fused_decode_kernel_reads_a_shared_prompt_segment(triton_interpreter, rows, width, own_len, kv_len, window,
                                                           dtype):
    """Rows reading their prompt from a shared segment (2 prompt rows for `rows` rows; prompts of 0, 1,
    a block's worth and the whole width) and the rest from their own slots: the twin gives the plain
    twin's attention over the same keys laid out in one row (prompt, then own slots), and the kernel
    gives the twin's output and cache; the prompt segment is not written."""
    from models import decode_kernels as dk

    gen = torch.Generator().manual_seed(width)
    n_kv, group, head_dim = 2, 2, 16
    q, k, v, cos, sin, k_cache, v_cache = _decode_inputs(gen, rows, n_kv, group, head_dim, own_len, dtype)
    prompt_k, prompt_v = (torch.randn(2, n_kv, width, head_dim, generator=gen).to(dtype) for _ in range(2))
    prompt_of = torch.tensor([1, 0, 1, 0, 1][:rows])
    prompt_len = torch.tensor([width, 0, 1, min(64, width), width - 3][:rows])
    positions = prompt_len + torch.randint(0, kv_len, (rows,), generator=gen)
    positions[0] = prompt_len[0] + kv_len - 1
    shared = (prompt_k.clone(), prompt_v.clone(), prompt_of, prompt_len)
    caches = (k_cache.clone(), v_cache.clone())
    want = dk.reference(q, k, v, cos, sin, *caches, positions, window, kv_len, *shared)
    flat = [torch.zeros(rows, n_kv, width + own_len, head_dim, dtype=dtype) for _ in range(2)]
    for b in range(rows):  # the same keys in one row: prompt at [0, plen), own slot s at plen + s
        n = int(prompt_len[b])
        for f, pc, oc in zip(flat, (prompt_k, prompt_v), (k_cache, v_cache)):
            f[b, :, :n], f[b, :, n:n + own_len] = pc[prompt_of[b], :, :n], oc[b]
    plain = dk.reference(q, k, v, cos, sin, *flat, positions, window, int(positions.max()) + 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((plain.float() - want.float()).norm() / want.float().norm()).item() < tol
    got = dk.triton_decode_attention(q, k, v, cos, sin, k_cache, v_cache, positions, window, kv_len,
                                     prompt_k, prompt_v, prompt_of, prompt_len)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol
    assert torch.equal(v_cache, caches[1]) and torch.equal(prompt_k, shared[0]) and torch.equal(prompt_v, shared[1])
    assert torch.allclose(k_cache.float(), caches[0].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("rows,k_in,n_out,extra,glu,dtype", [
    (1, 40, 37, ("norm",), False, torch.float32),  # RMSNorm prologue; sizes off the blocks
    (3, 300, 200, ("norm", "bias"), False, torch.float32),  # q/k/v with a bias (Qwen)
    (4, 130, 70, ("residual",), True, torch.float32),  # SwiGLU prologue, residual epilogue
    (2, 256, 4100, ("residual",), False, torch.float32),  # the wider output blocks
    (3, 200, 64, ("norm", "bias"), False, torch.bfloat16),
    (2, 200, 64, ("residual",), True, torch.bfloat16),
])
def test_fused_projection_kernel_is_its_torch_twin(triton_interpreter, rows, k_in, n_out, extra, glu, dtype):
    """The decode projection kernel (a few rows; RMSNorm or SwiGLU before it, bias and residual after)
    computes what its twin computes, every output written."""
    from models import decode_kernels as dk

    gen = torch.Generator().manual_seed(k_in)
    x = torch.randn(rows, 2 * k_in if glu else k_in, generator=gen).to(dtype)
    weight = (torch.randn(n_out, k_in, generator=gen) / k_in ** 0.5).to(dtype)
    kw = {"norm_weight": torch.rand(k_in, generator=gen).to(dtype) + 0.5 if "norm" in extra else None,
          "bias": torch.randn(n_out, generator=gen).to(dtype) if "bias" in extra else None,
          "residual": torch.randn(rows, n_out, generator=gen).to(dtype) if "residual" in extra else None}
    got = dk.triton_linear(x, weight, **kw, glu=glu)
    want = dk.linear_reference(x, weight, **kw, glu=glu)
    assert got.shape == want.shape == (rows, n_out) and got.dtype == want.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


@pytest.mark.parametrize("rows,top_k,n_experts,k_in,n_out,dtype", [
    (1, 2, 8, 40, 37, torch.float32),  # batch 1, sizes off the blocks
    (3, 2, 4, 130, 70, torch.float32),
    (4, 1, 3, 256, 4100, torch.float32),  # one expert a row, the wider output blocks
    (2, 3, 5, 200, 64, torch.bfloat16),
])
def test_expert_projection_kernel_is_its_torch_twin(triton_interpreter, rows, top_k, n_experts, k_in, n_out, dtype):
    """The MoE decode kernel computes its twin's result, and the twin what a loop over each row's
    chosen experts computes with the plain projection's twin: the gate/up projections of the RMSNorm of
    each row (one output a choice), and the down projections of each choice's SwiGLU product,
    weighted by the router and summed with the residual (one output a row)."""
    from models import decode_kernels as dk

    gen = torch.Generator().manual_seed(k_in)
    weights = (torch.randn(n_experts, n_out, k_in, generator=gen) / k_in ** 0.5).to(dtype)
    chosen = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(rows)])
    coeffs = torch.softmax(torch.randn(rows, top_k, generator=gen), -1)
    norm_weight = torch.rand(k_in, generator=gen).to(dtype) + 0.5
    x_norm = torch.randn(rows, k_in, generator=gen).to(dtype)
    x_glu = torch.randn(rows * top_k, 2 * k_in, generator=gen).to(dtype)
    residual = torch.randn(rows, n_out, generator=gen).to(dtype)
    per_choice = [(r, j, int(chosen[r, j])) for r in range(rows) for j in range(top_k)]
    loop_up = torch.cat([dk.linear_reference(x_norm[r:r + 1], weights[e], norm_weight=norm_weight)
                         for r, _, e in per_choice])
    down_of = {(r, j): dk.linear_reference(x_glu[r * top_k + j:r * top_k + j + 1], weights[e], glu=True).float()
               for r, j, e in per_choice}
    loop_down = torch.cat([sum(coeffs[r, j] * down_of[r, j] for j in range(top_k)) + residual[r].float()
                           for r in range(rows)]).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for kw, loop in ((dict(x=x_norm, norm_weight=norm_weight), loop_up),
                     (dict(x=x_glu, coeffs=coeffs, residual=residual, glu=True), loop_down)):
        got = dk.triton_expert_linear(weights=weights, chosen=chosen, **kw)
        want = dk.expert_linear_reference(weights=weights, chosen=chosen, **kw)
        assert got.shape == want.shape == loop.shape and got.dtype == want.dtype == dtype
        for a, b in ((got, want), (want, loop)):
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tol


@pytest.mark.parametrize("rows,top_k,n_experts,dtype", [(1, 2, 8, torch.float32), (5, 2, 8, torch.float32),
                                                        (64, 2, 8, torch.float32), (33, 3, 4, torch.float32),
                                                        (7, 1, 8, torch.float32), (64, 2, 8, torch.bfloat16)])
def test_grouped_experts_are_the_experts_one_by_one(rows, top_k, n_experts, dtype):
    """The static MoE's grouped route (two grouped matmuls over the (row, choice) pairs sorted by
    expert) is each chosen expert run on its rows, weighted and summed; experts no row chose (batch 1
    leaves 6 of 8) and experts chosen by many rows included."""
    from models.transformer import experts_one_by_one, grouped_experts

    gen = torch.Generator().manual_seed(rows * 10 + top_k)
    dim, local = 32, 24
    x = torch.randn(rows, dim, generator=gen).to(dtype)
    gate_up = (torch.randn(n_experts, 2 * local, dim, generator=gen) / dim ** 0.5).to(dtype)
    down = (torch.randn(n_experts, dim, local, generator=gen) / local ** 0.5).to(dtype)
    chosen = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=gen).softmax(-1)
    got = grouped_experts(x, weights, chosen, gate_up, down)
    want = experts_one_by_one(x, weights, chosen, gate_up, down)
    assert got.dtype == dtype and got.shape == (rows, dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol), (got.float() - want).abs().max()


def test_grouped_route_only_where_the_grouped_matmul_needs_no_host(monkeypatch):
    """CUTLASS's grouped matmul (bf16, SM90 / SM100, 16-byte aligned rows) and the CPU's take the
    grouped route; elsewhere on a GPU torch's fallback copies the offsets to the host (no capture)."""
    from types import SimpleNamespace

    from models.transformer import grouped_matmul_runs_on

    def stacked(device="cuda", dtype=torch.bfloat16, local=48, dim=64):
        return (SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(8, 2 * local, dim)),
                SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(8, dim, local)))

    for major, runs in ((9, True), (10, True), (8, False), (12, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert grouped_matmul_runs_on(*stacked()) is runs, major
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not grouped_matmul_runs_on(*stacked(dtype=torch.float16))
    assert not grouped_matmul_runs_on(*stacked(dtype=torch.float32))
    assert not grouped_matmul_runs_on(*stacked(local=44))  # the down projection's rows of 44: not aligned
    assert not grouped_matmul_runs_on(*stacked(dim=60))
    assert grouped_matmul_runs_on(*stacked(device="cpu", dtype=torch.float32, local=5, dim=7))
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert not grouped_matmul_runs_on(*stacked())


def test_a_grouped_matmul_that_fails_its_check_keeps_the_every_expert_route(tmp_path, monkeypatch, capsys):
    """The grouped route's first use on a device checks it against the loop over the experts; one that
    raises, or computes something else, is not used, and one line says why."""
    import torch.nn.functional as F

    from engine.checkpoint import load_for_inference
    from engine.runtime import distributed
    from models import compiled, transformer

    distributed.setup(tp_size=1, device="cpu", own=False)
    save_hf("mixtral", str(tmp_path), seed=4, vocab_size=320)
    real = F.grouped_mm
    for broken, why in ((lambda *a, **kw: 1.01 * real(*a, **kw), "differs from a loop over the experts"),
                        (lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no kernel")), "failed (no kernel)")):
        model = load_for_inference(str(tmp_path), None, torch.float32, "cpu", tokenizer=False)[0].eval()
        moe = model.layers[0].feed_forward
        assert transformer.grouped_check(*moe.stacked, moe.top_k) is None
        monkeypatch.setattr(compiled, "_SAID", set())
        with monkeypatch.context() as patch:
            patch.setattr(F, "grouped_mm", broken)
            with model.static_shapes():
                assert not moe.grouped
            with model.static_shapes():  # checked once per device and dtype
                assert not moe.grouped
        assert capsys.readouterr().err.count(why) == 1
        with model.static_shapes():
            assert not moe.grouped  # the verdict stays for this model


def test_static_moe_routes_by_grouped_matmuls(tmp_path, monkeypatch):
    """Within static_shapes() (the step a CUDA graph captures) a loaded Mixtral's MoE layers run as two
    grouped matmuls, not every expert on every row, and give what the host-routed MoE.forward and the
    every-expert route give; where torch's grouped matmul would wait for the host (a GPU other than
    SM90 / SM100, or not bf16) the every-expert route stays."""
    from bench.decode_ops import count_step_ops
    from engine.checkpoint import load_for_inference
    from engine.runtime import distributed
    from models import transformer

    distributed.setup(tp_size=1, device="cpu", own=False)
    save_hf("mixtral", str(tmp_path), seed=4, vocab_size=320)
    model = load_for_inference(str(tmp_path), None, torch.float32, "cpu", tokenizer=False)[0].eval()
    moe = model.layers[0].feed_forward
    x = torch.randn(37, 1, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        host_routed = moe(x)
        with model.static_shapes():
            assert moe.grouped
            grouped = moe(x)
            moe.grouped = False
            every_expert = moe(x)
    assert not moe.grouped and not moe.static_shapes
    assert torch.allclose(grouped, host_routed, atol=1e-5) and torch.allclose(grouped, every_expert, atol=1e-5)
    n = len(model.layers)
    ops = count_step_ops(model, 6, 32)
    assert ops["aten._grouped_mm"] == 2 * n and ops["aten.silu"] == n, ops  # one SwiGLU a layer, not one an expert
    monkeypatch.setattr(transformer, "grouped_matmul_runs_on", lambda *weights: False)
    ops = count_step_ops(model, 6, 32)
    assert "aten._grouped_mm" not in ops and ops["aten.silu"] == len(moe.experts) * n, ops


@pytest.mark.processes  # inductor starts compile workers
def test_compiled_static_moe_takes_the_grouped_route_in_bf16_only(tmp_path):
    """Compiled (the decode step torch.compile builds before a CUDA graph captures it), the static MoE
    takes the grouped route in bf16 (torch's compiled grouped matmul takes nothing else) and the
    every-expert route in fp32; both give the eager layer's output."""
    from torch._dynamo.utils import counters

    from engine.checkpoint import load_for_inference
    from engine.runtime import distributed

    distributed.setup(tp_size=1, device="cpu", own=False)
    save_hf("mixtral", str(tmp_path), seed=4, vocab_size=320)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        model = load_for_inference(str(tmp_path), None, dtype, "cpu", tokenizer=False)[0].eval()
        moe = model.layers[0].feed_forward
        x = torch.randn(16, 1, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
        torch._dynamo.reset()
        counters.clear()
        seen = []
        with torch.no_grad(), model.static_shapes():
            eager = moe(x)
            traced = torch.compile(moe, backend=lambda gm, inputs: seen.append(gm) or gm.forward)(x)
            torch._dynamo.reset()
            compiled = torch.compile(moe)(x)  # inductor
        ops = {str(n.target) for gm in seen for n in gm.graph.nodes if n.op == "call_function"}
        assert any("grouped_mm" in op for op in ops) == (dtype == torch.bfloat16), (dtype, ops)
        assert not counters["graph_break"], dict(counters["graph_break"])
        for out in (traced, compiled):
            assert torch.allclose(out.float(), eager.float(), atol=tol, rtol=tol), (out - eager).abs().max()


@pytest.mark.parametrize("params", [g.SamplingParams(max_new_tokens=12), SAMPLED], ids=["greedy", "sampled"])
def test_fused_moe_decode_reads_only_the_chosen_experts_and_gives_the_dense_tokens(tmp_path, tiny_tokenizer,
                                                                                   triton_interpreter, params):
    """A Mixtral decoding with --decode_attention fused (its kernels interpreted) runs each layer as
    the attention's three kernels and the MoE's router, top-k and two expert kernels, the experts'
    weights reached in place through their stacked copies, and gives the dense static path's tokens,
    which are HF's greedy tokens; no expert runs on its own. Where the rows' choices outnumber the
    experts, the layer runs as MoE.forward's grouped matmuls instead (static shapes)."""
    from bench.decode_ops import count_step_ops
    from engine.checkpoint import load_for_inference
    from engine.runtime import distributed
    from models.transformer import MoE

    distributed.setup(tp_size=1, device="cpu", own=False)
    hf = save_hf("mixtral", str(tmp_path), seed=4, vocab_size=320).eval()
    shutil.copy(tiny_tokenizer, tmp_path / "tokenizer.model")
    model = load_for_inference(str(tmp_path), None, torch.float32, "cpu")[0].eval()
    tok = load_tokenizer(str(tmp_path))
    prompts = [tok.encode(p) for p in PROMPTS[1:5]]
    moe = model.layers[0].feed_forward
    assert isinstance(moe, MoE) and moe.stacked[0].shape == (8, 2 * 48, 64)
    assert moe.experts[2].w3.weight.data_ptr() == moe.stacked[0][2, 48:].data_ptr()  # views: no copy
    want = _run(model, prompts, params, g.StaticSteps(model, 4, 4), [tok.eos_id])
    if params.temperature == 0:
        for prompt, (_, tokens, _) in zip(prompts, want):
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False)[0, len(prompt):]
            assert tokens == ref.tolist()[:len(tokens)]
    try:
        model.decode_attention("fused")
        ops = count_step_ops(model, 3, 32)
        got = _run(model, prompts, params, g.StaticSteps(model, 4, 4), [tok.eos_id])
        for layer in model.layers:  # 3 rows of 3 choices: more than the 8 experts: grouped matmuls instead
            layer.feed_forward.top_k = 3
        fallback = count_step_ops(model, 3, 32)
        assert "cot_distill.decode_expert_linear" not in fallback and fallback["aten._grouped_mm"] == 2 * len(model.layers)
    finally:
        model.decode_attention("dense")
        for layer in model.layers:
            layer.feed_forward.top_k = 2
    n = len(model.layers)
    assert ops["cot_distill.decode_expert_linear"] == 2 * n and ops["cot_distill.decode_linear"] == 3 * n
    assert ops["aten.topk"] == n and "aten.silu" not in ops, ops
    assert got == want


@pytest.mark.parametrize("params", [g.SamplingParams(max_new_tokens=12), SAMPLED], ids=["greedy", "sampled"])
def test_fused_decode_attention_gives_the_dense_tokens(tiny, triton_interpreter, params, monkeypatch):
    """Generation with --decode_attention fused, the Triton kernels themselves (interpreted: the
    attention, and each layer as five kernels) and their twin, eager and in static-shape blocks, gives
    the dense path's tokens (GQA, a sliding window of 8 that long prompts pass, refills); so do
    prompts requested twice, read from a shared prompt segment by the kernels, against the dense
    path without one."""
    from models import decode_kernels as dk

    model, _, tok, prompts, _ = tiny
    prompts, params = prompts[1:5], dataclasses.replace(params, max_new_tokens=10)
    want = _run(model, prompts, params, g.EagerSteps(model), [tok.eos_id])
    twice = prompts[1:4] * 2
    want_twice = _run(model, twice, params, g.EagerSteps(model), [tok.eos_id], share_prompts=False)
    runs, projections = {}, []
    real = dk.triton_linear
    monkeypatch.setattr(dk, "triton_linear", lambda *a, **kw: projections.append(1) or real(*a, **kw))
    try:
        model.decode_attention("fused")
        runs["kernel"] = _run(model, prompts, params, g.StaticSteps(model, 4, 4), [tok.eos_id])
        assert len(projections) >= 4 * len(model.layers) * params.max_new_tokens  # the five-kernel layers ran
        shared = g.StaticSteps(model, 4, 4)
        assert _run(model, twice, params, shared, [tok.eos_id], slots=4) == want_twice
        assert shared.cache.prompts is not None
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("models.decode_kernels.CPU_KERNEL", False)  # the CPU picks the twin
            runs["twin eager"] = _run(model, prompts, params, g.EagerSteps(model), [tok.eos_id])
            runs["twin static"] = _run(model, prompts, params, g.StaticSteps(model, 4, 4), [tok.eos_id])
    finally:
        model.decode_attention("dense")
    assert all(run == want for run in runs.values()), [name for name, run in runs.items() if run != want]
    assert max(len(p) + len(t) for p, (_, t, _) in zip(prompts, want)) > 8


@pytest.mark.processes  # inductor starts compile workers
def test_fused_decode_attention_updates_the_cache_in_place_when_compiled(inductor_cache):
    """Under torch.compile (inductor) the fused operation runs on the KV cache itself, not a copy of it
    (a copy would cost a cache's bytes per step), and the compiled step's result is the eager one."""
    from models import decode_kernels as dk

    seen = []
    twin = dk.reference

    def spy(q, k, v, cos, sin, k_cache, *rest):
        seen.append(k_cache.data_ptr())
        return twin(q, k, v, cos, sin, k_cache, *rest)

    def step(q, k, v, cos, sin, positions, caches):
        return 2 * dk.fused_decode_attention(q.sin(), k, v, cos, sin, caches[0], caches[1], positions, None, 16)

    gen = torch.Generator().manual_seed(0)
    q, k, v, cos, sin, k_cache, v_cache = _decode_inputs(gen, 2, 2, 2, 16, 32, torch.float32)
    positions = torch.tensor([3, 15])
    eager_caches = [k_cache.clone(), v_cache.clone()]
    want = step(q, k, v, cos, sin, positions, eager_caches)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dk, "reference", spy)
        got = torch.compile(step, backend="inductor")(q, k, v, cos, sin, positions, [k_cache, v_cache])
    assert seen == [k_cache.data_ptr()]
    assert torch.allclose(got, want, atol=1e-6) and torch.equal(k_cache, eager_caches[0])


def test_auto_decode_attention_takes_the_kernel_only_where_it_passes_its_check(tiny, triton_interpreter, monkeypatch,
                                                                               capsys):
    """--decode_attention auto: dense on the CPU; where the kernel runs (here: interpreted) fused, once
    it has matched its twin on random inputs of the model's heads; dense again, with the reason in one
    line, when the kernel computes something else (also: only when it reads a shared prompt segment)
    or fails."""
    from models import compiled, decode_kernels as dk

    model = tiny[0]
    kinds = lambda: {layer.attention.decode_kind for layer in model.layers}  # noqa: E731
    try:
        with pytest.MonkeyPatch.context() as cpu:
            cpu.setattr(dk, "CPU_KERNEL", False)
            model.decode_attention("auto")
            assert kinds() == {"dense"}
        model.decode_attention("auto")
        assert kinds() == {"fused"}
        real, real_experts = dk.triton_decode_attention, dk.triton_expert_linear
        for name, broken, why in (
                ("triton_decode_attention", lambda *a: real(*a) * 1.01, "differs from the torch twin's"),
                ("triton_decode_attention", lambda *a: real(*a) * (1.01 if len(a) > 10 else 1),  # with a segment
                 "differs from the torch twin's"),
                ("triton_decode_attention", lambda *a: 1 / 0, "ZeroDivisionError"),
                ("triton_expert_linear", lambda **kw: real_experts(**kw) * 1.01, "expert projection differs")):
            dk.kernel_check.cache_clear()
            monkeypatch.undo()
            monkeypatch.setattr(dk, "CPU_KERNEL", True)
            monkeypatch.setattr(dk, name, broken)
            monkeypatch.setattr(compiled, "_SAID", set())
            model.decode_attention("auto")
            assert kinds() == {"dense"} and why in capsys.readouterr().err
    finally:
        dk.kernel_check.cache_clear()
        model.decode_attention("dense")


def test_compiled_prefill_is_a_few_graphs_for_every_prompt_width(tiny):
    """The static runner's compiled prefill (dynamic shapes) gives the eager prefill's tokens for 9
    prompts of 2-19 tokens prefilled in groups of 1-3, in a few graphs (not one per width): one or
    two per kind of batch (a single prompt, several), within and beyond the sliding window."""
    import torch._dynamo

    from models.compiled import CompiledCall

    model, _, tok, prompts, _ = tiny
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    params = g.SamplingParams(max_new_tokens=6)
    runner = g.StaticSteps(model, 3, 4)
    runner.prefill_call = CompiledCall(g._prefill_logits, "prefill", dynamic=True, backend=counting)
    got = _run(model, prompts, params, runner, [tok.eos_id], refill_min=1)
    assert got == _run(model, prompts, params, g.EagerSteps(model), [tok.eos_id])
    assert runner.prefill_call.active and len({len(p) for p in prompts}) >= 8
    assert 1 <= len(graphs) <= 4, len(graphs)


def test_a_fused_decode_step_dispatches_five_operations_a_layer(tiny, triton_interpreter):
    """bench/decode_ops.py's count on the Mistral: a batch-1 (and a 3-row) decode step with
    --decode_attention fused dispatches five operations a layer (the five kernels), the dense one
    more than three times as many a layer."""
    from bench.decode_ops import count_step_ops

    model = tiny[0]
    try:
        for rows in (1, 3):
            model.decode_attention("fused")
            fused = count_step_ops(model, rows, 32)
            model.decode_attention("dense")
            dense = count_step_ops(model, rows, 32)
            n = len(model.layers)
            assert fused["cot_distill.decode_linear"] == 4 * n and fused["cot_distill.fused_decode_attention"] == n
            outside = sum(fused.values()) - 5 * n  # embedding, positions, final norm, head: the same on both
            assert (sum(dense.values()) - outside) / n > 3 * 5, (dense, fused)
    finally:
        model.decode_attention("dense")
