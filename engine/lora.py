"""LoRA on fairscale's tensor-parallel linear layers.

Column-parallel layer (q/k/v, gate/up): A [r, in] replicated, B [out/tp, r] sharded like the base.
  The A output is replicated; `copy_to_tp` on it sums the partial gradients the
  ranks send back through their B shards, so A's gradient is complete and equal on every rank.
Row-parallel layer (o, down): A [r, in/tp] sharded like the base input, its output all-reduced,
  B [out, r] replicated.
The output head (target `output`, column-parallel over the vocabulary) is adapted like q/k/v.
Scaling alpha / r as in peft; B starts at zero, A as peft's kaiming-uniform, drawn in full from a
seed and the weight's name and then sliced, so any tensor-parallel size starts from the same adapter.
LoRA weights stay fp32 whatever the base precision. Merging is local on each rank.

Layers get LoRA by class swap (`LoRAColumnParallelLinear` / `LoRARowParallelLinear` subclass the
fairscale layers), so the base weights keep their names and checkpoints load unchanged.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size
from torch import nn

from engine.errors import UserError
from models.parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tp, reduce_from_tp

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the default: every projection of every layer
KNOWN_TARGETS = ALL_TARGETS + ("output",)  # the output head too, as the MCC-KD authors' LoRA does
HF_TARGET_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                   "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}


@dataclass
class LoRAConfig:
    rank: int
    alpha: Optional[float] = None  # None: alpha = rank (scaling 1)
    dropout: float = 0.0
    targets: Tuple[str, ...] = ALL_TARGETS
    seed: int = 0

    def __post_init__(self):
        if self.rank <= 0:
            raise UserError(f"--lora_rank must be > 0 for LoRA, got {self.rank}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        bad = [t for t in self.targets if t not in KNOWN_TARGETS]
        if bad or not self.targets:
            raise UserError(f"--lora_targets {','.join(bad) or '(empty)'} not among {', '.join(KNOWN_TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


class _LoRAMixin:
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scaling: float
    lora_dropout: nn.Module
    merged: bool = False

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout (Identity when 0: free), then fp32 for the adapter unless autocast casts anyway
        (an explicit cast there would copy the activation twice)."""
        x = self.lora_dropout(x)
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)

    def _delta_weight_local(self) -> torch.Tensor:
        """This rank's B @ A * scaling in the base weight's local shape."""
        return (self.lora_B @ self.lora_A) * self.lora_scaling

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.weight += self._delta_weight_local().to(self.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.weight -= self._delta_weight_local().to(self.weight.dtype)
            self.merged = False


class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
    def forward(self, x):
        y = super().forward(x)
        if self.merged:
            return y
        h = F.linear(self._lora_input(x), self.lora_A)
        delta = F.linear(copy_to_tp(h), self.lora_B)
        return y + (delta * self.lora_scaling).to(y.dtype)


class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
    def forward(self, x):
        y = super().forward(x)
        if self.merged:
            return y
        h = reduce_from_tp(F.linear(self._lora_input(x), self.lora_A))
        return y + (F.linear(h, self.lora_B) * self.lora_scaling).to(y.dtype)


def _init_A(name: str, shape_full: Tuple[int, int], seed: int) -> torch.Tensor:
    """peft's kaiming_uniform_(a=sqrt(5)) on the full [r, in] matrix: U(-1/sqrt(in), 1/sqrt(in))."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape_full[1])
    return (torch.rand(shape_full, generator=g) * 2 - 1) * bound


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> List[str]:
    """Freeze the model and add LoRA to the targeted projections; returns the names of LoRA layers.
    Mixture-of-experts FFNs keep their experts frozen (LoRA goes on attention there)."""
    rank = get_model_parallel_rank()
    if "output" in cfg.targets and model.output is None:
        raise UserError("--lora_targets output: this model ties its output head to the token embeddings; "
                        "leave output out of --lora_targets")
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in cfg.targets or not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        column = isinstance(module, ColumnParallelLinear)
        if column:
            module.__class__ = LoRAColumnParallelLinear
            A = _init_A(name, (cfg.rank, module.in_features), cfg.seed)
            B = torch.zeros(module.output_size_per_partition, cfg.rank)
        else:
            module.__class__ = LoRARowParallelLinear
            full = _init_A(name, (cfg.rank, module.in_features), cfg.seed)
            per = module.input_size_per_partition
            A = full[:, rank * per:(rank + 1) * per]
            B = torch.zeros(module.out_features, cfg.rank)
        module.lora_A = nn.Parameter(A.contiguous().to(device))
        module.lora_B = nn.Parameter(B.to(device))
        module.lora_scaling = cfg.scaling
        module.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        module.merged = False
        names.append(name)
    if not names:
        raise UserError(f"--lora_targets {','.join(cfg.targets)} matched no layer of this model")
    return names


def lora_layers(model: nn.Module) -> Dict[str, _LoRAMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRAMixin)}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's LoRA tensors, named '<layer>.lora_A' / '<layer>.lora_B'."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


# ----------------------------------------------------------------------------------------------
# LoRA on disk: `lora.NN.safetensors` per tensor-parallel rank + `lora_config.json`
# ----------------------------------------------------------------------------------------------
LORA_CONFIG = "lora_config.json"


def _module_path(target: str) -> str:
    return f"attention.{target}" if target in ("wq", "wk", "wv", "wo") else f"feed_forward.{target}"


def _column(key: str, out_dim: int, args, cfg: "LoRAConfig", kv: bool = False):
    """A column-parallel layer's LoRA: A replicated, B sharded on its output rows like the base."""
    from engine.checkpoint import WeightSpec

    return [WeightSpec(key + ".lora_A", (cfg.rank, args.dim), None),
            WeightSpec(key + ".lora_B", (out_dim, cfg.rank), 0, kv=kv)]


def lora_specs(args, cfg: LoRAConfig):
    """WeightSpecs of every LoRA tensor in full (unsharded) coordinates."""
    from engine.checkpoint import WeightSpec

    out_dims = {"wq": args.n_heads * args.head_dim, "wk": args.n_kv_heads * args.head_dim,
                "wv": args.n_kv_heads * args.head_dim, "w1": args.hidden_dim, "w3": args.hidden_dim}
    in_dims = {"wo": args.n_heads * args.head_dim, "w2": args.hidden_dim}
    specs = []
    for i in range(args.n_layers):
        for t in cfg.targets:
            if args.n_experts and t in ("w1", "w2", "w3"):
                continue  # experts stay frozen
            if t == "output":
                continue
            key = f"layers.{i}.{_module_path(t)}"
            if t in out_dims:
                specs += _column(key, out_dims[t], args, cfg, kv=t in ("wk", "wv"))
            else:  # row-parallel: A sharded on its input columns
                specs.append(WeightSpec(key + ".lora_A", (cfg.rank, in_dims[t]), 1))
                specs.append(WeightSpec(key + ".lora_B", (args.dim, cfg.rank), None))
    if "output" in cfg.targets and not args.tie_embeddings:
        specs += _column("output", args.vocab_size, args, cfg)
    return specs


def save_lora(model: nn.Module, cfg: LoRAConfig, directory: str, base_ckpt: Optional[str] = None) -> None:
    """Each rank writes its own shard; rank 0 writes lora_config.json and params.json."""
    import json
    import os

    from engine.checkpoint import NATIVE_FORMAT
    from engine.fileio import SafetensorsWriter, atomic_write_text

    tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
    sd = lora_state_dict(model)
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    w = SafetensorsWriter(os.path.join(directory, f"lora.{rank:02d}.safetensors"), layout,
                          {"format": NATIVE_FORMAT, "rank": str(rank), "world_size": str(tp)})
    for k, v in sd.items():
        w.write(k, v.float())
    w.close()
    if rank == 0:
        meta = {**cfg.to_dict(), "base_ckpt": os.path.abspath(base_ckpt) if base_ckpt else None}
        atomic_write_text(os.path.join(directory, LORA_CONFIG), json.dumps(meta, indent=2) + "\n")
        model.args.save(os.path.join(directory, "params.json"))


def read_lora_config(directory: str) -> Tuple[LoRAConfig, Optional[str]]:
    import json
    import os

    from engine.checkpoint import CheckpointError

    path = os.path.join(directory, LORA_CONFIG)
    try:
        raw = json.load(open(path))
        base = raw.pop("base_ckpt", None)
        return LoRAConfig(**raw), base
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist (not a LoRA adapter directory)") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid LoRA config ({e})") from None


def open_lora(directory: str, args=None):
    """A ShardedSource over a LoRA adapter directory (any shard count)."""
    import glob
    import os

    from engine.checkpoint import CheckpointError, ShardedSource
    from models.args import ModelArgs

    cfg, base = read_lora_config(directory)
    from engine.data import TEMPLATE_FILE

    files = sorted(glob.glob(os.path.join(directory, "lora.*.safetensors")))
    if not files:
        raise CheckpointError(f"{directory} holds no lora.NN.safetensors files")
    if args is None:
        args = ModelArgs.load(os.path.join(directory, "params.json"))
    template = [p for p in [os.path.join(directory, TEMPLATE_FILE)] if os.path.exists(p)]  # travels on merges
    return ShardedSource(files, args, directory, template, specs=lora_specs(args, cfg)), cfg, base


def load_lora_into(model: nn.Module, directory: str) -> LoRAConfig:
    """Add LoRA layers to `model` (as saved) and load this rank's part of the adapter."""
    from engine.checkpoint import load_state_into

    src, cfg, _ = open_lora(directory, model.args)
    if not lora_layers(model):
        apply_lora(model, cfg)
    load_state_into(model, src, get_model_parallel_rank(), get_model_parallel_world_size(), only_specs=True)
    return cfg


class MergedSource:
    """A base checkpoint source with a LoRA adapter folded into its weights: W + scaling * B @ A,
    computed box by box so merging never holds more than one weight."""

    def __init__(self, base, lora_src, cfg: LoRAConfig):
        self.base, self.lora, self.cfg = base, lora_src, cfg
        self.args, self.description = base.args, f"{base.description} + LoRA"
        self.tokenizer_files = base.tokenizer_files + lora_src.tokenizer_files  # the adapter's prompt template
        self._lora = {sp.key: sp for sp in lora_src.specs()}

    def specs(self):
        return self.base.specs()

    def dtype(self, spec):
        return self.base.dtype(spec)

    def read(self, spec, box):
        w = self.base.read(spec, box)
        stem = spec.key[: -len(".weight")]
        a, b = self._lora.get(stem + ".lora_A"), self._lora.get(stem + ".lora_B")
        if a is None:
            return w
        (r0, r1), (c0, c1) = box
        A = self.lora.read(a, ((0, self.cfg.rank), (c0, c1))).float()
        B = self.lora.read(b, ((r0, r1), (0, self.cfg.rank))).float()
        return (w.float() + (B @ A) * self.cfg.scaling).to(w.dtype)


def export_peft(lora_dir: str, save_dir: str, overwrite: bool = False) -> None:
    """Write an HF peft adapter (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(hf_model, save_dir)` loads onto the HF model of the base."""
    import json
    import os

    from engine.checkpoint import _check_save_dir, hf_key_map, HF_DENSE, HF_MIXTRAL
    from engine.fileio import SafetensorsWriter, atomic_write_text, staged_directory

    src, cfg, base = open_lora(lora_dir)
    args = src.args
    names = hf_key_map(args, HF_MIXTRAL if args.n_experts else HF_DENSE)
    _check_save_dir(save_dir, overwrite)
    specs = src.specs()
    layout, keys = [], []
    for sp in specs:
        stem, part = sp.key.rsplit(".", 1)
        hf = names[stem + ".weight"][0][: -len(".weight")]
        keys.append(f"base_model.model.{hf}.{part}.weight")
        layout.append((keys[-1], torch.float32, sp.shape))
    targets = sorted({HF_TARGET_NAMES[t] for t in cfg.targets if not (args.n_experts and t in ("w1", "w2", "w3"))})
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
                      "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
                      "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base,
                      "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    with staged_directory(save_dir, overwrite) as stage:
        w = SafetensorsWriter(os.path.join(stage, "adapter_model.safetensors"), layout, {"format": "pt"})
        for key, sp in zip(keys, specs):
            w.write(key, src.read(sp, tuple((0, s) for s in sp.shape)).float())
        w.close()
        atomic_write_text(os.path.join(stage, "adapter_config.json"), json.dumps(adapter_config, indent=2) + "\n")


def load_for_inference(ckpt_dir: str, lora_dir: Optional[str], dtype, device):
    """The model for generation/scoring: ckpt_dir, plus a LoRA adapter merged into its weights.
    ckpt_dir may itself be an adapter directory from training (its lora_config.json names the base)."""
    import os

    from engine.checkpoint import CheckpointError, load_model

    if lora_dir is None and os.path.exists(os.path.join(ckpt_dir, LORA_CONFIG)):
        lora_dir = ckpt_dir
        _, base = read_lora_config(lora_dir)
        if not base:
            raise CheckpointError(f"{lora_dir}: the adapter names no base checkpoint; pass --ckpt_dir BASE --lora_dir {lora_dir}")
        ckpt_dir = base
    model = load_model(ckpt_dir, dtype=dtype, device=device)
    if lora_dir:
        load_lora_into(model, lora_dir)
        merge_lora(model)
    model.fuse_projections()
    return model, ckpt_dir
