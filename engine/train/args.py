"""The flags every objective shares, once: name, type, default, one line of help and checks.

`TrainConfig` (engine/train/config.py) holds what the training loop needs; `TrainArgs` adds what the
launchers need (checkpoint, data, LoRA, evaluation, parallelism), those train_implicit.py's stages
share as mixins (CheckpointFlag, ModelFlags, ParallelFlags). Each objective in engine/distill/
subclasses TrainArgs with its own flags and `make_task` (and `make_evaluator` where it evaluates
otherwise);
`launcher(cls, ..., run=run_training)` (engine/runtime/cli.py) turns the classes into the fire entry
point of train.py / train_mcc.py: its signature, its --help, the strict unknown-flag check and the
README flag test all read these fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

from engine.runtime.cli import flag
from engine.runtime.errors import UserError
from engine.train.config import TrainConfig


@dataclass(kw_only=True)
class CheckpointFlag:
    """The checkpoint a run starts its model from (train.py / train_mcc.py and the implicit stages that
    start a model)."""

    ckpt_dir: str = flag("native checkpoint with one shard per tensor-parallel rank (or an HF directory).")


@dataclass(kw_only=True)
class ModelFlags:
    """How that model is fine-tuned: fully or through LoRA (engine/train/launch.py build_model)."""

    model_type: Optional[str] = flag("registry name; a lora- prefix means LoRA (the checkpoint's params.json wins "
                                     "for shapes).", None)
    lora_rank: int = flag("LoRA rank (> 0 with a lora- model type); -1 for full fine-tuning.", -1)
    lora_alpha: Optional[float] = flag("LoRA alpha (scaling alpha / rank); default: the rank.", None)
    lora_dropout: float = flag("dropout on the LoRA input.", 0.0)
    lora_targets: str = flag("comma-separated projections to adapt: wq,wk,wv,wo (attention), w1,w2,w3 (MLP), "
                             "output (head).", "wq,wk,wv,wo,w1,w2,w3")

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.check_lora_flags()

    def check_lora_flags(self) -> None:
        """The LoRA flags, before anything loads: a valid adapter for a lora- model type, none otherwise."""
        from models.lora import LoRAConfig

        if self.lora_rank > 0:
            LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
        elif self.lora_rank not in (0, -1):
            raise UserError(f"--lora_rank must be > 0 (LoRA) or -1 (full fine-tuning), got {self.lora_rank}")
        else:
            for name, off in (("lora_alpha", None), ("lora_dropout", 0.0)):
                if getattr(self, name) != off:
                    raise UserError(
                        f"--{name} {getattr(self, name)} has no effect with --lora_rank {self.lora_rank} (full "
                        f"fine-tuning); pass a lora- --model_type and --lora_rank > 0 for LoRA"
                    )
        if self.model_type is not None:
            from models.registry import parse_model_type

            lora_variant = parse_model_type(self.model_type)[1]
            if lora_variant != (self.lora_rank > 0):
                raise UserError(
                    f"--model_type {self.model_type} with --lora_rank {self.lora_rank}: a lora- model type "
                    f"trains LoRA (--lora_rank > 0), any other full fine-tuning (--lora_rank -1)"
                )


@dataclass(kw_only=True)
class ParallelFlags:
    """How the processes of a training job split: tensor-parallel size and device."""

    tp_size: Optional[int] = flag("tensor-parallel size (default: all processes); world size / tp_size replicas "
                                  "train data-parallel.", None)
    device: Optional[str] = flag("cpu or cuda (default: cuda when every process on this node has a GPU of its own, "
                                 "cpu on a machine without one).", None)


@dataclass(kw_only=True)
class TeacherCheckpointFlag:
    """A teacher run frozen beside the student (engine/train/teacher.py): teacher_kl's online teacher,
    on_policy's teacher."""

    teacher_ckpt_dir: Optional[str] = flag("online teacher: a checkpoint of ours (any family, one shard per "
                                           "tensor-parallel rank), run frozen in this job.", None)


@dataclass(kw_only=True)
class DivergenceFlags:
    """Which divergence between the teacher's and the student's next-token distributions a token-level
    objective trains on (teacher_kl, on_policy): models/vocab_parallel.py computes each on the
    vocabulary shards. check_divergence_flags checks them."""

    divergence: str = flag("forward_kl: T^2 KL(teacher || student); reverse_kl: T^2 KL(student || teacher) "
                           "(MiniLLM); jsd: GKD's generalised Jensen-Shannon divergence with --jsd_beta.",
                           "forward_kl")
    jsd_beta: float = flag("beta of --divergence jsd, as TRL's GKD: 0 is forward KL, 1 reverse KL, in between "
                           "beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) "
                           "student.", 0.5)
    kl_temperature: float = flag("temperature T softening both distributions of the divergence (scaled by T^2).",
                                 1.0)


def check_divergence_flags(divergence: str, beta: float, temperature: float) -> None:
    from models.vocab_parallel import DIVERGENCES

    if divergence not in DIVERGENCES:
        raise UserError(f"--divergence {divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if not 0 <= beta <= 1:
        raise UserError(f"--jsd_beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise UserError(f"--kl_temperature must be > 0, got {temperature}")


# TrainArgs' own flags sit between the mixins', in links of a chain: a dataclass orders its fields
# base by base, most distant first, and that order is the order of --help and of run_config.json.
@dataclass(kw_only=True)
class _TaskFlag(TrainConfig):
    task: str = flag("GSM8K / SVAMP / ASDiv / CSQA / ARITH: how answers are read during evaluation.")


@dataclass(kw_only=True)
class _DataFlags(CheckpointFlag, _TaskFlag):
    train_file: str = flag("MCC-KD JSON list: instruction, output (a rationale or a list of them), label.")
    label_file: Optional[str] = flag("evaluation records (instruction, label), scored by greedy generation.", None)


@dataclass(kw_only=True)
class _EvalFlags(ModelFlags, _DataFlags):
    eval_batch_size: int = flag("sequences decoded together during evaluation.", 64)
    max_seq_len: int = flag("cut longer sequences (counted and reported).", 1024)
    max_new_tokens: int = flag("generation budget: new tokens per response decoded in evaluation (and sampled by "
                               "--objective on_policy).", 256)
    template: str = flag("prompt template: default or none (recorded with every saved checkpoint for infer.py).",
                         "default")
    max_eval_examples: int = flag("evaluate on the first N label_file records only (0: all).", 0)
    eval_samples: int = flag("evaluation records whose generations (output, prediction, correct) every evaluation "
                             "writes to SAVE_DIR/samples.jsonl and the loggers (0: none).", 4)
    scoring: str = flag(
        "how evaluation scores an answer (and so picks best/): ours (the answer the output states, by exact "
        "value), exact (the whole output must equal the label string; SVAMP / ASDiv: Python arithmetic "
        "values compared with ==, as distilling step-by-step scores) or mcc (the last number of the last "
        "line, as written, equal to the label: MCC-KD's code).",
        "ours",
    )
    report: str = flag(
        "evaluation lines: ours (accuracy = correct / all) or authors (also accuracy_answered = correct / "
        "answered and answered, the MCC-KD authors' accuracy).",
        "ours",
    )
    formats: Optional[str] = flag(
        "data formats to train on, comma separated (icl_answer, icl_cot, zs_answer, zs_cot: "
        "records from data/make_formats.py); each batch holds one format (default: every "
        "format in the file).",
        None,
    )
    deepspeed: Optional[str] = flag(
        "DeepSpeed config JSON: ZeRO stage 1/2 over the data-parallel group.", None, role="input"
    )


@dataclass(kw_only=True)
class TrainArgs(ParallelFlags, _EvalFlags):
    """The flags of every objective; a subclass names its OBJECTIVE and builds its Task (make_task)."""

    OBJECTIVE: ClassVar[str] = ""
    LAUNCHER: ClassVar[str] = "train.py"
    SUMMARY: ClassVar[str] = ("Train a student on teacher rationales (supervised; the loss covers the response "
                              "tokens only).")

    def __post_init__(self):
        from engine.text.answers import check_task
        from engine.text.prompts import format_prompt

        super().__post_init__()
        from engine.infer.metrics import check_report
        from engine.text.answers import check_scoring

        self.task = check_task(self.task)
        check_scoring(self.scoring)
        check_report(self.report)
        format_prompt("", self.template)
        for name in ("eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 0:
            raise UserError(f"--eval_samples must be >= 0, got {self.eval_samples}")
        if self.max_seq_len < 2:
            raise UserError(f"--max_seq_len must be >= 2, got {self.max_seq_len}")
        if not self.label_file:  # evaluation flags without records to evaluate would be silently ignored
            for name, off in (("eval_every", 0), ("eval_at_start", False), ("max_eval_examples", 0)):
                if getattr(self, name) != off:
                    raise UserError(f"--{name} {getattr(self, name)} evaluates on --label_file, which is not given")
        from engine.train.batching import parse_formats

        parse_formats(self.formats)
        if self.deepspeed:
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise UserError(f"--deepspeed {self.deepspeed} needs the deepspeed package (pip install deepspeed)")

    def make_task(self, records, tokenizer, max_len: int, info):
        """The objective's Task over the training records."""
        raise NotImplementedError(f"{type(self).__name__} names no Task")

    def make_evaluator(self, records, tokenizer, info):
        """What scores the model on --label_file during training (engine/train/evaluator.py)."""
        from engine.train.evaluator import Decoding, GenerationEvaluator

        return GenerationEvaluator(records, tokenizer, info, Decoding.of(self))


def run_record(args) -> dict:
    """The flags of a run, as run_config.json records them (and the --config file they came from)."""
    from engine.runtime.cli import loaded_config

    return {"launcher": args.LAUNCHER, "objective": args.OBJECTIVE,
            **{k: v for k, v in asdict(args).items() if k != "betas"}, **loaded_config()}
