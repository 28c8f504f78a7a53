"""Sources: every checkpoint format as an object that reads any box of any weight, named by its
native key, in the full (unsharded) tensor's coordinates. Native shards and Meta's reference layout
(interleaved RoPE rows, embedding split on the hidden dimension), HF directories, a single
state-dict file, and random weights for training from scratch."""
from __future__ import annotations

import os
import zlib
from typing import Dict, List, Optional, Sequence

import torch

from engine.checkpoint.files import (
    NATIVE_FORMAT,
    CheckpointError,
    TensorFile,
    intersect,
    not_weights,
    read_json,
    shard_files,
    slices,
    tokenizer_files_for,
)
from models.args import ConfigError, ModelArgs
from models.hf import args_from_hf_config, hf_key_map, load_model_args
from models.registry import model_args_for
from models.sharding import Box, WeightSpec, box_shape, shard_box, weight_specs


def meta_to_rotate_half(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows (x0, x1, x2, x3 ...) -> rotate-half (x0, x2, ..., x1, x3, ...)."""
    rest = t.shape[1:]
    return t.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape)


def rotate_half_to_meta(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(t.shape)


class Source:
    """Reads native-named weights, any box of them, whatever the layout on disk."""

    args: ModelArgs
    description: str
    tokenizer_files: List[str] = []

    def read(self, spec: WeightSpec, box: Box) -> torch.Tensor:
        raise NotImplementedError

    def dtype(self, spec: WeightSpec) -> torch.dtype:
        raise NotImplementedError

    def specs(self) -> List[WeightSpec]:
        return weight_specs(self.args)


class ShardedSource(Source):
    """Native shards (rotate-half RoPE) or Meta's reference layout (interleaved RoPE), any shard count."""

    def __init__(self, files: Sequence[str], args: ModelArgs, description: str, tokenizer_files=(),
                 specs: Optional[List[WeightSpec]] = None):
        self.files = [TensorFile(p) for p in files]
        self._specs = specs
        self.description = description
        self.tokenizer_files = list(tokenizer_files)
        first = self.files[0]
        self.native = first.metadata.get("format") == NATIVE_FORMAT
        self.n = len(self.files)
        if args.vocab_size <= 0:  # Meta's LLaMA-1/2 params.json says -1
            shape = first.shapes.get("tok_embeddings.weight")
            if shape is None:
                raise CheckpointError(f"{first.path}: tok_embeddings.weight is missing")
            args.vocab_size = shape[0] * (self.n if self.native else 1)
        self.args = args
        self._check()

    def specs(self) -> List[WeightSpec]:
        return self._specs if self._specs is not None else weight_specs(self.args)

    def _split_dim(self, spec: WeightSpec) -> Optional[int]:
        if not self.native and spec.key == "tok_embeddings.weight":
            return 1  # Meta's ParallelEmbedding splits the hidden dimension
        return spec.shard_dim

    def _file_box(self, spec: WeightSpec, s: int) -> Box:
        return shard_box(spec, s, self.n, self.args, self._split_dim(spec))

    def _check(self) -> None:
        if not self.native and self.n > 1 and self.n > self.args.n_kv_heads:
            raise CheckpointError(f"{self.description}: {self.n} Meta-layout shards but only "
                                  f"{self.args.n_kv_heads} KV heads")
        if self.n > 1:
            try:
                self.args.check_tp(self.n, where=f"{self.description}: the shard count")
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
        specs = self.specs()
        expected = {sp.key for sp in specs}
        for s, f in enumerate(self.files):
            for sp in specs:
                want = box_shape(self._file_box(sp, s))
                got = f.shapes.get(sp.key)
                if got is None:
                    raise CheckpointError(f"{f.path}: weight {sp.key} is missing ({self._described_by} describes "
                                          f"{self.args.n_layers} layers, dim {self.args.dim})")
                if got != want:
                    raise CheckpointError(f"{f.path}: {sp.key} has shape {list(got)} but {self._described_by} "
                                          f"implies {list(want)} for shard {s} of {self.n}")
            extra = sorted(k for k in f.shapes if k not in expected and k != "rope.freqs"
                           and not (self.args.tie_embeddings and k == "output.weight"))
            if extra:
                raise CheckpointError(f"{f.path}: unexpected weight(s) {', '.join(extra[:3])} not described "
                                      f"by {self._described_by}")

    @property
    def _described_by(self) -> str:
        return "params.json" if self._specs is None else "lora_config.json"

    def dtype(self, spec: WeightSpec) -> torch.dtype:
        return self.files[0].dtype(spec.key)

    def read(self, spec: WeightSpec, box: Box) -> torch.Tensor:
        out, done = None, set()
        for s, f in enumerate(self.files):
            fbox = self._file_box(spec, s)
            part = intersect(fbox, box)
            if part is None or part in done:  # replicated shards hold the same box
                continue
            done.add(part)
            piece = f.read(spec.key, tuple((a - o, b - o) for (a, b), (o, _) in zip(part, fbox)))
            if part == box:
                out = piece
                break
            if out is None:
                out = torch.empty(box_shape(box), dtype=piece.dtype)
            out[slices(part, box)] = piece
        if not self.native and spec.rope_heads:
            rows = box[0]
            out = meta_to_rotate_half(out, (rows[1] - rows[0]) // self.args.head_dim)
        return out


class HFSource(Source):
    """An HF model directory (single or sharded safetensors, or pytorch_model*.bin)."""

    def __init__(self, hf_dir: str, weight_file: Optional[TensorFile] = None):
        """weight_file: one state-dict file with HF names (config.json beside it) instead of the
        directory's own weight files."""
        config_path = os.path.join(hf_dir, "config.json")
        self.hf_config = read_json(config_path)
        self.args = args_from_hf_config(self.hf_config, source=config_path)
        self.description = weight_file.path if weight_file else hf_dir
        self.tokenizer_files = tokenizer_files_for(hf_dir)
        self.key_map = hf_key_map(self.args)
        self._files: Dict[str, TensorFile] = {}
        if weight_file:
            self._where = {k: weight_file.path for k in weight_file.shapes}
            self._files[weight_file.path] = weight_file
        else:
            self._where = hf_weight_files(hf_dir)  # hf key -> file path
        self._check()

    def _file(self, hf_key: str) -> TensorFile:
        path = self._where[hf_key]
        if path not in self._files:
            self._files[path] = TensorFile(path)
        return self._files[path]

    def _check(self) -> None:
        used = set()
        for sp in self.specs():
            hf_key, part = self.key_map[sp.key]
            used.add(hf_key)
            if hf_key not in self._where:
                raise CheckpointError(f"{self.description}: weight {hf_key} is missing")
            shape = self._file(hf_key).shapes.get(hf_key)
            want = sp.shape if part is None else (sp.shape[0] * 3, *sp.shape[1:])
            if shape is None:
                raise CheckpointError(f"{self._where[hf_key]}: weight {hf_key} is missing")
            if shape != want:
                raise CheckpointError(f"{self._where[hf_key]}: {hf_key} has shape {list(shape)} but config.json "
                                      f"implies {list(want)}")
        ignorable = ("rotary_emb.inv_freq", "lm_head.weight") if self.args.tie_embeddings else ("rotary_emb.inv_freq",)
        extra = sorted(k for k in self._where if k not in used and not k.endswith(ignorable))
        if extra:
            raise CheckpointError(f"{self.description}: weights {', '.join(extra[:3])} are not part of a supported "
                                  f"{self.args.family} model")

    def dtype(self, spec: WeightSpec) -> torch.dtype:
        return self._file(self.key_map[spec.key][0]).dtype(self.key_map[spec.key][0])

    def read(self, spec: WeightSpec, box: Box) -> torch.Tensor:
        hf_key, part = self.key_map[spec.key]
        if part is not None:  # Qwen-1 fused c_attn: q, k, v stacked on dim 0
            off = part * spec.shape[0]
            box = ((box[0][0] + off, box[0][1] + off),) + tuple(box[1:])
        return self._file(hf_key).read(hf_key, box)


def hf_weight_files(hf_dir: str) -> Dict[str, str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(hf_dir, index_name)
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            return {k: path for k in TensorFile(path).shapes}
    raise CheckpointError(f"{hf_dir} holds no model.safetensors, pytorch_model.bin or their index")


def open_checkpoint(path: str, model_type: Optional[str] = None) -> Source:
    """A native / Meta shard directory, an HF directory, or one state-dict file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(path):
        return _open_single_file(path, model_type)
    files = shard_files(path)
    if files:
        args = _args_beside(path, model_type, files[0])
        return ShardedSource(files, args, path, tokenizer_files_for(path))
    if os.path.exists(os.path.join(path, "config.json")):
        return HFSource(path)
    raise CheckpointError(f"{path} holds no checkpoint (no consolidated.NN.safetensors/.pth and no config.json)")


def _args_beside(directory: str, model_type: Optional[str], what: str) -> ModelArgs:
    for name in ("params.json", "config.json"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            try:
                return load_model_args(p)
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
    if model_type:
        return model_args_for(model_type)
    raise CheckpointError(f"{directory}: no params.json beside {os.path.basename(what)}; pass --model_type")


def _open_single_file(path: str, model_type: Optional[str]) -> Source:
    problem = not_weights(path)
    if problem:
        raise CheckpointError(problem)
    f = TensorFile(path)
    directory = os.path.dirname(os.path.abspath(path))
    if any(k.startswith(("model.", "transformer.", "lm_head.")) for k in f.shapes):
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise CheckpointError(f"{path} has HF weight names but no config.json beside it")
        return HFSource(directory, weight_file=f)
    args = _args_beside(directory, model_type, path)
    return ShardedSource([path], args, path, tokenizer_files_for(directory))


class RandomSource(Source):
    """Fresh weights for training from scratch: N(0, std) matrices, unit norms, zero biases.
    Each tensor depends only on (seed, key), so any shard count gives the same model."""

    def __init__(self, args: ModelArgs, seed: int = 0, std: float = 0.02, tokenizer_files=()):
        self.args, self.seed, self.std = args, seed, std
        self.description = "random init"
        self.tokenizer_files = list(tokenizer_files)

    def dtype(self, spec: WeightSpec) -> torch.dtype:
        return torch.float32

    def _full(self, spec: WeightSpec) -> torch.Tensor:
        if spec.key.endswith("norm.weight"):
            t = torch.ones(spec.shape)
        elif spec.key.endswith(".bias"):
            t = torch.zeros(spec.shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(spec.key.encode()))
            std = self.std
            if spec.key.endswith(("wo.weight", "w2.weight")):  # residual branches: GPT-2's depth scaling
                std = std / (2 * self.args.n_layers) ** 0.5
            t = torch.randn(spec.shape, generator=g) * std
        return t

    def read(self, spec: WeightSpec, box: Box) -> torch.Tensor:
        return self._full(spec)[slices(box)]
