"""Hand-made inputs for the teacher-KL objective, evaluated at the current tensor-parallel size (in
the test process, TP=1, or in tests/workers/kl_worker.py under torchrun, TP=2)."""
import torch


def kl_inputs(seed: int = 0, rows: int = 11, dim: int = 16, vocab: int = 48, k: int = 6):
    """Student hidden states and head, a teacher's hidden states and head (another width), and a
    sparse target: ids with unused slots (-1) and a repeated id, one row with no target at all."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    t_hidden = torch.randn(rows, dim + 4, generator=g)
    t_weight = torch.randn(vocab, dim + 4, generator=g) * 0.5
    ids = torch.randint(0, vocab, (rows, k), generator=g)
    ids[0, 3:] = -1
    ids[1, 1] = ids[1, 0]
    ids[2] = -1
    probs = torch.rand(rows, k, generator=g) * (ids >= 0)
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    return hidden, weight, t_hidden, t_weight, ids, probs


def teacher_kl_grads(temperature: float = 1.7):
    """Loss and gradients (hidden states, full head) of the teacher KL for a dense target (a teacher's
    hidden states and head) and a sparse one, chunked (4 rows, all rows) and from logits; and the
    teacher's top 5 from its sharded logits."""
    import torch.nn.functional as F
    from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size

    from models.parallel import copy_to_tp, gather_from_tp, vocab_shard_start
    from models.vocab_parallel import DenseTarget, SparseTarget, head_teacher_kl, logits_teacher_kl, sharded_topk

    hidden, weight, t_hidden, t_weight, ids, probs = kl_inputs()
    local = weight.shape[0] // get_model_parallel_world_size()
    start = vocab_shard_start(local)
    targets = {"dense": DenseTarget(t_hidden, t_weight[start:start + local]), "sparse": SparseTarget(ids, probs)}
    out = {}
    for name, target in targets.items():
        for path in ("chunk4", "chunk_all", "logits"):
            h = hidden.clone().requires_grad_()
            w = weight[start:start + local].clone().requires_grad_()
            if path == "logits":
                loss = logits_teacher_kl(F.linear(copy_to_tp(h), w), target, temperature)
            else:
                loss = head_teacher_kl(h, w, target, temperature, chunk_rows=4 if path == "chunk4" else len(h))
            loss.backward()
            out[f"{name}-{path}"] = {"loss": float(loss.detach()), "grad_h": h.grad,
                                     "grad_w": gather_from_tp(w.grad.t().contiguous()).t()}
    top_ids, top_logp = sharded_topk(F.linear(t_hidden, t_weight[start:start + local]), 5)
    out["topk"] = {"ids": top_ids, "logprobs": top_logp}
    tied = tied_logits()
    out["topk_tied"] = sharded_topk(tied[:, start:start + local], 5)[0]
    return out


def tied_logits(rows: int = 64, vocab: int = 48) -> torch.Tensor:
    """Logits with many equal values (in halves, across both TP=2 shards, at the top-5 boundary;
    negative ones too), as a bf16 teacher's are."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(rows, vocab, generator=g) * 2).round() / 2
    logits[0] = 1.0  # every token equal
    logits[1] = -logits[1].abs() - 0.5  # every token negative
    return logits


def authors_kl_inputs(seed: int = 1, rows: int = 9, dim: int = 16, vocab: int = 48):
    """For the authors' variants (tests/test_teacher_kl_authors.py): student states and head, a
    teacher's states and head, an UNNORMALISED sparse target as dense probabilities [rows, vocab]
    (the raw top-k: mass 0.7 on row 0, a row without target), and a one-hot id per row (-1: the
    teacher's distribution; the EOS rows of --eos_target one_hot)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    t_hidden = torch.randn(rows, dim + 4, generator=g)
    t_weight = torch.randn(vocab, dim + 4, generator=g) * 0.5
    sparse = torch.zeros(rows, vocab)
    for r in range(rows):
        if r == 3:
            continue
        ids = torch.randperm(vocab, generator=g)[:6]
        p = torch.rand(6, generator=g)
        sparse[r, ids] = p / p.sum() * (0.7 if r == 0 else float(torch.rand((), generator=g)) * 0.9 + 0.05)
    one_hot = torch.full((rows,), -1, dtype=torch.long)
    one_hot[[1, 5]] = torch.tensor([2, vocab - 1])  # one id in each half of the vocabulary (both TP=2 shards)
    return hidden, weight, t_hidden, t_weight, sparse, one_hot


def authors_kl_results():
    """head_teacher_kl (T=1) against authors_kl_inputs' raw sparse target (as a SparseTarget) and a
    DenseTarget with one-hot rows, chunked by 4 rows; sharded_token_logprobs of the teacher's logits
    at token_ids (in both halves of the vocabulary). Losses, gradients (hidden states, full head) and log-probabilities."""
    import torch.nn.functional as F
    from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size

    from models.parallel import gather_from_tp, vocab_shard_start
    from models.vocab_parallel import (
        DenseTarget,
        SparseTarget,
        head_teacher_kl,
        sharded_token_logprobs,
    )

    hidden, weight, t_hidden, t_weight, sparse, one_hot = authors_kl_inputs()
    local = weight.shape[0] // get_model_parallel_world_size()
    start = vocab_shard_start(local)
    k = int((sparse > 0).sum(-1).max())
    probs, ids = sparse.topk(k, dim=-1)
    ids = torch.where(probs > 0, ids, -1)
    targets = {"raw": SparseTarget(ids, probs),
               "dense_one_hot": DenseTarget(t_hidden, t_weight[start:start + local], one_hot)}
    out = {}
    for name, target in targets.items():
        h = hidden.clone().requires_grad_()
        w = weight[start:start + local].clone().requires_grad_()
        loss = head_teacher_kl(h, w, target, 1.0, chunk_rows=4)
        loss.backward()
        out[name] = {"loss": float(loss.detach()), "grad_h": h.grad, "grad_w": gather_from_tp(w.grad.t().contiguous()).t()}
    logits = F.linear(t_hidden, t_weight[start:start + local])
    out["token_logprobs"] = sharded_token_logprobs(logits, token_ids(len(t_hidden), weight.shape[0]))
    return out


def token_ids(rows: int, vocab: int) -> torch.Tensor:
    """Ids 7 * row mod vocab: some in each TP=2 shard."""
    return (torch.arange(rows) * 7) % vocab


# the divergences of --divergence (models/vocab_parallel.divergence_chunks), each case (name, divergence,
# jsd_beta, temperature, target): dense targets at T=1 and at a temperature, GKD's asymmetric betas and
# its two ends, and the JSD against a sparse (top-k) target, which teacher_kl allows
DIVERGENCE_CASES = [(f"{d}-b{b}-T{t}-{target}", d, b, t, target)
                    for d, b in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0),
                                 ("jsd", 1.0))
                    for t in (1.0, 1.7) for target in ("dense",)] + [
    ("jsd-b0.3-T1.7-sparse", "jsd", 0.3, 1.7, "sparse"), ("forward_kl-b0.5-T1.7-sparse", "forward_kl", 0.5, 1.7,
                                                          "sparse")]


def divergence_grads():
    """Loss and gradients (hidden states, full head) of every DIVERGENCE_CASES case on kl_inputs,
    chunked by 4 rows and from logits, at the current tensor-parallel size."""
    import torch.nn.functional as F
    from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size

    from models.parallel import copy_to_tp, gather_from_tp, vocab_shard_start
    from models.vocab_parallel import DenseTarget, SparseTarget, head_divergence, logits_divergence

    hidden, weight, t_hidden, t_weight, ids, probs = kl_inputs()
    local = weight.shape[0] // get_model_parallel_world_size()
    start = vocab_shard_start(local)
    targets = {"dense": DenseTarget(t_hidden, t_weight[start:start + local]), "sparse": SparseTarget(ids, probs)}
    out = {}
    for name, divergence, beta, temperature, target in DIVERGENCE_CASES:
        for path in ("chunk4", "logits"):
            h = hidden.clone().requires_grad_()
            w = weight[start:start + local].clone().requires_grad_()
            how = (temperature, divergence, beta)
            if path == "logits":
                loss = logits_divergence(F.linear(copy_to_tp(h), w), targets[target], *how)
            else:
                loss = head_divergence(h, w, targets[target], *how, chunk_rows=4)
            loss.backward()
            out[f"{name}/{path}"] = {"loss": float(loss.detach()), "grad_h": h.grad,
                                     "grad_w": gather_from_tp(w.grad.t().contiguous()).t()}
    return out
