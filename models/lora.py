"""LoRA on the tensor-parallel linear layers (which layers, and how each tensor is split: models/sharding.py).

Column-parallel layer (q/k/v, gate/up, the output head): A [r, in] replicated, B [out/tp, r] split
  like the base. The A output is replicated; `copy_to_tp` on it sums the partial gradients the
  ranks send back through their B shards, so A's gradient is complete and equal on every rank.
Row-parallel layer (o, down): A [r, in/tp] split like the base input, its output all-reduced,
  B [out, r] replicated.
Scaling alpha / r as in peft; B starts at zero, A as peft's kaiming-uniform, drawn in full from a
seed and the weight's name and then sliced, so any tensor-parallel size starts from the same adapter.
LoRA weights stay fp32 whatever the base precision. Merging is local on each rank.

Layers get LoRA by class swap (`LoRAColumnParallelLinear` / `LoRARowParallelLinear` subclass the
parallel layers), so the base weights keep their names and checkpoints load unchanged. Adapters on
disk: engine/checkpoint/adapters.py.
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

from models.errors import UserError
from models.parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tp, reduce_from_tp
from models.sharding import ALL_TARGETS, KNOWN_TARGETS, box_shape, lora_specs, shard_box


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
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < float("inf")):
            raise UserError(
                f"--lora_alpha must be a finite number > 0 (the adapter is scaled by alpha / rank; 0 trains nothing), "
                f"got {self.alpha}"
            )
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
    """Freeze the model and add LoRA to the layers models.sharding.lora_layers names for these
    targets (MoE experts stay frozen); returns their names."""
    if "output" in cfg.targets and model.output is None:
        raise UserError("--lora_targets output: this model ties its output head to the token embeddings; "
                        "leave output out of --lora_targets")
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
    specs = {sp.key: sp for sp in lora_specs(model.args, cfg.rank, cfg.targets)}
    names = sorted({key.rsplit(".", 1)[0] for key in specs})
    for name in names:
        module = model.get_submodule(name)
        module.__class__ = LoRAColumnParallelLinear if isinstance(module, ColumnParallelLinear) else LoRARowParallelLinear
        a, b = specs[name + ".lora_A"], specs[name + ".lora_B"]
        A = _init_A(name, a.shape, cfg.seed)[tuple(slice(s, e) for s, e in shard_box(a, rank, tp, model.args))]
        module.lora_A = nn.Parameter(A.contiguous().to(device))
        module.lora_B = nn.Parameter(torch.zeros(box_shape(shard_box(b, rank, tp, model.args)), device=device))
        module.lora_scaling = cfg.scaling
        module.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        module.merged = False
    if not names:
        raise UserError(f"--lora_targets {','.join(cfg.targets)} matched no layer of this model")
    return names


def lora_modules(model: nn.Module) -> Dict[str, _LoRAMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRAMixin)}


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's LoRA tensors, named '<layer>.lora_A' / '<layer>.lora_B'."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()
