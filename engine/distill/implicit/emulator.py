"""The authors' thought emulator on our decoders (--emulator authors, the default): everything
da03/implicit_chain_of_thought's Emulator adds to its GPT-2 (src/models/emulator.py:25-36), run
before every block as a layer_hook the way their forward_emulator runs it
(src/models/modeling_gpt2_implicit.py:148-239). Before emulator layer layer_map[j], with z its input
at the EOS ending x:

  m  = the mixture embedding: the single learned vector (size 1), else softmax(z W^T / T) W
  f  = mlps[j]([z ; m])                     the prediction of teacher state j (what the loss reads)
  o  = LSTM(f + c, carried state)           one step; c the previous step's attention context (0 first)
  c  = softmax_i(K q) K  over the keys K of steps 0..j-1, q = query_proj(o); values are the keys,
       no 1/sqrt(d) scaling; key_proj(o) joins K after attending
  h[b, s1_b] = out_proj([o ; c])            replaces the layer's input there (no residual add)

so every later layer builds on the earlier predictions. Ours generalises it to an emulator of
another width or depth than the teacher: z and the write-back live in the emulator's width, f, the
LSTM, keys and context in the teacher's, and teacher state j is predicted before emulator layer
layer_map[j] (strictly increasing; the identity when the depths are equal, the authors' only case).
The head is replicated on every tensor-parallel rank, like the residual stream it reads and writes.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
from torch import nn

from engine.distill.implicit.states import read_module, save_module
from engine.runtime.errors import UserError

EMULATORS = ("authors", "readout")
HEAD_FILE = "emulator_head.safetensors"


class EmulatorHead(nn.Module):
    """The authors' emulator modules; parameter names as theirs (mlps.j.0/2, mixture_components, rnn,
    key_proj, query_proj, out_proj). PyTorch's default initialisation, as theirs, seeded so that every
    rank holds the same replica."""

    def __init__(
        self,
        layer_map: Sequence[int],
        d_model: int,
        d_teacher: int,
        mixture_size: int = 1,
        softmax_temperature: float = 0.05,
        hidden: int = 0,
        seed: int = 0,
        device=None,
    ):
        super().__init__()
        self.layer_map = [int(x) for x in layer_map]
        if any(b <= a for a, b in zip(self.layer_map, self.layer_map[1:])):
            raise UserError(f"the emulator head needs strictly increasing layers, got {self.layer_map}")
        self.step_of = {layer: j for j, layer in enumerate(self.layer_map)}
        self.d_model, self.d_teacher, self.hidden = d_model, d_teacher, hidden or 4 * d_teacher
        self.mixture_size, self.softmax_temperature = mixture_size, softmax_temperature
        d_t = d_teacher
        with torch.random.fork_rng(devices=[]):  # same weights on every rank, global RNG untouched
            torch.manual_seed(seed)
            self.mlps = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * d_model, self.hidden), nn.ReLU(), nn.Linear(self.hidden, d_t))
                for _ in self.layer_map
            )
            self.mixture_components = nn.Embedding(mixture_size, d_model)
            self.rnn = nn.LSTM(input_size=d_t, hidden_size=d_t, num_layers=1, batch_first=False, dropout=0)
            self.key_proj = nn.Linear(d_t, d_t)
            self.query_proj = nn.Linear(d_t, d_t)
            self.out_proj = nn.Linear(2 * d_t, d_model)
        if device is not None:
            self.to(device)

    @property
    def n_states(self) -> int:
        return len(self.layer_map)

    def config(self) -> dict:
        return {
            "layer_map": ",".join(map(str, self.layer_map)),
            "d_model": self.d_model,
            "d_teacher": self.d_teacher,
            "mixture_size": self.mixture_size,
            "softmax_temperature": self.softmax_temperature,
            "hidden": self.hidden,
        }

    def mixture_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """modeling_gpt2_implicit.py:194-201: size 1, the one vector for every row; else a soft mixture
        of the components weighted by softmax(z W^T / T), the same in training and inference."""
        weight = self.mixture_components.weight
        if weight.shape[0] == 1:
            return weight.expand(z.shape[0], -1)
        return (z @ weight.T / self.softmax_temperature).softmax(dim=-1) @ weight

    def forward(self, model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The predicted teacher states [B, n_states, d_teacher] of `model` (the emulator's decoder)
        reading tokens [B, T]; positions [B]: each row's EOS ending x."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        run = EmulatorRun(self, rows, positions)
        model.forward_hidden(tokens, layer_hook=run)
        if len(run.predictions) != self.n_states:
            raise UserError(
                f"the emulator head predicts before layers {self.layer_map}, but the emulator has "
                f"{model.args.n_layers} layers"
            )
        return torch.stack(run.predictions, dim=1)

    # ----- on disk: beside the emulator it runs on ---------------------------------------------
    def save(self, directory: str) -> None:
        save_module(self, os.path.join(directory, HEAD_FILE))

    @classmethod
    def load(cls, directory: str, device=None) -> "EmulatorHead":
        meta, tensors = read_module(directory, HEAD_FILE, "its emulator head")
        head = cls([int(x) for x in meta["layer_map"].split(",")], int(meta["d_model"]), int(meta["d_teacher"]),
                   int(meta["mixture_size"]), float(meta["softmax_temperature"]), int(meta["hidden"]))
        head.load_state_dict(tensors)
        return head.to(device) if device is not None else head


class EmulatorRun:
    """The layer_hook of one emulator forward: it carries the LSTM state, the keys and the context from
    layer to layer, and collects the predictions (the authors' f_h_cs, emulator.py:55)."""

    def __init__(self, head: EmulatorHead, rows: torch.Tensor, positions: torch.Tensor):
        self.head, self.rows, self.positions = head, rows, positions
        self.predictions: List[torch.Tensor] = []
        self.rnn_state = None
        self.keys: Optional[torch.Tensor] = None  # [B, steps so far, d_teacher]
        self.context: Optional[torch.Tensor] = None

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        j = self.head.step_of.get(layer)
        if j is None:
            return h
        head = self.head
        dtype = head.key_proj.weight.dtype
        z = h[self.rows, self.positions].to(dtype)  # line 176: this layer's input at s1
        f = head.mlps[j](torch.cat((z, head.mixture_embedding(z)), dim=-1))  # line 202
        self.predictions.append(f)
        if self.context is None:
            self.context = torch.zeros_like(f)  # lines 211-212
        output, self.rnn_state = head.rnn((f + self.context).unsqueeze(0), self.rnn_state)  # line 213
        output = output.squeeze(0)
        key = head.key_proj(output)
        if self.keys is not None:  # lines 216-222: attend over the earlier steps only
            scores = torch.bmm(self.keys, head.query_proj(output).unsqueeze(-1))  # [B, j, 1], unscaled
            self.context = torch.bmm(scores.softmax(dim=1).transpose(1, 2), self.keys).squeeze(1)
            self.keys = torch.cat((self.keys, key.unsqueeze(1)), dim=1)
        else:
            self.keys = key.unsqueeze(1)
        write = head.out_proj(torch.cat((output, self.context), dim=-1))  # line 225
        return h.index_put((self.rows, self.positions), write.to(h.dtype))  # lines 232-239: replaces it
