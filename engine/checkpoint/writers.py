"""Writers: native shards, Meta's reference layout, HF directories. Each reads one tensor at a
time from a source and builds its output under a temporary name (nothing half-written is left)."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from engine.checkpoint.files import NATIVE_FORMAT, CheckpointError, copy_tokenizer, slices
from engine.checkpoint.sources import Source, rotate_half_to_meta
from engine.runtime.fileio import SafetensorsWriter, atomic_torch_save, atomic_write_text, staged_directory
from engine.runtime.progress import Progress, progress
from engine.text.tokenizer import TokenizerError, load_tokenizer
from models.args import ConfigError, ModelArgs
from models.hf import hf_config, hf_key_map, hf_table
from models.sharding import box_shape, full_box, shard_box, weight_specs


def check_save_dir(save_dir: str, overwrite: bool) -> None:
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise CheckpointError(f"{save_dir} already exists and is not empty; pass --overwrite True to replace it")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise CheckpointError(f"{save_dir} exists and is not a directory")


def _progress(iterable, total, desc, show):
    return progress(iterable, total, desc, "tensor", show, leave=False)


def native_shard_writer(directory: str, rank: int, n: int, args: ModelArgs, specs, dtypes: dict) -> SafetensorsWriter:
    """The streaming writer of native shard `rank` of `n` (dtypes: key -> dtype)."""
    layout = [(sp.key, dtypes[sp.key], box_shape(shard_box(sp, rank, n, args))) for sp in specs]
    return SafetensorsWriter(os.path.join(directory, f"consolidated.{rank:02d}.safetensors"), layout,
                             {"format": NATIVE_FORMAT, "rank": str(rank), "world_size": str(n)})


def write_model_shard(model, directory: str) -> None:
    """This rank's weights of a live tensor-parallel model as its native shard (plus params.json
    from the first rank): the checkpoints training saves."""
    params = dict(model.named_parameters())
    specs = weight_specs(model.args)
    w = native_shard_writer(directory, model.tp_rank, model.tp_size, model.args, specs,
                            {sp.key: params[sp.key].dtype for sp in specs})
    for sp in specs:
        w.write(sp.key, params[sp.key].detach())
    w.close()
    if model.tp_rank == 0:
        atomic_write_text(os.path.join(directory, "params.json"), model.args.to_json())


def write_native(src: Source, save_dir: str, n: int, dtype: Optional[torch.dtype] = None,
                 overwrite: bool = False, tokenizer: Optional[str] = None, progress: bool = True) -> None:
    """Write `src` as n native shards: keys outer, ranks inner, one full tensor in memory at a time."""
    args = src.args
    try:
        args.check_tp(n, where="--n")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_save_dir(save_dir, overwrite)
    specs = src.specs()
    dtypes = {sp.key: dtype or src.dtype(sp) for sp in specs}
    with staged_directory(save_dir, overwrite) as stage:
        writers = []
        try:
            for r in range(n):
                writers.append(native_shard_writer(stage, r, n, args, specs, dtypes))
            for sp in _progress(specs, len(specs), f"writing {n} shard(s)", progress):
                full = src.read(sp, full_box(sp)).to(dtypes[sp.key])
                for r, w in enumerate(writers):
                    w.write(sp.key, full[slices(shard_box(sp, r, n, args))])
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        atomic_write_text(os.path.join(stage, "params.json"), args.to_json())
        copy_tokenizer([tokenizer] if tokenizer else src.tokenizer_files, stage)


def write_meta(src: Source, save_dir: str, n: int, overwrite: bool = False, progress: bool = True) -> None:
    """Meta's reference layout: consolidated.NN.pth, interleaved RoPE rows, embedding split on dim 1."""
    args = src.args
    try:
        args.check_tp(n, where="--n")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if n > 1 and args.n_kv_heads % n:
        raise CheckpointError(f"--n={n}: Meta's layout needs n_kv_heads={args.n_kv_heads} divisible by the shard count")
    check_save_dir(save_dir, overwrite)
    specs = src.specs()
    with staged_directory(save_dir, overwrite) as stage:
        for r in _progress(range(n), n, "writing Meta shards", progress):
            shard = {}
            for sp in specs:
                dim = 1 if sp.key == "tok_embeddings.weight" else sp.shard_dim
                box = shard_box(sp, r, n, args, dim)
                t = src.read(sp, box)
                if sp.rope_heads:
                    t = rotate_half_to_meta(t, (box[0][1] - box[0][0]) // args.head_dim)
                shard[sp.key] = t.contiguous()
            atomic_torch_save(shard, os.path.join(stage, f"consolidated.{r:02d}.pth"))
        atomic_write_text(os.path.join(stage, "params.json"), json.dumps(meta_params(args), indent=2) + "\n")
        copy_tokenizer(src.tokenizer_files, stage)


def meta_params(args: ModelArgs) -> dict:
    """Meta's params.json keys; hidden_dim only where Meta's formula would not reproduce it."""
    out = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
           "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
           "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    probe = ModelArgs(dim=args.dim, n_heads=args.n_heads, multiple_of=args.multiple_of,
                      ffn_dim_multiplier=args.ffn_dim_multiplier)
    if probe.hidden_dim != args.hidden_dim:
        out["hidden_dim"] = args.hidden_dim
    if args.head_dim != args.dim // args.n_heads:
        out["head_dim"] = args.head_dim
    for key in ("qkv_bias", "tie_embeddings", "sliding_window", "rope_scaling"):
        if getattr(args, key):
            out[key] = getattr(args, key)
    if args.n_experts:
        out["moe"] = {"num_experts": args.n_experts, "num_experts_per_tok": args.n_experts_per_tok}
    return out


HF_SHARD_BYTES = 5 * 1024 ** 3


def write_hf(src: Source, save_dir: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False,
             progress: bool = True, shard_bytes: int = HF_SHARD_BYTES) -> None:
    """A directory that transformers' AutoModelForCausalLM.from_pretrained loads (Qwen-1 is written
    as Qwen2, the same architecture under HF's built-in names)."""
    args = src.args
    check_save_dir(save_dir, overwrite)
    names = hf_key_map(args, hf_table(args, for_export=True))
    specs = src.specs()
    dtypes = {sp.key: dtype or src.dtype(sp) for sp in specs}
    files, current, size = [], [], 0  # plan shards by size
    for sp in specs:
        nbytes = torch.Size(sp.shape).numel() * torch.tensor([], dtype=dtypes[sp.key]).element_size()
        if current and size + nbytes > shard_bytes:
            files.append(current)
            current, size = [], 0
        current.append(sp)
        size += nbytes
    files.append(current)
    with staged_directory(save_dir, overwrite) as stage:
        weight_map = {}
        bar = Progress(len(specs), "writing HF weights", "tensor", leave=False) if progress else None
        for i, group in enumerate(files):
            fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            layout = [(names[sp.key][0], dtypes[sp.key], sp.shape) for sp in group]
            w = SafetensorsWriter(os.path.join(stage, fname), layout, {"format": "pt"})
            try:
                for sp in group:
                    w.write(names[sp.key][0], src.read(sp, full_box(sp)).to(dtypes[sp.key]))
                    weight_map[names[sp.key][0]] = fname
                    if bar is not None:
                        bar.update(1)
                w.close()
            except BaseException:
                w.abort()
                raise
        if bar is not None:
            bar.close()
        if len(files) > 1:
            total = sum(torch.Size(sp.shape).numel() * torch.tensor([], dtype=dtypes[sp.key]).element_size()
                        for sp in specs)
            atomic_write_text(os.path.join(stage, "model.safetensors.index.json"),
                              json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        tok = _tokenizer_ids(src.tokenizer_files)
        any_dtype = next(iter(dtypes.values()))
        cfg = hf_config(args, *tok, dtype=str(any_dtype).replace("torch.", ""))
        atomic_write_text(os.path.join(stage, "config.json"), json.dumps(cfg, indent=2) + "\n")
        copy_tokenizer(src.tokenizer_files, stage)
        _write_hf_tokenizer(src.tokenizer_files, stage, args.max_seq_len)


def _write_hf_tokenizer(tokenizer_files: Sequence[str], stage: str, max_len: int) -> None:
    """Beside a sentencepiece tokenizer.model: the tokenizer.json (and tokenizer_config.json) that
    transformers loads as a fast tokenizer without protobuf and that gives our ids
    (engine/text/hf_tokenizer.py); an HF tokenizer's own files are copied as they are."""
    names = {os.path.basename(p) for p in tokenizer_files}
    model = next((p for p in tokenizer_files if p.endswith(".model")), None)
    if model is None or "tokenizer.json" in names:
        return
    from engine.text.hf_tokenizer import hf_tokenizer_config, sentencepiece_to_hf

    tok = load_tokenizer(model)
    try:
        fast = sentencepiece_to_hf(model, tok.bos_id, tok.eos_id)
    except TokenizerError as e:
        print(f"note: no tokenizer.json written: {e}", flush=True)
        return
    atomic_write_text(os.path.join(stage, "tokenizer.json"), fast.to_str())
    if "tokenizer_config.json" not in names:
        atomic_write_text(os.path.join(stage, "tokenizer_config.json"),
                          json.dumps(hf_tokenizer_config(tok, max_len), indent=2) + "\n")


def _tokenizer_ids(tokenizer_files: Sequence[str]):
    paths = [p for p in tokenizer_files if p.endswith(("tokenizer.model", "tokenizer.json"))]
    if not paths:
        return None, None, None
    tok = load_tokenizer(os.path.dirname(paths[0]))
    return tok.bos_id, tok.eos_id, tok.pad_id
