"""Tensor-parallel communication and layers that torch.compile can trace.

fairscale's region mappings all-reduce in place and call `ctx.mark_dirty`, which Dynamo cannot
trace, so a compiled decoder block (training) or decode step (generation) would stop at every one
of them. These functions do the same communication: in eager mode the same in-place calls as
fairscale; while compiling, functional collectives, which Dynamo records as graph ops. The layers
subclass fairscale's, so parameters, names, shapes and `isinstance` checks are unchanged.

  copy_to_tp      identity forward, all-reduce of the gradient (a replicated input feeding shards)
  reduce_from_tp  all-reduce forward (partial sums of a row-parallel product), identity backward
  gather_from_tp  concatenate the ranks' last-dimension shards forward, keep this rank's slice backward
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale_layers
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
)


def _all_reduce(x: torch.Tensor, ctx=None) -> torch.Tensor:
    group = get_model_parallel_group()
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group)
    if ctx is not None:
        ctx.mark_dirty(x)
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last(x: torch.Tensor) -> torch.Tensor:
    group = get_model_parallel_group()
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        # gathered along dim 0 and put side by side here: with another dim torch 2.11's funcol calls a
        # helper Dynamo refuses to trace (`_maybe_view_chunk_cat`), and the whole step would run eagerly
        world = dist.get_world_size(group)
        return torch.cat(funcol.all_gather_tensor(x.contiguous(), 0, group).chunk(world, dim=0), dim=-1)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _local_slice(x: torch.Tensor) -> torch.Tensor:
    width = x.shape[-1] // get_model_parallel_world_size()
    start = get_model_parallel_rank() * width
    return x[..., start:start + width].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x, ctx)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather_last(x)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _ReduceFromTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if get_model_parallel_world_size() == 1 else _GatherFromTP.apply(x)


class ColumnParallelLinear(fairscale_layers.ColumnParallelLinear):
    """Output features split over the ranks (fairscale's layer, traceable forward)."""

    def forward(self, x):
        y = F.linear(copy_to_tp(x), self.weight, self.bias)
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(fairscale_layers.RowParallelLinear):
    """Input features split over the ranks, partial products summed (fairscale's layer, traceable
    forward). The input always arrives split (the output of a column-parallel layer)."""

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(fairscale_layers.VocabParallelEmbedding):
    """Vocabulary split over the ranks. fairscale's forward indexes with a boolean mask (which waits
    for the GPU to count it); here ids outside this rank's shard read row 0 and are zeroed."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start_index
        inside = (local >= 0) & (local < self.num_embeddings_per_partition)
        h = F.embedding(local.clamp(0, self.num_embeddings_per_partition - 1), self.weight)
        return reduce_from_tp(torch.where(inside[..., None], h, torch.zeros_like(h)))


def all_reduce_tp_(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the tensor-parallel group, outside autograd (loss internals)."""
    if get_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_model_parallel_group())
    return x


def vocab_shard_start(local_vocab: int) -> int:
    """First vocabulary id of this rank's shard of a vocabulary split in equal parts."""
    return get_model_parallel_rank() * local_vocab
