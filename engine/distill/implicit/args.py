"""The flags of train_implicit.py's four stages, once each: the training loop's come from
engine/train/config.py (TrainConfig), the checkpoint, LoRA and parallelism ones are train.py's own
(the CheckpointFlag, ModelFlags and ParallelFlags mixins of engine/train/args.py); every check runs
here, before anything loads (the prerequisite checkpoints and whether their shapes fit the mapping
asked for are checked by engine/distill/implicit/stages.py, still before any model loads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from engine.distill.implicit.emulator import EMULATORS
from engine.distill.implicit.states import STATE_MAPS, STATE_NORMS, SUBSETS
from engine.runtime.cli import flag
from engine.runtime.errors import UserError
from engine.train.args import CheckpointFlag, ModelFlags, ParallelFlags
from engine.train.config import TrainConfig


# ImplicitArgs' own flags, in a base of their own so that --help (field order, bases first) lists them
# before the ParallelFlags they share with train.py.
@dataclass(kw_only=True)
class _LineFlags(TrainConfig):
    train_file: str = flag("`input||cot #### answer` lines, one example each (seed 003's format; "
                           "data/multiplication.py writes them).")
    label_file: Optional[str] = flag("held-out lines in the same format, evaluated at each epoch end (and every "
                                     "--eval_every steps); best/ keeps the best model.", None)
    max_seq_len: int = flag("lines whose longest sequence exceeds this many tokens are left out (counted), never "
                            "cut.", 512)
    max_new_tokens: int = flag("generation budget per held-out line (the teacher writes its whole chain of "
                               "thought).", 128)
    eval_batch_size: int = flag("held-out lines decoded together.", 64)
    max_eval_examples: int = flag("evaluate on the first N label_file lines only (0: all).", 0)
    eval_samples: int = flag("held-out lines whose generations (output, prediction, correct) every evaluation writes "
                             "to SAVE_DIR/samples.jsonl and the loggers (0: none; an emulator generates none).", 4)


@dataclass(kw_only=True)
class ImplicitArgs(ParallelFlags, _LineFlags):
    """What every stage reads: `input||cot #### answer` lines, held-out lines, parallelism."""

    STAGE: ClassVar[str] = ""
    LAUNCHER: ClassVar[str] = "train_implicit.py"

    def __post_init__(self):
        super().__post_init__()
        for name in ("eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len < 4:
            raise UserError(f"--max_seq_len must be >= 4, got {self.max_seq_len}")
        if self.max_eval_examples < 0:
            raise UserError(f"--max_eval_examples must be >= 0, got {self.max_eval_examples}")
        if self.eval_samples < 0:
            raise UserError(f"--eval_samples must be >= 0, got {self.eval_samples}")


@dataclass(kw_only=True)
class _FreshModel(ModelFlags, CheckpointFlag, ImplicitArgs):
    """A stage that starts a model from a checkpoint (teacher, mind_read, emulator), full or LoRA."""


@dataclass(kw_only=True)
class TeacherArgs(_FreshModel):
    """the explicit chain-of-thought teacher: BOS x EOS cot EOS answer EOS, loss on cot and answer."""

    STAGE: ClassVar[str] = "teacher"
    OBJECTIVE: ClassVar[str] = "implicit-teacher"
    SUMMARY: ClassVar[str] = ("Train the explicit chain-of-thought teacher on `x EOS cot EOS answer EOS` (loss on "
                              "the CoT and the answer); --cot False trains the no-CoT baseline instead.")

    cot: bool = flag("False: train the no-CoT baseline on `x EOS answer EOS` (same loop, same budget) instead of "
                     "a teacher.", True)


@dataclass(kw_only=True)
class _ReadsTeacher(_FreshModel):
    teacher_dir: str = flag("the teacher: a model directory saved by `train_implicit.py teacher` (its best/ or a "
                            "checkpoint-N/; its save_dir means its best/, else its newest checkpoint-N/).")
    state_map: str = flag("how states cross between models: mlp (one Linear-ReLU-Linear per layer, any widths) "
                          "or identity (equal widths only).", "mlp")
    state_map_hidden: int = flag("hidden width of each state MLP (0: 4 x its output width).", 0)
    state_norm: str = flag(
        "layernorm: every teacher state through a LayerNorm without parameters, as the authors "
        "(teacher.py:83); none: the raw residual stream.",
        "layernorm",
    )
    delta: str = flag(
        "CoT positions between teacher layers: dynamic ((s2 - s1) / (L - 1), the diagonal from the "
        "input's EOS to the CoT's) or a whole number (s1 + l * delta, stopping at s2), as the authors' --delta.",
        "dynamic",
    )
    subset: str = flag(
        "which teacher states: diagonal, first_column (every layer at the input's EOS) or "
        "last_column (every layer at the CoT's EOS; the authors' code gives first_column's here).",
        "diagonal",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.state_norm not in STATE_NORMS:
            raise UserError(f"--state_norm {self.state_norm!r} is not one of {', '.join(STATE_NORMS)}")
        if self.subset not in SUBSETS:
            hint = (
                " (the authors' code stops with an AssertionError there, teacher.py:45)"
                if self.subset in ("top_row", "bottom_row")
                else ""
            )
            raise UserError(f"--subset {self.subset!r} is not one of {', '.join(SUBSETS)}{hint}")
        self.delta = str(self.delta)
        if self.delta != "dynamic" and not (self.delta.isascii() and self.delta.isdigit()):
            raise UserError(f"--delta {self.delta!r} is neither dynamic nor a whole number of positions (0, 1, 2, ...)")
        if self.delta != "dynamic" and self.subset != "diagonal":
            raise UserError(f"--delta {self.delta} spaces the diagonal; --subset {self.subset} reads no diagonal")
        if self.state_map not in STATE_MAPS:
            raise UserError(f"--state_map {self.state_map!r} is not one of {', '.join(STATE_MAPS)}")
        if self.state_map_hidden < 0:
            raise UserError(f"--state_map_hidden must be >= 0, got {self.state_map_hidden}")
        if self.state_map_hidden and self.state_map != "mlp":
            raise UserError(f"--state_map_hidden {self.state_map_hidden} sizes MLPs, but --state_map "
                            f"{self.state_map} has none; leave it out or use --state_map mlp")


@dataclass(kw_only=True)
class MindReadArgs(_ReadsTeacher):
    """the mind-reading student: answers from x EOS with the teacher's diagonal states injected."""

    STAGE: ClassVar[str] = "mind_read"
    OBJECTIVE: ClassVar[str] = "implicit-mind-read"
    SUMMARY: ClassVar[str] = ("Train the mind-reading student: it reads `x EOS` and, before each layer l, its state "
                              "at that EOS is replaced by MLP_l(the frozen teacher's state on the CoT diagonal); "
                              "loss on the answer.")

    teacher_layers: str = flag("comma-separated teacher layer read by each student layer (default: the one at the "
                               "same relative depth).", "")


@dataclass(kw_only=True)
class EmulatorArgs(_ReadsTeacher):
    """the thought emulator: predicts the teacher's diagonal states from x EOS alone (MSE)."""

    STAGE: ClassVar[str] = "emulator"
    OBJECTIVE: ClassVar[str] = "implicit-emulator"
    SUMMARY: ClassVar[str] = ("Train the thought emulator: from `x EOS` alone, predict every teacher state on the CoT "
                              "diagonal (squared error), teacher layer t at the emulator layer at the same relative "
                              "depth: by the authors' emulator (a chain of predictions written back into its stream) "
                              "or a readout.")

    emulator: str = flag(
        "authors: their emulator (per layer an MLP of the state and a mixture embedding, an LSTM with "
        "attention over earlier layers, written back before the layer); readout: ours, a map of each "
        "unmodified layer input.",
        "authors",
    )
    mixture_size: int = flag("mixture components of the authors' emulator (1: a single learned vector).", 1)
    softmax_temperature: float = flag("temperature of the authors' emulator's soft mixture (mixture_size > 1).", 0.05)

    def __post_init__(self):
        super().__post_init__()
        if self.emulator not in EMULATORS:
            raise UserError(f"--emulator {self.emulator!r} is not one of {', '.join(EMULATORS)}")
        if self.mixture_size < 1:
            raise UserError(f"--mixture_size must be >= 1, got {self.mixture_size}")
        if not self.softmax_temperature > 0:
            raise UserError(f"--softmax_temperature must be > 0, got {self.softmax_temperature}")
        if self.emulator == "readout" and (self.mixture_size != 1 or self.softmax_temperature != 0.05):
            raise UserError("--mixture_size and --softmax_temperature belong to --emulator authors, not readout")
        if self.emulator == "authors" and self.state_map != "mlp":
            raise UserError(
                f"--state_map {self.state_map} maps states for --emulator readout; the authors' emulator "
                f"has its own MLPs (--state_map_hidden sizes them)"
            )


@dataclass(kw_only=True)
class CoupleArgs(ImplicitArgs):
    """the coupled student: reads the emulator's states; student, emulator and maps trained on answers."""

    STAGE: ClassVar[str] = "couple"
    OBJECTIVE: ClassVar[str] = "implicit-couple"
    SUMMARY: ClassVar[str] = ("Couple the emulator to the mind-reading student and train both (and their maps) on "
                              "the answer alone, no CoT; each model goes on as its stage trained it (full weights "
                              "or its LoRA adapter).")

    student_dir: str = flag("the mind-reading student: a model directory saved by `train_implicit.py mind_read`.")
    emulator_dir: str = flag("the emulator: a model directory saved by `train_implicit.py emulator` (same "
                             "teacher as the student).")


STAGE_ARGS = (TeacherArgs, MindReadArgs, EmulatorArgs, CoupleArgs)


@dataclass(kw_only=True)
class _EvaluateFlags:
    data_file: str = flag("`input||cot #### answer` lines (the CoT is read only by a mind-reading student's "
                          "teacher).")
    model_dirs: str = flag("comma-separated model directories saved by train_implicit.py (a stage's save_dir means "
                           "its best/).")
    batch_size: int = flag("lines decoded together (the same for every stage, so their examples/s compare).", 64)
    max_new_tokens: int = flag("generation budget per line.", 128)
    max_examples: int = flag("evaluate the first N lines only (0: all).", 0)
    output_file: Optional[str] = flag(
        "write what each model generated here, one JSON line per model and line: model_dir, stage, index, question, "
        "output (a teacher's `cot #### answer`), prediction (the answer read from it, null when none), answer (the "
        "line's), correct; an emulator, which generates nothing, has no lines.", None)
    results_file: Optional[str] = flag("also write the printed results (one per model) as a JSON list here.", None,
                                       role="output")
    overwrite: bool = flag("replace an existing output_file / results_file.", False)
    use_float16: bool = flag("run in fp16.", False)
    use_bfloat16: bool = flag("run in bf16.", False)


@dataclass(kw_only=True)
class EvaluateArgs(ParallelFlags, _EvaluateFlags):
    """saved stages on the same lines."""

    OBJECTIVE: ClassVar[str] = "implicit-evaluate"
    SUMMARY: ClassVar[str] = (
        "Accuracy and examples/s of saved stages on the same lines: the teacher decoding its CoT, the no-CoT "
        "baseline, the mind-reading student (states from the teacher on the gold CoT), the coupled student (states "
        "from its emulator); an emulator's state error.")

    def __post_init__(self):
        import os

        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples < 0:
            raise UserError(f"--max_examples must be >= 0, got {self.max_examples}")
        raw = self.model_dirs.split(",") if isinstance(self.model_dirs, str) else list(self.model_dirs)
        self.model_dirs = ",".join(d for d in raw if d)
        if not self.model_dirs:
            raise UserError("--model_dirs names no directory")
        out, res, data = (os.path.abspath(p) if p else None for p in (self.output_file, self.results_file,
                                                                        self.data_file))
        if out and out == res:
            raise UserError(f"--output_file and --results_file are the same file {self.output_file}; name two")
        for name, path in (("output_file", out), ("results_file", res)):
            if path == data:
                raise UserError(f"--{name} {getattr(self, name)} is the --data_file; name another file")
            if path and os.path.isdir(path):
                raise UserError(f"--{name} {getattr(self, name)} is a directory")
