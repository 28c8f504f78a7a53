"""Gradients under tensor and data parallelism: which parameters are copies on several ranks (from
models/sharding.py), summing the gradients of replicated KV heads, the data-parallel all-reduce,
TP-aware norm and clipping that never wait for the device, and fp16 loss scaling."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from engine.runtime import distributed
from engine.runtime.distributed import to_device
from models.sharding import WeightSpec, kv_replica_groups, lora_specs, tp_copies, weight_specs


def param_specs(model, lora_cfg=None) -> List[WeightSpec]:
    """The specs of every parameter the model holds: its weights, and its LoRA adapter's."""
    specs = weight_specs(model.args)
    if lora_cfg is not None:
        specs += lora_specs(model.args, lora_cfg.rank, lora_cfg.targets)
    return specs


def param_copies(model, lora_cfg=None) -> Dict[int, int]:
    """id(param) -> how many tensor-parallel ranks hold an identical copy of it (1: it is split)."""
    by_name = tp_copies(model.named_parameters(), model.args, model.tp_size, param_specs(model, lora_cfg))
    return {id(p): by_name[name] for name, p in model.named_parameters()}


class KVReplicaSync:
    """Sums the gradients of KV projections copied on several tensor-parallel ranks over the ranks
    that share each head (their true gradient is the sum of every copy's contribution)."""

    def __init__(self, model, info, lora_cfg=None):
        groups = kv_replica_groups(model.args, info.tp_size)
        kv = {sp.key for sp in param_specs(model, lora_cfg) if sp.kv}
        self.params = [p for name, p in model.named_parameters() if groups and name in kv and p.requires_grad]
        self.group = None
        if not self.params:
            return
        tp_start = info.rank - info.tp_rank
        for dp_base in range(0, info.world_size, info.tp_size):  # every rank creates every group
            for members in groups:
                g = dist.new_group([dp_base + m for m in members])
                if dp_base == tp_start and info.tp_rank in members:
                    self.group = g

    def __call__(self):
        if self.group is not None:
            all_reduce_coalesced([p.grad for p in self.params if p.grad is not None], self.group)


def all_reduce_coalesced(tensors: List[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    if not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, op=op, group=group)
        for t, synced in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(synced)


def clip_gradients(params, copies: Dict[int, int], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (every distinct tensor-parallel piece counted once), and the
    gradients scaled down to max_norm when above it (max_norm <= 0: not clipped). Everything stays
    on the device: one foreach norm, one all-reduce, one foreach multiply; nothing waits for it."""
    grads = [p.grad for p in params if p.grad is not None]
    inv_copies = torch.tensor([1.0 / copies.get(id(p), 1) for p in params if p.grad is not None])
    squares = torch.stack(torch._foreach_norm(grads)).float().pow(2)
    total = (squares * to_device(inv_copies, squares.device)).sum()
    dist.all_reduce(total, group=distributed.tp_group())
    norm = total.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


class DynamicLossScaler:
    """fp16 loss scaling: multiply the loss by `scale`; on inf/nan gradients (on any rank) skip the
    step and halve the scale; after `growth_interval` good steps double it. The scale is a power of
    two, so unscaling (a multiplication by 1 / scale) is exact."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale, self.growth_interval, self.min_scale = init_scale, growth_interval, min_scale
        self.good_steps = 0

    def unscale_(self, grads: List[torch.Tensor]) -> bool:
        """Divide the gradients by the current scale (the one the loss was multiplied by), in place, and
        say whether any gradient on any rank holds an Inf or NaN: one fused check-and-unscale per
        dtype (torch's AMP kernel, on CPU and GPU), one all-reduce, and the step's one host read."""
        found = torch.zeros(1, device=grads[0].device if grads else None)
        inv_scale = torch.full((1,), 1.0 / self.scale, device=found.device)
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)  # every rank skips together
        return bool(found.item())

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / 2, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, s):
        self.scale, self.good_steps = s["scale"], s["good_steps"]
