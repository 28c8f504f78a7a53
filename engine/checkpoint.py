"""Checkpoint I/O: native tensor-parallel shards, Meta's reference layout, and HF directories.

Every format is a *source* that can read any box (a per-dimension range) of any weight, named by
its native key and expressed in the full, unsharded tensor's coordinates. Split, merge, reshard,
HF import/export and loading a model at any tensor-parallel rank are all "read the box this
output needs, write it": one tensor at a time, so no conversion needs the whole model in memory.

Native format: a directory with `params.json` (ModelArgs), the tokenizer file, and
`consolidated.NN.safetensors`, one per tensor-parallel rank, RoPE in the rotate-half convention.
Meta's reference layout (`consolidated.NN.pth`, also Mistral's `consolidated.safetensors`) uses the
same key names, interleaved RoPE rows and an embedding split on the hidden dimension.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from engine.data import TEMPLATE_FILE
from engine.errors import UserError
from engine.fileio import SafetensorsWriter, atomic_torch_save, atomic_write_text, staged_directory
from models.args import ConfigError, ModelArgs

NATIVE_FORMAT = "cot-engine"
# Files that travel with the weights through every conversion: the tokenizer, and the prompt template
# a trained checkpoint records (engine.data.TEMPLATE_FILE).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   TEMPLATE_FILE)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

Box = Tuple[Tuple[int, int], ...]


class CheckpointError(UserError):
    """A user-facing checkpoint problem; the message is one sentence naming the file."""


# ----------------------------------------------------------------------------------------------
# The native key set and how each weight is sharded
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSpec:
    key: str
    shape: Tuple[int, ...]
    shard_dim: Optional[int]  # None: replicated on every rank
    kv: bool = False  # KV projection: whole heads per rank, replicated when tp > n_kv_heads
    rope_heads: int = 0  # q/k projections: number of heads whose rows carry RoPE (for Meta permutation)


def weight_specs(args: ModelArgs) -> List[WeightSpec]:
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    q_out, kv_out = args.n_heads * hd, args.n_kv_heads * hd
    specs = [WeightSpec("tok_embeddings.weight", (args.vocab_size, d), 0)]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        specs.append(WeightSpec(p + "attention.wq.weight", (q_out, d), 0, rope_heads=args.n_heads))
        if args.qkv_bias:
            specs.append(WeightSpec(p + "attention.wq.bias", (q_out,), 0, rope_heads=args.n_heads))
        for name in ("wk", "wv"):
            heads = args.n_kv_heads if name == "wk" else 0
            specs.append(WeightSpec(p + f"attention.{name}.weight", (kv_out, d), 0, kv=True, rope_heads=heads))
            if args.qkv_bias:
                specs.append(WeightSpec(p + f"attention.{name}.bias", (kv_out,), 0, kv=True, rope_heads=heads))
        specs.append(WeightSpec(p + "attention.wo.weight", (d, q_out), 1))
        if args.n_experts:
            specs.append(WeightSpec(p + "feed_forward.gate.weight", (args.n_experts, d), None))
            for e in range(args.n_experts):
                q = p + f"feed_forward.experts.{e}."
                specs += [WeightSpec(q + "w1.weight", (f, d), 0), WeightSpec(q + "w2.weight", (d, f), 1),
                          WeightSpec(q + "w3.weight", (f, d), 0)]
        else:
            q = p + "feed_forward."
            specs += [WeightSpec(q + "w1.weight", (f, d), 0), WeightSpec(q + "w2.weight", (d, f), 1),
                      WeightSpec(q + "w3.weight", (f, d), 0)]
        specs += [WeightSpec(p + "attention_norm.weight", (d,), None), WeightSpec(p + "ffn_norm.weight", (d,), None)]
    specs.append(WeightSpec("norm.weight", (d,), None))
    if not args.tie_embeddings:
        specs.append(WeightSpec("output.weight", (args.vocab_size, d), 0))
    return specs


def shard_box(spec: WeightSpec, rank: int, n: int, args: ModelArgs, shard_dim: Optional[int] = -1) -> Box:
    """The part of `spec`'s full tensor that rank `rank` of `n` holds. shard_dim overrides the
    native split dimension (Meta's layout splits the embedding on dim 1)."""
    dim = spec.shard_dim if shard_dim == -1 else shard_dim
    box = [(0, s) for s in spec.shape]
    if dim is None or n == 1:
        return tuple(box)
    size = spec.shape[dim]
    if spec.kv and n > args.n_kv_heads:  # one whole head, shared by n / n_kv_heads ranks
        head = rank * args.n_kv_heads // n
        box[dim] = (head * args.head_dim, (head + 1) * args.head_dim)
    else:
        box[dim] = (rank * size // n, (rank + 1) * size // n)
    return tuple(box)


def box_shape(box: Box) -> Tuple[int, ...]:
    return tuple(e - s for s, e in box)


def _intersect(a: Box, b: Box) -> Optional[Box]:
    out = tuple((max(sa, sb), min(ea, eb)) for (sa, ea), (sb, eb) in zip(a, b))
    return None if any(s >= e for s, e in out) else out


def _slices(box: Box, origin: Box = None) -> Tuple[slice, ...]:
    origin = origin or tuple((0, 0) for _ in box)
    return tuple(slice(s - o, e - o) for (s, e), (o, _) in zip(box, origin))


def meta_to_rotate_half(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows (x0, x1, x2, x3 ...) -> rotate-half (x0, x2, ..., x1, x3, ...)."""
    rest = t.shape[1:]
    return t.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape)


def rotate_half_to_meta(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(t.shape)


# ----------------------------------------------------------------------------------------------
# Opening tensor files lazily
# ----------------------------------------------------------------------------------------------
class _TensorFile:
    """Lazy access to one .safetensors / .pth / .bin file: names, shapes, and slices."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} does not exist")
        if not os.access(path, os.R_OK):
            raise CheckpointError(f"{path} is not readable")
        self.metadata: Dict[str, str] = {}
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                self._st = safe_open(path, framework="pt")
                self.metadata = self._st.metadata() or {}
                self.shapes = {k: tuple(self._st.get_slice(k).get_shape()) for k in self._st.keys()}
            except Exception as e:  # safetensors raises its own error types for bad headers/sizes
                raise CheckpointError(f"{path} is truncated or corrupted ({_one_line(e)})") from None
            self._dict = None
        else:
            try:
                try:
                    self._dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    self._dict = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
            except Exception as e:
                raise CheckpointError(f"{path} is truncated or corrupted ({_one_line(e)})") from None
            if not isinstance(self._dict, dict):
                raise CheckpointError(f"{path} does not hold a dictionary of tensors")
            self._dict = {k: v for k, v in self._dict.items() if isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}

    def read(self, name: str, box: Optional[Box] = None) -> torch.Tensor:
        try:
            if self._dict is not None:
                t = self._dict[name]
                return (t[_slices(box)] if box else t).clone()
            if box is None:
                return self._st.get_tensor(name)
            return self._st.get_slice(name)[_slices(box)]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read {name} ({_one_line(e)})") from None

    def dtype(self, name: str) -> torch.dtype:
        if self._dict is not None:
            return self._dict[name].dtype
        return _ST_DTYPES[self._st.get_slice(name).get_dtype()]


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
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
        self.files = [_TensorFile(p) for p in files]
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
            part = _intersect(fbox, box)
            if part is None or part in done:  # replicated shards hold the same box
                continue
            done.add(part)
            piece = f.read(spec.key, tuple((a - o, b - o) for (a, b), (o, _) in zip(part, fbox)))
            if part == box:
                out = piece
                break
            if out is None:
                out = torch.empty(box_shape(box), dtype=piece.dtype)
            out[_slices(part, box)] = piece
        if not self.native and spec.rope_heads:
            rows = box[0]
            out = meta_to_rotate_half(out, (rows[1] - rows[0]) // self.args.head_dim)
        return out


class HFSource(Source):
    """An HF model directory (single or sharded safetensors, or pytorch_model*.bin)."""

    def __init__(self, hf_dir: str, weight_file: Optional[_TensorFile] = None):
        """weight_file: one state-dict file with HF names (config.json beside it) instead of the
        directory's own weight files."""
        config_path = os.path.join(hf_dir, "config.json")
        self.hf_config = _read_json(config_path)
        self.args = ModelArgs.from_hf_config(self.hf_config, source=config_path)
        self.description = weight_file.path if weight_file else hf_dir
        self.tokenizer_files = tokenizer_files_for(hf_dir)
        self.key_map = hf_key_map(self.args)
        self._files: Dict[str, _TensorFile] = {}
        if weight_file:
            self._where = {k: weight_file.path for k in weight_file.shapes}
            self._files[weight_file.path] = weight_file
        else:
            self._where = _hf_weight_files(hf_dir)  # hf key -> file path
        self._check()

    def _file(self, hf_key: str) -> _TensorFile:
        path = self._where[hf_key]
        if path not in self._files:
            self._files[path] = _TensorFile(path)
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


def _hf_weight_files(hf_dir: str) -> Dict[str, str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(hf_dir, index_name)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            return {k: path for k in _TensorFile(path).shapes}
    raise CheckpointError(f"{hf_dir} holds no model.safetensors, pytorch_model.bin or their index")


# HF name tables: one per family; {i} = layer, {e} = expert
_HF_COMMON = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wq.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attention.wk.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attention.wv.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
HF_DENSE = {
    **_HF_COMMON,
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}
HF_MIXTRAL = {
    **_HF_COMMON,
    "layers.{i}.feed_forward.gate.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.feed_forward.experts.{e}.w1.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{i}.feed_forward.experts.{e}.w2.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "layers.{i}.feed_forward.experts.{e}.w3.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}
HF_QWEN1 = {  # QWenLMHeadModel: fused c_attn (q, k, v), and its w2 is the SiLU-gated branch
    "tok_embeddings.weight": "transformer.wte.weight",
    "norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": ("transformer.h.{i}.attn.c_attn.weight", 0),
    "layers.{i}.attention.wk.weight": ("transformer.h.{i}.attn.c_attn.weight", 1),
    "layers.{i}.attention.wv.weight": ("transformer.h.{i}.attn.c_attn.weight", 2),
    "layers.{i}.attention.wq.bias": ("transformer.h.{i}.attn.c_attn.bias", 0),
    "layers.{i}.attention.wk.bias": ("transformer.h.{i}.attn.c_attn.bias", 1),
    "layers.{i}.attention.wv.bias": ("transformer.h.{i}.attn.c_attn.bias", 2),
    "layers.{i}.attention.wo.weight": "transformer.h.{i}.attn.c_proj.weight",
    "layers.{i}.attention_norm.weight": "transformer.h.{i}.ln_1.weight",
    "layers.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "layers.{i}.feed_forward.w1.weight": "transformer.h.{i}.mlp.w2.weight",
    "layers.{i}.feed_forward.w2.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "transformer.h.{i}.mlp.w1.weight",
}


def _hf_table(args: ModelArgs) -> dict:
    if args.family == "qwen":
        return HF_QWEN1
    return HF_MIXTRAL if args.n_experts else HF_DENSE


def hf_key_map(args: ModelArgs, table: Optional[dict] = None) -> Dict[str, Tuple[str, Optional[int]]]:
    """native key -> (HF key, part of a fused q/k/v tensor or None)."""
    table = table or _hf_table(args)
    patterns = []
    for native, hf in table.items():
        hf, part = hf if isinstance(hf, tuple) else (hf, None)
        rx = re.escape(native).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        patterns.append((re.compile(rx + "$"), hf, part))
    out = {}
    for sp in weight_specs(args):
        for rx, hf, part in patterns:
            m = rx.match(sp.key)
            if m:
                out[sp.key] = (hf.format(**m.groupdict()), part)
                break
        else:
            raise CheckpointError(f"no HF name for {sp.key} in the {args.family} key map")
    return out


# ----------------------------------------------------------------------------------------------
# Opening any checkpoint location
# ----------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({_one_line(e)})") from None


def _shard_files(ckpt_dir: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not files and os.path.exists(os.path.join(ckpt_dir, "consolidated.safetensors")):
        files = [os.path.join(ckpt_dir, "consolidated.safetensors")]  # Mistral's reference release
    for i, path in enumerate(files):
        m = re.search(r"consolidated\.(\d+)\.", os.path.basename(path))
        if m and int(m.group(1)) != i:
            raise CheckpointError(f"{ckpt_dir}: shard {i:02d} is missing (found {os.path.basename(path)})")
    return files


def open_checkpoint(path: str, model_type: Optional[str] = None) -> Source:
    """A native / Meta shard directory, an HF directory, or one state-dict file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if os.path.isfile(path):
        return _open_single_file(path, model_type)
    files = _shard_files(path)
    if files:
        args = _args_beside(path, model_type, files[0])
        return ShardedSource(files, args, path, tokenizer_files_for(path))
    if os.path.exists(os.path.join(path, "config.json")):
        return HFSource(path)
    raise CheckpointError(f"{path} holds no checkpoint (no consolidated.NN.safetensors/.pth and no config.json)")


def _args_beside(directory: str, model_type: Optional[str], what: str) -> ModelArgs:
    from models.registry import model_args_for

    for name in ("params.json", "config.json"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            try:
                return ModelArgs.load(p)
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
    if model_type:
        return model_args_for(model_type)
    raise CheckpointError(f"{directory}: no params.json beside {os.path.basename(what)}; pass --model_type")


def _open_single_file(path: str, model_type: Optional[str]) -> Source:
    f = _TensorFile(path)
    directory = os.path.dirname(os.path.abspath(path))
    if any(k.startswith(("model.", "transformer.", "lm_head.")) for k in f.shapes):
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise CheckpointError(f"{path} has HF weight names but no config.json beside it")
        return HFSource(directory, weight_file=f)
    args = _args_beside(directory, model_type, path)
    return ShardedSource([path], args, path, tokenizer_files_for(directory))


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def _check_save_dir(save_dir: str, overwrite: bool) -> None:
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise CheckpointError(f"{save_dir} already exists and is not empty; pass --overwrite True to replace it")
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise CheckpointError(f"{save_dir} exists and is not a directory")


def _progress(iterable, total, desc, show):
    from engine.progress import progress

    return progress(iterable, total, desc, "tensor", show, leave=False)


def tokenizer_files_for(path: str) -> List[str]:
    """The files that make up the tokenizer at `path` (a .model / tokenizer.json file or a directory)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files = [] if os.path.isdir(path) else [path]
    if os.path.isdir(path) or path.endswith(".json"):
        files += [os.path.join(directory, n) for n in TOKENIZER_FILES
                  if os.path.exists(os.path.join(directory, n)) and os.path.join(directory, n) not in files]
    return files


def _copy_tokenizer(files: Iterable[str], out_dir: str) -> None:
    """Copy under the standard names (a sentencepiece model becomes tokenizer.model)."""
    for p in files:
        name = os.path.basename(p)
        if name not in TOKENIZER_FILES:
            name = "tokenizer.model" if name.endswith(".model") else "tokenizer.json"
        shutil.copyfile(p, os.path.join(out_dir, name))


def write_native(src: Source, save_dir: str, n: int, dtype: Optional[torch.dtype] = None,
                 overwrite: bool = False, tokenizer: Optional[str] = None, progress: bool = True) -> None:
    """Write `src` as n native shards: keys outer, ranks inner, one full tensor in memory at a time."""
    args = src.args
    try:
        args.check_tp(n, where="--n")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    _check_save_dir(save_dir, overwrite)
    specs = src.specs()
    dtypes = {sp.key: dtype or src.dtype(sp) for sp in specs}
    with staged_directory(save_dir, overwrite) as stage:
        writers = []
        try:
            for r in range(n):
                layout = [(sp.key, dtypes[sp.key], box_shape(shard_box(sp, r, n, args))) for sp in specs]
                writers.append(SafetensorsWriter(os.path.join(stage, f"consolidated.{r:02d}.safetensors"), layout,
                                                 {"format": NATIVE_FORMAT, "rank": str(r), "world_size": str(n)}))
            for sp in _progress(specs, len(specs), f"writing {n} shard(s)", progress):
                full = src.read(sp, tuple((0, s) for s in sp.shape)).to(dtypes[sp.key])
                for r, w in enumerate(writers):
                    w.write(sp.key, full[_slices(shard_box(sp, r, n, args))])
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        args.save(os.path.join(stage, "params.json"))
        _copy_tokenizer([tokenizer] if tokenizer else src.tokenizer_files, stage)


def write_meta(src: Source, save_dir: str, n: int, overwrite: bool = False, progress: bool = True) -> None:
    """Meta's reference layout: consolidated.NN.pth, interleaved RoPE rows, embedding split on dim 1."""
    args = src.args
    try:
        args.check_tp(n, where="--n")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if n > 1 and args.n_kv_heads % n:
        raise CheckpointError(f"--n={n}: Meta's layout needs n_kv_heads={args.n_kv_heads} divisible by the shard count")
    _check_save_dir(save_dir, overwrite)
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
        _copy_tokenizer(src.tokenizer_files, stage)


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
    _check_save_dir(save_dir, overwrite)
    table = HF_MIXTRAL if args.n_experts else HF_DENSE
    names = hf_key_map(args, table)
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
    from engine.progress import Progress

    with staged_directory(save_dir, overwrite) as stage:
        weight_map = {}
        bar = Progress(len(specs), "writing HF weights", "tensor", leave=False) if progress else None
        for i, group in enumerate(files):
            fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            layout = [(names[sp.key][0], dtypes[sp.key], sp.shape) for sp in group]
            w = SafetensorsWriter(os.path.join(stage, fname), layout, {"format": "pt"})
            try:
                for sp in group:
                    w.write(names[sp.key][0], src.read(sp, tuple((0, s) for s in sp.shape)).to(dtypes[sp.key]))
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
        cfg = args.to_hf_config(*tok, dtype=str(any_dtype).replace("torch.", ""))
        atomic_write_text(os.path.join(stage, "config.json"), json.dumps(cfg, indent=2) + "\n")
        _copy_tokenizer(src.tokenizer_files, stage)
        if any(p.endswith("tokenizer.model") for p in src.tokenizer_files) and not any(
                p.endswith("tokenizer_config.json") for p in src.tokenizer_files):
            atomic_write_text(os.path.join(stage, "tokenizer_config.json"),
                              json.dumps(_sentencepiece_tokenizer_config(src.tokenizer_files), indent=2))


def _tokenizer_ids(tokenizer_files: Sequence[str]):
    from engine.tokenizer import load_tokenizer

    paths = [p for p in tokenizer_files if p.endswith(("tokenizer.model", "tokenizer.json"))]
    if not paths:
        return None, None, None
    tok = load_tokenizer(os.path.dirname(paths[0]))
    return tok.bos_id, tok.eos_id, tok.pad_id


def _sentencepiece_tokenizer_config(tokenizer_files: Sequence[str]) -> dict:
    from engine.tokenizer import load_tokenizer

    path = next(p for p in tokenizer_files if p.endswith("tokenizer.model"))
    tok = load_tokenizer(path)
    piece = tok.id_to_piece
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
            "unk_token": piece(tok.unk_id) if tok.unk_id is not None else None, "add_bos_token": True,
            "add_eos_token": False, "legacy": True}


# ----------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------
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

    A native or Meta directory must hold one shard per tensor-parallel rank; an HF directory or a
    single full file loads at any tensor-parallel size."""
    from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

    from models.transformer import Transformer

    tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
    src = open_checkpoint(ckpt_dir, model_type)
    if isinstance(src, ShardedSource) and os.path.isdir(ckpt_dir) and src.n != tp:
        raise CheckpointError(
            f"{ckpt_dir} holds {src.n} shard(s) but the tensor-parallel size is {tp}; reshard it with "
            f"`python checkpoint_split.py reshard --ckpt_dir {ckpt_dir} --save_dir OUT --n {tp}`")
    try:
        model = Transformer(src.args, device, dtype)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
    load_state_into(model, src, rank, tp)
    return model


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
        import zlib

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
        return self._full(spec)[_slices(box)]
