"""Loading a checkpoint into the tensor-parallel model of this rank."""
from __future__ import annotations

import os
from typing import Optional

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from engine.checkpoint.files import CheckpointError
from engine.checkpoint.sources import ShardedSource, Source, open_checkpoint
from models.args import ConfigError
from models.sharding import shard_box
from models.transformer import Transformer


def load_state_into(model: torch.nn.Module, src: Source, rank: int, n: int, only_specs: bool = False) -> None:
    """Copy this rank's boxes of every weight into the (tensor-parallel) model, checking shapes.
    only_specs: load just the source's tensors (a LoRA adapter) and leave the rest as they are."""
    params = dict(model.named_parameters())
    specs = src.specs()
    absent = sorted({sp.key for sp in specs} - set(params))
    if absent:
        raise CheckpointError(f"{src.description}: the model has no parameter {', '.join(absent[:3])}")
    lora = {k for k in params if ".lora_" in k}
    missing = sorted(set(params) - {sp.key for sp in specs} - lora - ({"output.weight"} if src.args.tie_embeddings else set()))
    if missing and not only_specs:
        raise CheckpointError(f"{src.description}: the checkpoint lacks {', '.join(missing[:3])}")
    with torch.no_grad():
        for sp in specs:
            t = src.read(sp, shard_box(sp, rank, n, src.args))
            p = params[sp.key]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{src.description}: {sp.key} has shape {list(t.shape)} on rank {rank}, "
                                      f"the model expects {list(p.shape)}")
            p.copy_(t)


def load_model(ckpt_dir: str, dtype: torch.dtype = torch.float32, device=None, model_type: Optional[str] = None):
    """Build the tensor-parallel Transformer for this rank and load its shard of `ckpt_dir`.

    Any checkpoint loads at any tensor-parallel size its shapes allow: a native or Meta directory
    whose shard count differs from it is resharded on load, each rank reading only its box of one
    tensor at a time from the shards that hold it (as an HF directory or a single file always was)."""
    tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
    src = open_checkpoint(ckpt_dir, model_type)
    if isinstance(src, ShardedSource) and src.n != tp and rank == 0 and os.environ.get("RANK", "0") == "0":
        print(f"{ckpt_dir}: {src.n} shard(s) resharded on load to tensor-parallel size {tp}", flush=True)
    try:
        model = Transformer(src.args, device, dtype)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
    load_state_into(model, src, rank, tp)
    return model
