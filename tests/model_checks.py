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
