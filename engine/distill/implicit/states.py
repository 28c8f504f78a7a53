"""The hidden states implicit chain of thought moves between models (METHODS.md section 5).

Teacher state t of an example: the teacher's input to layer t (the residual stream entering the
block) at CoT position min(round(s1 + t * delta), s2), L the teacher's depth and delta (s2 - s1) /
(L - 1) by default: the "diagonal", from the EOS ending the input (layer 0) to the EOS ending the CoT
(last layer). The whole sum is rounded in float32, half to even, as the authors' code does
(da03/implicit_chain_of_thought src/models/teacher.py:41, 48-49). --subset first_column / last_column
read every layer at s1 / s2 instead. Every state is then passed through a LayerNorm without
parameters (teacher.py:24, 83; --state_norm none: the raw residual stream). A student layer l reads
the teacher layer at the same relative depth, round(l (L - 1) / (L_student - 1)), unless
--teacher_layers lists others.

States cross models through StateMaps: one small MLP per state (Linear - ReLU - Linear), from the
source width to the destination width, or the identity when both widths are equal. The maps are
replicated on every tensor-parallel rank (the residual stream they read and write is too).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.runtime.errors import UserError

STATE_MAPS = ("mlp", "identity")
STATE_NORMS = ("layernorm", "none")
SUBSETS = ("diagonal", "first_column", "last_column")
MAPS_FILE = "state_maps.safetensors"


def diagonal_positions(s1: int, s2: int, n_layers: int, delta="dynamic") -> List[int]:
    """min(round(s1 + l * delta), s2) for l = 0 .. n_layers - 1, delta (s2 - s1) / (n_layers - 1)
    ("dynamic") or a whole number of positions. As the authors' compute_positions_to_extract_per_layer
    (src/models/teacher.py:40-41, 48-49): the whole sum rounded (torch.round, half to even) in float32,
    so (3, 8, 3 layers) gives [3, 6, 8]. One layer with "dynamic": [s1] (theirs divides by zero)."""
    return list(_diagonal(int(s1), int(s2), int(n_layers), str(delta)))


@functools.lru_cache(maxsize=65536)
def _diagonal(s1: int, s2: int, n_layers: int, delta: str) -> tuple:
    first, last, layer_ids = torch.tensor(s1), torch.tensor(s2), torch.arange(n_layers)
    if delta == "dynamic":
        if n_layers == 1:
            return (s1,)
        step = (last - first) / (n_layers - 1)  # a float32 tensor, as theirs (teacher.py:41)
    else:
        step = int(delta)
    return tuple(torch.round(first + layer_ids * step).clamp(max=last).long().tolist())


@dataclass(frozen=True)
class StateSpec:
    """Which teacher states a stage reads and how they are normalised: --delta, --subset,
    --state_norm (recorded in implicit.json; the coupled stage checks its two models agree)."""

    delta: str = "dynamic"
    subset: str = "diagonal"
    norm: str = "layernorm"

    def positions(self, s1: int, s2: int, n_layers: int) -> List[int]:
        """The CoT position each of the n_layers teacher layers is read at (teacher.py:39-49, with
        last_column as the authors intend it: their code gives first_column's, teacher.py:42)."""
        if self.subset == "first_column":
            return [s1] * n_layers
        if self.subset == "last_column":
            return [s2] * n_layers
        return diagonal_positions(s1, s2, n_layers, self.delta)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine parameters over the width (teacher.py:24, 83: eps 1e-5, biased
        variance), in float32; or z unchanged (--state_norm none)."""
        if self.norm == "none":
            return z
        return F.layer_norm(z.float(), (z.shape[-1],), eps=1e-5)

    def to_dict(self) -> dict:
        return {"delta": self.delta, "subset": self.subset, "norm": self.norm}

    @classmethod
    def of(cls, meta: dict) -> "StateSpec":
        """The spec a saved stage recorded; a directory from before these flags read raw states."""
        return cls(**meta["states"]) if "states" in meta else cls(norm="none")


def same_depth(n_from: int, n_to: int) -> List[int]:
    """For each of n_from layers, the layer of an n_to-layer model at the same relative depth."""
    if n_from == 1:
        return [0]
    return [round(Fraction(l * (n_to - 1), n_from - 1)) for l in range(n_from)]


def parse_layers(text, n_student: int, n_teacher: int, flag: str = "--teacher_layers") -> List[int]:
    """--teacher_layers '0,2,4,5' (one teacher layer per student layer), or the same relative depth."""
    if text in (None, "", ()):
        return same_depth(n_student, n_teacher)
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        layers = [int(str(x).strip()) for x in items]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of layer numbers") from None
    if len(layers) != n_student:
        raise UserError(f"{flag} names {len(layers)} teacher layers but the student has {n_student} layers "
                        f"(one teacher layer per student layer)")
    bad = [x for x in layers if not 0 <= x < n_teacher]
    if bad:
        raise UserError(f"{flag}: layer {bad[0]} does not exist in the teacher, whose layers are 0..{n_teacher - 1}")
    return layers


def check_state_map(kind: str, d_in: int, d_out: int, what: str) -> None:
    if kind not in STATE_MAPS:
        raise UserError(f"--state_map {kind!r} is not one of {', '.join(STATE_MAPS)}")
    if kind == "identity" and d_in != d_out:
        raise UserError(f"--state_map identity needs equal widths, but {what} ({d_in} vs {d_out}); use "
                        f"--state_map mlp to map between them")


class StateMaps(nn.Module):
    """n maps from width d_in to d_out, applied state by state: [B, n, d_in] -> [B, n, d_out]."""

    def __init__(self, n: int, d_in: int, d_out: int, kind: str = "mlp", hidden: int = 0, seed: int = 0,
                 device=None):
        super().__init__()
        check_state_map(kind, d_in, d_out, "the states")
        self.n, self.d_in, self.d_out, self.kind = n, d_in, d_out, kind
        self.hidden = hidden or 4 * d_out
        if kind == "identity":
            self.mlps = nn.ModuleList()
            return
        with torch.random.fork_rng(devices=[]):  # same weights on every rank, global RNG untouched
            torch.manual_seed(seed)
            self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d_in, self.hidden), nn.ReLU(),
                                                    nn.Linear(self.hidden, d_out)) for _ in range(n))
        if device is not None:
            self.to(device)

    def config(self) -> dict:
        return {"n": self.n, "d_in": self.d_in, "d_out": self.d_out, "kind": self.kind, "hidden": self.hidden}

    def forward(self, states: torch.Tensor, which: Optional[Sequence[int]] = None) -> torch.Tensor:
        """[B, k, d_in] -> [B, k, d_out]: states[:, j] through map which[j] (default: map j)."""
        if self.kind == "identity":
            return states
        which = range(states.shape[1]) if which is None else which
        dtype = self.mlps[0][0].weight.dtype
        return torch.stack([self.mlps[i](states[:, j].to(dtype)) for j, i in enumerate(which)], dim=1)

    # ----- on disk: beside the model it feeds, for inference --------------------------------------
    def save(self, directory: str) -> None:
        save_module(self, os.path.join(directory, MAPS_FILE))

    @classmethod
    def load(cls, directory: str, device=None) -> "StateMaps":
        meta, tensors = read_module(directory, MAPS_FILE, "its state maps")
        maps = cls(int(meta["n"]), int(meta["d_in"]), int(meta["d_out"]), meta["kind"], int(meta["hidden"]))
        maps.load_state_dict(tensors)
        return maps.to(device) if device is not None else maps


# ----- a module beside the model it serves: its tensors and its config as metadata ------------------
def save_module(module: nn.Module, path: str) -> None:
    """module's tensors (float32) in a safetensors file, its config() as the file's metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, path, metadata={k: str(v) for k, v in module.config().items()})


def read_module(directory: str, filename: str, what: str):
    """(metadata, tensors) of a file save_module wrote; one sentence when the directory has none."""
    from safetensors import safe_open

    path = os.path.join(directory, filename)
    if not os.path.exists(path):
        raise UserError(f"{directory} holds no {filename} ({what}); was it saved by train_implicit.py?")
    with safe_open(path, "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


# ----- reading and replacing layer inputs (Transformer.forward_hidden's layer_hook) --------------
def record_hook(rows: torch.Tensor, positions: torch.Tensor, out: list, layers: Optional[set] = None):
    """A layer_hook appending h[rows[b], positions[b, l]] ([B, dim]) for every layer l (or those in
    `layers`); positions: [B, n_layers] or [B] (one position for every layer)."""

    def hook(layer: int, h: torch.Tensor) -> torch.Tensor:
        if layers is None or layer in layers:
            pos = positions if positions.dim() == 1 else positions[:, layer]
            out.append(h[rows, pos])
        return h

    return hook


def inject_hook(states: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
    """A layer_hook replacing, before layer l, the input of row b at positions[b] (its last input
    position) by states[b, l]; every other position is left as it is. Out of place, so autograd
    sends the gradient of the replaced entries to `states` (the maps) and none to what they replaced."""

    def hook(layer: int, h: torch.Tensor) -> torch.Tensor:
        return h.index_put((rows, positions), states[:, layer].to(h.dtype))

    return hook


def layer_inputs_at(model, tokens: torch.Tensor, positions: torch.Tensor, layers: Optional[Sequence[int]] = None):
    """The inputs of `model`'s layers at positions [B, n_layers] (the diagonal) or [B] (one position):
    [B, len(layers), dim] in the order of `layers` (repeats allowed), every layer's when None."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    wanted = list(range(model.args.n_layers)) if layers is None else list(layers)
    found: list = []
    hook = record_hook(rows, positions, found, set(wanted))
    model.forward_hidden(tokens, layer_hook=hook)
    by_layer = dict(zip(sorted(set(wanted)), found))
    return torch.stack([by_layer[l] for l in wanted], dim=1)
