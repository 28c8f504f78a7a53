"""Computations shared by in-process (TP=1) tests and torchrun workers (TP=2)."""
import torch


@torch.no_grad()
def full_logits(model, tokens):
    return model(tokens).float()


@torch.no_grad()
def ragged_cached_logits(model, tokens, prompt_lens):
    """Prefill rows of different prompt lengths in one right-padded batch, then decode every row one
    token at a time from its own position through the KV cache. Returns [B, T, V] logits where row b
    is filled from position 0 to T-1 (prefill part up to prompt_lens[b], decode part after)."""
    bsz, total = tokens.shape
    out = torch.zeros(bsz, total, model.args.vocab_size)
    cache = model.new_cache(bsz, total)
    width = max(prompt_lens)
    prefill = model(tokens[:, :width], cache=cache).float()
    for b, n in enumerate(prompt_lens):
        out[b, :n] = prefill[b, :n]
    pos = torch.tensor(prompt_lens)
    rows = torch.arange(bsz)
    while int(pos.min()) < total:
        p = pos.clamp(max=total - 1)
        logits = model(tokens[rows, p][:, None], positions=p[:, None], cache=cache).float()
        for b in range(bsz):
            if pos[b] < total:
                out[b, pos[b]] = logits[b, 0]
        pos = pos + 1
    return out


@torch.no_grad()
def decode_paths(model, prompts, stop_ids, new_tokens, slots=3, fused=True):
    """Tokens of every decode path on the same prompts (more prompts than slots, so slots are
    refilled): the eager step; the static-shape step a CUDA graph captures (reading the back of the
    window of sync_every=3 steps, KV buckets from 4); and that step traced whole by Dynamo
    (fullgraph: no graph break, so no host sync or data-dependent shape inside it); the static step
    with every prompt requested twice (a shared prompt segment, 2 x the tokens); with `fused`,
    --decode_attention fused with its kernels interpreted."""
    import torch._dynamo

    from engine.infer import generation as g

    greedy = g.SamplingParams(max_new_tokens=new_tokens)
    sample = g.SamplingParams(max_new_tokens=new_tokens, temperature=0.9, top_p=0.9, top_k=40, seed=5)

    def static(**kw):
        return g.StaticSteps(model, sync_every=3, first_bucket=4, **kw)

    out = {}
    for name, params in (("greedy", greedy), ("sample", sample)):
        out[f"eager_{name}"] = g.complete_prompts(model, prompts, params, stop_ids, slots, runner=g.EagerSteps(model))
        out[f"static_{name}"] = g.complete_prompts(model, prompts, params, stop_ids, slots, runner=static())
    shared = static()  # each prompt twice: read from a shared prompt segment of the cache
    out["shared_greedy"] = g.complete_prompts(model, prompts * 2, greedy, stop_ids, slots, runner=shared)
    out["shared_segment"] = shared.cache.prompts is not None
    torch._dynamo.reset()
    runner = static(compiled=True, fullgraph=True, backend="eager")
    out["traced_greedy"] = g.complete_prompts(model, prompts, greedy, stop_ids, slots, runner=runner)
    out["traced_without_fallback"] = runner.step_call.active  # False when tracing failed and the step ran eagerly
    if fused:
        out.update(_fused_kernel_paths(model, prompts, stop_ids, slots, static, greedy))
    return out


def _fused_kernel_paths(model, prompts, stop_ids, slots, static, greedy) -> dict:
    """--decode_attention fused with the Triton kernels themselves, run by Triton's CPU interpreter
    (TRITON_INTERPRET=1 from tests/conftest.py, inherited by torchrun's workers): the static step,
    greedy (test_decode_paths.py samples with them)."""
    import os

    from engine.infer import generation as g
    from models import decode_kernels

    if os.environ.get("TRITON_INTERPRET") != "1" or not decode_kernels.triton_available():
        return {}
    saved, decode_kernels.CPU_KERNEL = decode_kernels.CPU_KERNEL, True
    try:
        model.decode_attention("fused")
        return {"fused_greedy": g.complete_prompts(model, prompts, greedy, stop_ids, slots, runner=static())}
    finally:
        decode_kernels.CPU_KERNEL = saved
        model.decode_attention("dense")


def head_loss_grads(seed: int = 0, rows: int = 5, cols: int = 9, dim: int = 16, vocab: int = 48):
    """Loss sum and gradients (hidden states, full head matrix) of the chunked head cross-entropy
    at several chunk sizes and of the plain path (full local logits, vocabulary-parallel CE), at the
    current tensor-parallel size. Hand-made inputs; labels include IGNORE and every vocabulary shard."""
    import torch.nn.functional as F

    from engine.text.sequences import IGNORE
    from models.parallel import copy_to_tp, gather_from_tp, vocab_shard_start
    from models.vocab_parallel import head_cross_entropy, token_cross_entropy

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, cols, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    labels = torch.randint(0, vocab, (rows, cols), generator=g)
    labels[0, :4] = IGNORE
    labels[3, -2:] = IGNORE
    from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size

    local = vocab // get_model_parallel_world_size()
    start = vocab_shard_start(local)
    out = {}
    from models.vocab_parallel import labelled_rows

    for name, chunk in (("chunk7", 7), ("chunk16", 16), ("chunk_all", rows * cols), ("labelled_rows", 5),
                        ("plain", None)):
        h = hidden.clone().requires_grad_()
        w = weight[start:start + local].clone().requires_grad_()
        if chunk is None:
            loss = token_cross_entropy(F.linear(copy_to_tp(h), w), labels)
        else:
            loss = head_cross_entropy(h, w, labels, chunk_rows=chunk,
                                      rows=labelled_rows(labels) if name == "labelled_rows" else None)
        loss.backward()
        out[name] = {"loss": float(loss), "grad_h": h.grad, "grad_w": gather_from_tp(w.grad.t().contiguous()).t()}
    return out
