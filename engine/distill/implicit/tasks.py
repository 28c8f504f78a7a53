"""The four stages as trainer Tasks (interface: engine/train/task.py), and the two ways a student gets
its states: from the teacher reading the gold CoT (mind-reading) or from the emulator (coupled).

  teacher    CE on `cot EOS answer EOS` after `BOS x EOS` (or on `answer EOS` alone: the no-CoT baseline)
  mind_read  CE on `answer EOS`; before student layer l, its input at the EOS ending x is replaced by
             map_l(teacher state of the teacher layer it reads); the teacher is frozen
  emulator   every teacher state predicted from `x EOS` alone: by the authors' emulator head (a chain of
             predictions written back into the emulator's stream; loss 1/2 the squared error summed
             over states and width, averaged over lines, as theirs), or (--emulator readout) by
             map_t(emulator's unmodified layer input at the EOS ending x), mean squared error per element
  couple     CE on `answer EOS`, the student reading the emulator's states; student, emulator and
             both sets of maps (or the emulator head) are trained together, no CoT anywhere
Teacher states are the StateSpec's (states.py): positions on the diagonal, LayerNorm'd by default.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from engine.distill.implicit.data import CoTExamples, Encoded, padded, shifted
from engine.distill.implicit.emulator import EmulatorHead
from engine.distill.implicit.states import StateMaps, StateSpec, inject_hook, layer_inputs_at
from engine.runtime.distributed import to_device
from engine.text.sequences import IGNORE
from engine.train.task import Batch, Task, make_batch, response_cross_entropy


# ----- tensors of a batch of lines, in one model's tokens -----------------------------------------
def teacher_inputs(encs: Sequence[Encoded], eos: int, n_layers: int, device, spec: StateSpec):
    """(`BOS x EOS cot EOS` [B, T], the position each teacher layer is read at [B, n_layers]): each
    row's own positions (the authors' code reuses row 0's delta for the whole batch, teacher.py:40-41)."""
    tokens = padded([e.x + [eos] + e.cot + [eos] for e in encs], eos)
    diag = torch.tensor([spec.positions(e.s1, e.s2, n_layers) for e in encs], dtype=torch.long)
    return to_device(tokens, device), to_device(diag, device)


def prompt_inputs(encs: Sequence[Encoded], eos: int, device):
    """(`BOS x EOS` [B, T] right-padded, position of each row's EOS [B])."""
    tokens = padded([e.prompt(eos) for e in encs], eos)
    return to_device(tokens, device), to_device(torch.tensor([e.s1 for e in encs], dtype=torch.long), device)


def answer_batch(encs: Sequence[Encoded], eos: int, device, cot: bool = False) -> Batch:
    """`BOS x EOS [cot EOS] answer EOS`, labels on everything after the EOS ending x; extra["s1"]: the
    position of that EOS per row. Counts and labelled rows are taken on the host (no device sync)."""
    pairs = [shifted(e.teacher_sequence(eos, cot), e.s1 + 1) for e in encs]
    inputs = padded([x for x, _ in pairs], eos)
    labels = padded([y for _, y in pairs], IGNORE)
    s1 = torch.tensor([e.s1 for e in encs], dtype=torch.long)
    return make_batch(inputs, labels, device, {"ce": int((labels != IGNORE).sum())}, int(inputs.numel()),
                      {"s1": to_device(s1, device)})


# ----- where a student's states come from ----------------------------------------------------------
def teacher_states(teacher, tokens, diag, layers: Sequence[int], spec: StateSpec) -> torch.Tensor:
    """The frozen teacher's inputs of `layers` at their positions, normalised as `spec` says:
    [B, len(layers), d_teacher]."""
    with torch.no_grad():
        return spec.normalize(layer_inputs_at(teacher, tokens, diag, layers))


def emulated_states(emulator, head, emulator_layers: Sequence[int], tokens, s1, teacher_layers: Sequence[int]):
    """The emulator's predictions of teacher states `teacher_layers`: [B, len, d_teacher]. head: the
    authors' EmulatorHead (it predicts every teacher state, one after another), or the readout's
    StateMaps: teacher state t from emulator layer emulator_layers[t] at the EOS ending x, through map t."""
    if isinstance(head, EmulatorHead):
        return head(emulator, tokens, s1)[:, list(teacher_layers)]
    own = layer_inputs_at(emulator, tokens, s1, [emulator_layers[t] for t in teacher_layers])
    return head(own, which=teacher_layers)


class _Lines(Task):
    """What every stage's task shares: the lines, their lengths, the device, and `files`, which writes
    the stage's own files (implicit.json, its state maps: engine/distill/implicit/stages.py) into every
    model directory the trainer saves (None: a task on held-out lines, never saved)."""

    def __init__(self, examples: CoTExamples, device, files: Optional[Callable[[str], None]] = None):
        self.examples, self.device, self.files = examples, device, files

    def write_files(self, directory: str) -> None:
        if self.files is not None:
            self.files(directory)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def encs(self, view: str, positions: List[int]) -> List[Encoded]:
        return [self.examples.get(view, p) for p in positions]

    def eos(self, view: str) -> int:
        return self.examples.eos[view]


class CoTTeacherTask(_Lines):
    """The explicit-CoT teacher (or, with cot=False, the no-CoT baseline)."""

    weights = {"ce": 1.0}

    def __init__(self, examples: CoTExamples, device, cot: bool = True, files=None):
        super().__init__(examples, device, files)
        self.cot = cot

    def lengths(self, epoch: int) -> List[int]:
        eos = self.eos("model")
        return [len(self.examples.get("model", p).teacher_sequence(eos, self.cot)) - 1 for p in range(len(self.examples))]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        return answer_batch(self.encs("model", positions), self.eos("model"), self.device, self.cot)

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        return {"ce": response_cross_entropy(model, model.forward_hidden(batch.inputs), batch.labels, batch.label_rows)}


class MindReadTask(_Lines):
    """The student answers from `x EOS` with the teacher's states injected through its maps."""

    weights = {"ce": 1.0}

    def __init__(self, examples: CoTExamples, device, teacher, maps: StateMaps, teacher_layers: Sequence[int],
                 spec: StateSpec, files=None):
        super().__init__(examples, device, files)
        self.teacher, self.maps, self.teacher_layers, self.spec = teacher, maps, list(teacher_layers), spec

    def extra_modules(self):
        return [self.maps]

    def lengths(self, epoch: int) -> List[int]:
        return [len(self.examples.get("teacher", p).teacher_sequence(0)) for p in range(len(self.examples))]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        batch = answer_batch(self.encs("model", positions), self.eos("model"), self.device)
        t_tokens, t_diag = teacher_inputs(self.encs("teacher", positions), self.eos("teacher"),
                                          self.teacher.args.n_layers, self.device, self.spec)
        batch.n_tokens += int(t_tokens.numel())
        batch.extra.update(t_tokens=t_tokens, t_diag=t_diag)
        return batch

    def states(self, batch: Batch) -> torch.Tensor:
        z = teacher_states(self.teacher, batch.extra["t_tokens"], batch.extra["t_diag"], self.teacher_layers, self.spec)
        return self.maps(z)

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        rows = torch.arange(batch.inputs.shape[0], device=batch.inputs.device)
        hook = inject_hook(self.states(batch), rows, batch.extra["s1"])
        hidden = model.forward_hidden(batch.inputs, layer_hook=hook)
        return {"ce": response_cross_entropy(model, hidden, batch.labels, batch.label_rows)}


class EmulatorTask(_Lines):
    """The emulator predicts every teacher state from `x EOS` alone. head: the authors' EmulatorHead,
    loss 1/2 the squared error summed over states and width, averaged over lines (emulator.py:58-66:
    the count is the lines); or the readout's StateMaps, the squared error averaged per element (the
    count is lines x teacher layers x teacher width)."""

    weights = {"state": 1.0}

    def __init__(self, examples: CoTExamples, device, teacher, head, emulator_layers: Sequence[int], spec: StateSpec,
                 files=None):
        super().__init__(examples, device, files)
        self.teacher, self.head, self.emulator_layers, self.spec = teacher, head, list(emulator_layers), spec
        self.all_teacher_layers = list(range(teacher.args.n_layers))
        self.authors = isinstance(head, EmulatorHead)

    def extra_modules(self):
        return [self.head]

    def lengths(self, epoch: int) -> List[int]:
        return [len(self.examples.get("teacher", p).teacher_sequence(0)) for p in range(len(self.examples))]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        tokens, s1 = prompt_inputs(self.encs("model", positions), self.eos("model"), self.device)
        t_tokens, t_diag = teacher_inputs(self.encs("teacher", positions), self.eos("teacher"),
                                          self.teacher.args.n_layers, self.device, self.spec)
        elements = len(positions) * self.teacher.args.n_layers * self.teacher.args.dim
        # labels unused (the loss is on states): the inputs stand in for them
        return Batch(tokens, tokens, {"state": len(positions) if self.authors else elements},
                     int(tokens.numel() + t_tokens.numel()),
                     {"s1": s1, "t_tokens": t_tokens, "t_diag": t_diag, "elements": elements})

    def squared_error(self, model, batch: Batch) -> torch.Tensor:
        """The squared error summed over lines, teacher states and width (a scalar)."""
        target = teacher_states(self.teacher, batch.extra["t_tokens"], batch.extra["t_diag"], self.all_teacher_layers,
                                self.spec)
        pred = emulated_states(model, self.head, self.emulator_layers, batch.inputs, batch.extra["s1"],
                               self.all_teacher_layers)
        return (pred.float() - target.float()).pow(2).sum()

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        error = self.squared_error(model, batch)
        return {"state": error / 2 if self.authors else error}


class CoupleTask(_Lines):
    """The student answers from `x EOS` with the emulator's states; student (the trainer's model),
    emulator, its head (or maps) and the student's maps learn from the answer CE alone, no teacher and
    no normalisation (as train_coupled_emulator_and_student.py:139-151). emulator_lora: the emulator's
    LoRA config (None: full weights), for the trainer to treat it as the tensor-parallel model it is."""

    weights = {"ce": 1.0}

    def __init__(self, examples: CoTExamples, device, emulator, emulator_head, emulator_layers,
                 student_maps: StateMaps, teacher_layers: Sequence[int], emulator_lora=None, files=None):
        super().__init__(examples, device, files)
        self.emulator, self.emulator_head, self.emulator_layers = emulator, emulator_head, list(emulator_layers)
        self.student_maps, self.teacher_layers, self.emulator_lora = student_maps, list(teacher_layers), emulator_lora

    def extra_modules(self):
        return [self.emulator, self.emulator_head, self.student_maps]

    def parallel_models(self):
        return [(self.emulator, self.emulator_lora)]

    def lengths(self, epoch: int) -> List[int]:
        eos = self.eos("model")
        return [len(self.examples.get("model", p).teacher_sequence(eos, False)) - 1 for p in range(len(self.examples))]

    def micro_batch(self, positions: List[int], epoch: int) -> Batch:
        batch = answer_batch(self.encs("model", positions), self.eos("model"), self.device)
        e_tokens, e_s1 = prompt_inputs(self.encs("emulator", positions), self.eos("emulator"), self.device)
        batch.n_tokens += int(e_tokens.numel())
        batch.extra.update(e_tokens=e_tokens, e_s1=e_s1)
        return batch

    def states(self, batch: Batch) -> torch.Tensor:
        z = emulated_states(self.emulator, self.emulator_head, self.emulator_layers, batch.extra["e_tokens"],
                            batch.extra["e_s1"], self.teacher_layers)
        return self.student_maps(z)

    def loss_sums(self, model, batch: Batch) -> Dict[str, torch.Tensor]:
        rows = torch.arange(batch.inputs.shape[0], device=batch.inputs.device)
        hidden = model.forward_hidden(batch.inputs, layer_hook=inject_hook(self.states(batch), rows, batch.extra["s1"]))
        return {"ce": response_cross_entropy(model, hidden, batch.labels, batch.label_rows)}
