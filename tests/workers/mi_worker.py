"""torchrun worker: the MI terms (pooled_distribution_ce; the authors', padding included and masked) on
hand-made vocabulary-sharded logits (mi_loss_grads) at the launch's tensor-parallel size; rank 0 saves
the results, one entry per estimator.  Usage: mi_worker.py OUT.pt"""

import os
import sys

import torch

from tests.workers import run

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def hand_made_mi_inputs(seed: int = 0, batch: int = 4, label_width: int = 3, rationale_width: int = 7,
                        vocab: int = 24):
    """Full-vocabulary logits of both passes and their masks: padded rows, and one example whose
    label pass has no real position (it must contribute nothing)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randn(batch, label_width, vocab, generator=g) * 2
    rationale = torch.randn(batch, rationale_width, vocab, generator=g) * 2
    label_mask = torch.ones(batch, label_width, dtype=torch.bool)
    rationale_mask = torch.ones(batch, rationale_width, dtype=torch.bool)
    label_mask[1, 2:] = False
    rationale_mask[1, 4:] = False
    rationale_mask[2, 1:] = False
    label_mask[3] = False
    return label, label_mask, rationale, rationale_mask


def mi_loss_grads(seed: int = 0, estimator: str = "pooled_distribution_ce") -> dict:
    """Loss and full-vocabulary gradients of an MI estimator at the current tensor-parallel size:
    pooled_distribution_ce, authors (every position, padding included) or authors_masked."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size

    from engine.distill.step_by_step.mi import authors_mi_sum, pooled_distribution_ce_sum
    from models.parallel import vocab_shard_start

    label, label_mask, rationale, rationale_mask = hand_made_mi_inputs(seed)
    local = label.shape[-1] // get_model_parallel_world_size()
    start = vocab_shard_start(local)
    label_local = label[..., start : start + local].clone().requires_grad_()
    rationale_local = rationale[..., start : start + local].clone().requires_grad_()
    if estimator == "authors":
        loss = authors_mi_sum(label_local, rationale_local)
    elif estimator == "authors_masked":
        loss = authors_mi_sum(label_local, rationale_local, label_mask, rationale_mask)
    else:
        loss = pooled_distribution_ce_sum(label_local, label_mask, rationale_local, rationale_mask)
    loss.backward()
    grad = rationale_local.grad
    if get_model_parallel_world_size() > 1:
        parts = [torch.empty_like(grad) for _ in range(get_model_parallel_world_size())]
        dist.all_gather(parts, grad.contiguous(), group=get_model_parallel_group())
        grad = torch.cat(parts, dim=-1)
    return {"loss": loss.item(), "grad_rationale": grad, "label_grad_is_none": label_local.grad is None}


ESTIMATORS = ("pooled_distribution_ce", "authors", "authors_masked")


def main(out):
    from engine.runtime import distributed

    info = distributed.setup()
    result = {name: mi_loss_grads(estimator=name) for name in ESTIMATORS}
    if info.is_main:
        torch.save(result, out)
    distributed.barrier()


if __name__ == "__main__":
    run(main)
