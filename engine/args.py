"""Every training flag, once: its name, type, default, one line of help and its checks.

`TrainConfig` holds what the training loop needs (engine/trainer.py); `TrainArgs` adds what the
launchers need (checkpoint, data, LoRA, evaluation, parallelism) and builds the objective's Task;
an objective with flags of its own subclasses it (`MCCArgs`). `launcher(cls)` turns a class into the
fire entry point of train.py / train_mcc.py: its signature, its --help, the strict unknown-flag
check and the README flag test all read these fields. Adding an objective = a subclass here with
its fields and `make_task`, and its Task in engine/tasks.py.
"""
from __future__ import annotations

import inspect
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import ClassVar, Optional

from engine.errors import UserError
from models.transformer import CHECKPOINT_POLICIES



def flag(help: str, default=MISSING):
    """A command-line flag: a dataclass field with its one line of help."""
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class TrainConfig:
    """What the training loop needs; every setting is checked here, before any model loads."""

    save_dir: str = flag("where checkpoint-N/, best/, metrics.jsonl and curves.png go.")
    epochs: int = flag("passes over the training data.", 1)
    max_steps: int = flag("total optimizer steps (> 0 overrides epochs).", 0)
    exit_after_steps: int = flag("stop after N steps as if preempted, keeping the full schedule (for resume).", 0)
    max_batch_size: int = flag("questions per micro-batch, summed over data-parallel replicas.", 4)
    accumulation_steps: int = flag("micro-batches per optimizer step.", 1)
    lr: float = flag("peak learning rate (AdamW).", 1e-5)
    weight_decay: float = flag("AdamW weight decay on matrices.", 0.0)
    warmup_steps: int = flag("linear warm-up steps.", 0)
    schedule: str = flag("cosine, linear or constant after warm-up.", "cosine")
    min_lr_ratio: float = flag("final learning rate as a fraction of lr.", 0.0)
    max_grad_norm: float = flag("clip the global gradient norm (0: off).", 1.0)
    use_float16: bool = flag("fp16 compute with dynamic loss scaling (overflowing steps are skipped).", False)
    use_bfloat16: bool = flag("bf16 compute.", False)
    seed: int = flag("seed of LoRA initialisation, data order and dropout.", 0)
    save_every: int = flag("also save a checkpoint every N steps (always at each epoch end).", 0)
    keep_checkpoints: int = flag("how many checkpoint-N directories to keep (0: all).", 2)
    eval_every: int = flag("also evaluate every N steps (always at each epoch end).", 0)
    eval_at_start: bool = flag("evaluate once before training.", False)
    log_every: int = flag("write a metrics line every N steps.", 1)
    resume: bool = flag("continue from the latest checkpoint in save_dir (weights, optimizer, schedule, RNG, "
                        "data position).", False)
    checkpoint_activations: typing.Any = flag(
        "recompute activations in backward to save memory: False/none, True/full (whole blocks), selective "
        "(keep matmul and attention outputs, recompute the rest).", False)
    checkpoint_fraction: float = flag("checkpoint only this fraction of the layers (from the first), e.g. 0.5.", 1.0)
    compile: Optional[bool] = flag("compile each decoder block with torch.compile (default: on a GPU; False: eager).",
                                   None)
    # not flags
    betas: tuple = (0.9, 0.999)
    bucket: bool = True  # length bucketing of batches
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        from engine.precision import dtype_from_flags

        minimum = {"max_batch_size": 1, "accumulation_steps": 1, "log_every": 1, "epochs": 0, "max_steps": 0,
                   "exit_after_steps": 0, "warmup_steps": 0, "save_every": 0, "keep_checkpoints": 0, "eval_every": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise UserError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise UserError("--epochs 0 trains nothing; pass --epochs >= 1 or --max_steps > 0")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            raise UserError(f"--max_grad_norm must be >= 0 (0: off), got {self.max_grad_norm}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"--schedule {self.schedule!r} is not one of cosine, linear, constant")
        if os.path.exists(self.save_dir) and not os.path.isdir(self.save_dir):
            raise UserError(f"--save_dir {self.save_dir} exists and is a file, not a directory")
        policy = {True: "full", False: "none", "True": "full", "False": "none"}.get(self.checkpoint_activations,
                                                                                   self.checkpoint_activations)
        if policy not in CHECKPOINT_POLICIES:
            raise UserError(f"--checkpoint_activations {self.checkpoint_activations!r} is not one of "
                            f"True, False, {', '.join(CHECKPOINT_POLICIES)}")
        self.checkpoint_activations = policy
        if not 0 < self.checkpoint_fraction <= 1:
            raise UserError(f"--checkpoint_fraction must be in (0, 1], got {self.checkpoint_fraction}")
        self.dtype = dtype_from_flags(self.use_float16, self.use_bfloat16)


@dataclass(kw_only=True)
class TrainArgs(TrainConfig):
    """supervised training on teacher rationales."""

    OBJECTIVE: ClassVar[str] = "sft"
    LAUNCHER: ClassVar[str] = "train.py"
    SUMMARY: ClassVar[str] = ("Train a student on teacher rationales (supervised; the loss covers the response "
                              "tokens only).")

    task: str = flag("GSM8K / SVAMP / ASDiv / CSQA / ARITH: how answers are read during evaluation.")
    ckpt_dir: str = flag("native checkpoint with one shard per tensor-parallel rank (or an HF directory).")
    train_file: str = flag("MCC-KD JSON list: instruction, output (a rationale or a list of them), label.")
    label_file: Optional[str] = flag("evaluation records (instruction, label), scored by greedy generation.", None)
    model_type: Optional[str] = flag("registry name; a lora- prefix means LoRA (the checkpoint's params.json wins "
                                     "for shapes).", None)
    lora_rank: int = flag("LoRA rank (> 0 with a lora- model type); -1 for full fine-tuning.", -1)
    lora_alpha: Optional[float] = flag("LoRA alpha (scaling alpha / rank); default: the rank.", None)
    lora_dropout: float = flag("dropout on the LoRA input.", 0.0)
    lora_targets: str = flag("comma-separated projections to adapt: wq,wk,wv,wo (attention), w1,w2,w3 (MLP), "
                             "output (head).", "wq,wk,wv,wo,w1,w2,w3")
    eval_batch_size: int = flag("sequences decoded together during evaluation.", 64)
    max_seq_len: int = flag("cut longer sequences (counted and reported).", 1024)
    max_new_tokens: int = flag("generation budget during evaluation.", 256)
    template: str = flag("prompt template: default or none (recorded with every saved checkpoint for infer.py).",
                         "default")
    max_eval_examples: int = flag("evaluate on the first N label_file records only (0: all).", 0)
    formats: Optional[str] = flag("data formats to train on, comma separated (icl_answer, icl_cot, zs_answer, zs_cot: "
                                  "records from data/make_formats.py); each batch holds one format (default: every "
                                  "format in the file).", None)
    deepspeed: Optional[str] = flag("DeepSpeed config JSON: ZeRO stage 1/2 over the data-parallel group.", None)
    tp_size: Optional[int] = flag("tensor-parallel size (default: all processes); world size / tp_size replicas "
                                  "train data-parallel.", None)
    device: Optional[str] = flag("cpu or cuda (default: cuda when every process on this node has a GPU of its own, "
                                 "cpu on a machine without one).", None)

    def __post_init__(self):
        from engine.answers import check_task
        from engine.prompts import format_prompt

        super().__post_init__()
        self.task = check_task(self.task)
        format_prompt("", self.template)
        for name in ("eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len < 2:
            raise UserError(f"--max_seq_len must be >= 2, got {self.max_seq_len}")
        from engine.data import parse_formats

        parse_formats(self.formats)
        if self.deepspeed:
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise UserError(f"--deepspeed {self.deepspeed} needs the deepspeed package (pip install deepspeed)")

    def make_task(self, records, tokenizer, max_len: int, info):
        """The objective's Task over the training records (engine/tasks.py)."""
        from engine.data import SFTData
        from engine.tasks import SFTTask

        data = SFTData(records, tokenizer, max_len, self.template, self.seed, self.train_file)
        if info.is_main:
            print(f"{self.train_file}: {data.describe()}", flush=True)
        return SFTTask(data, info.device)

    def make_evaluator(self, records, tokenizer, info):
        """What scores the model on --label_file during training (engine/evaluation.py)."""
        from engine.evaluation import GenerationEvaluator

        return GenerationEvaluator(records, tokenizer, self.task, info, self.eval_batch_size, self.max_new_tokens,
                                   self.template)


@dataclass(kw_only=True)
class MCCArgs(TrainArgs):
    """MCC-KD: cross-entropy on several rationales per question plus the consistency of their answer spans."""

    OBJECTIVE: ClassVar[str] = "mcc"
    LAUNCHER: ClassVar[str] = "train_mcc.py"
    SUMMARY: ClassVar[str] = ("Train a student with MCC-KD: cross-entropy on several rationales per question plus "
                              "the consistency of their answer-span predictions.")

    alpha: float = flag("weight of the consistency (symmetric KL) term.", 0.01)
    temperature: float = flag("softening temperature T of the answer-span distributions.", 1.0)
    num_rationales: int = flag("rationales per question per step (>= 2); every pair among them is compared.", 2)
    recompute_spans: bool = flag("ignore the file's indices and find the answer spans anew.", False)
    keep_wrong_rationales: bool = flag("also train on rationales whose answer differs from the label (dropped by "
                                       "default).", False)

    def __post_init__(self):
        from engine.tasks import MCCTask

        super().__post_init__()
        MCCTask.check(self.alpha, self.temperature, self.num_rationales)

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.data import MultiRationaleData
        from engine.tasks import MCCTask

        data = MultiRationaleData(records, tokenizer, max_len, self.template, self.seed, self.train_file,
                                  self.num_rationales, not self.recompute_spans, self.task,
                                  self.keep_wrong_rationales)
        if info.is_main:
            print(f"{self.train_file}: {data.describe()}", flush=True)
        return MCCTask(data, info.device, self.alpha, self.temperature)


@dataclass(kw_only=True)
class StepByStepArgs(TrainArgs):
    """distilling step-by-step: label and rationale tasks over one model, optionally an MI term between them."""

    OBJECTIVE: ClassVar[str] = "step_by_step"

    alpha: float = flag("step_by_step: weight of the label task; the rationale task gets 1 - alpha (in [0, 1]).",
                        0.5)
    label_type: str = flag("step_by_step: the label task's target: gt (the record's 'label') or llm (its "
                           "'llm_label', else the answer its rationale states).", "gt")
    beta: float = flag("step_by_step: weight of the mutual-information term between the two tasks (0: off).", 0.0)
    mi_estimator: Optional[str] = flag("step_by_step: the MI term's estimator: pooled_ce (cross-entropy of the "
                                       "pooled predictions) or critic (InfoNCE with a learned projection head); "
                                       "default pooled_ce when --beta > 0.", None)
    eval_rationale_task: bool = flag("step_by_step: each evaluation also decodes the rationale task "
                                     "(rationale_accuracy; rationale_bleu against label_file's 'output').", False)

    def __post_init__(self):
        from engine.data import LABEL_TYPES
        from engine.tasks import StepByStepTask

        super().__post_init__()
        if self.mi_estimator is not None and self.beta == 0:
            raise UserError(f"--mi_estimator {self.mi_estimator} has no effect with --beta 0; pass --beta > 0 to "
                            f"add the mutual-information term")
        StepByStepTask.check(self.alpha, self.beta, self.mi_estimator or "pooled_ce")
        if self.label_type not in LABEL_TYPES:
            raise UserError(f"--label_type {self.label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        if self.eval_rationale_task and not self.label_file:
            raise UserError("--eval_rationale_task True needs --label_file (the records evaluated)")
        if self.label_type == "llm" and "label" not in StepByStepTask.passes_for(self.alpha, self.beta):
            raise UserError("--label_type llm has no effect with --alpha 0 and --beta 0 (the label task is not "
                            "trained)")

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.data import StepByStepData
        from engine.tasks import StepByStepTask

        passes = StepByStepTask.passes_for(self.alpha, self.beta)
        data = StepByStepData(records, tokenizer, max_len, self.template, self.seed, self.train_file, self.task,
                              self.label_type, passes)
        if info.is_main:
            print(f"{self.train_file}: {data.describe()}", flush=True)
        critic_dim = 0
        if self.beta > 0 and self.mi_estimator == "critic":  # the critic reads the model's hidden states
            from engine.checkpoint import open_checkpoint

            if self.max_batch_size // info.dp_size < 2:  # InfoNCE of one question against itself is always 0
                raise UserError(f"--mi_estimator critic needs 2 or more questions per micro-batch on each of the "
                                f"{info.dp_size} data-parallel replicas (its negatives); --max_batch_size is "
                                f"{self.max_batch_size}")
            critic_dim = open_checkpoint(self.ckpt_dir, self.model_type).args.dim
        return StepByStepTask(data, info.device, self.alpha, self.beta, self.mi_estimator or "pooled_ce",
                              critic_dim, self.seed)

    def make_evaluator(self, records, tokenizer, info):
        from engine.evaluation import StepByStepEvaluator

        return StepByStepEvaluator(records, tokenizer, self.task, info, self.eval_batch_size, self.max_new_tokens,
                                   self.template, self.eval_rationale_task)


@dataclass(kw_only=True)
class TeacherKLArgs(TrainArgs):
    """distillation from the teacher's next-token distributions: (1 - w) CE + w T^2 KL(teacher || student)"""

    OBJECTIVE: ClassVar[str] = "teacher_kl"
    LAUNCHER: ClassVar[str] = "train.py"
    SUMMARY: ClassVar[str] = ("Train a student on the teacher's next-token distributions over its rationales, mixed "
                              "with their cross-entropy.")

    teacher_ckpt_dir: Optional[str] = flag("online teacher: a checkpoint of ours (any family, one shard per "
                                           "tensor-parallel rank), run frozen in this job.", None)
    teacher_file: Optional[str] = flag("offline teacher: the top-k file `infer.py score --top_k K` wrote for this "
                                       "train_file.", None)
    kl_weight: float = flag("weight w of the KL term; the cross-entropy gets 1 - w.", 0.5)
    kl_temperature: float = flag("temperature T softening both distributions of the KL term (scaled by T^2).", 1.0)
    teacher_top_k: Optional[int] = flag("teacher tokens kept per position, renormalised (default 5; 0, the default "
                                        "for an online teacher with the student's tokenizer: its full distribution).",
                                        None)
    same_tokenizer: Optional[bool] = flag("True: the teacher shares the student's tokenizer (checked); False: align "
                                          "the two tokenisations by DTW anyway; default: compare the vocabularies.",
                                          None)

    def __post_init__(self):
        from engine.teacher import check_teacher_flags

        super().__post_init__()
        check_teacher_flags(self.teacher_ckpt_dir, self.teacher_file, self.teacher_top_k, self.kl_weight,
                            self.kl_temperature)

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.alignment import Vocab
        from engine.checkpoint import open_checkpoint
        from engine.data import SFTData
        from engine.tasks import TeacherKLTask
        from engine.teacher import OnlineTeacher, TeacherFile

        data = SFTData(records, tokenizer, max_len, self.template, self.seed, self.train_file)
        if self.teacher_file:
            teacher = TeacherFile(self.teacher_file, data, Vocab.of(tokenizer), 5 if self.teacher_top_k is None
                                  else self.teacher_top_k, self.kl_temperature, self.same_tokenizer, self.train_file)
            what = f"--teacher_file {self.teacher_file}"
        else:
            student_vocab = open_checkpoint(self.ckpt_dir, self.model_type).args.vocab_size
            teacher = OnlineTeacher(self.teacher_ckpt_dir, data, tokenizer, student_vocab, self.teacher_top_k,
                                    self.kl_temperature, self.same_tokenizer, self.template, self.dtype, info.device)
            what = f"--teacher_ckpt_dir {self.teacher_ckpt_dir}"
        if info.is_main:
            how = ("the same tokenizer" if teacher.same else "another tokenizer (DTW-aligned)") + (
                ", full distribution" if teacher.dense else f", top {getattr(teacher, 'top_k', 0)} renormalised")
            if not teacher.same:
                how += f"; {teacher.coverage():.0%} of the first 50 records' response tokens aligned one-to-one"
            print(f"{self.train_file}: {data.describe()}; teacher {what}: {how}", flush=True)
        return TeacherKLTask(data, info.device, teacher, self.kl_weight, self.kl_temperature)


def flag_fields(cls):
    """The command-line flags of an arguments class: required ones first, then in declaration order."""
    found = [f for f in fields(cls) if "help" in f.metadata]
    return [f for f in found if f.default is MISSING] + [f for f in found if f.default is not MISSING]


def launcher(*classes):
    """The fire entry point of one or more arguments classes (several: one per --objective): keyword-only
    flags with the fields' types and defaults, a --help line per flag, and a body that checks them
    (constructing the chosen class) and trains. A flag that two objectives share must mean the same."""
    fields_by_name, hints = {}, {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
        for f in flag_fields(cls):
            seen = fields_by_name.setdefault(f.name, f)
            if (seen.default, seen.metadata["help"]) != (f.default, f.metadata["help"]):
                raise TypeError(f"--{f.name} means different things in {', '.join(c.__name__ for c in classes)}")
    flags = list(fields_by_name.values())
    by_objective = {cls.OBJECTIVE: cls for cls in classes}
    if len(classes) > 1:
        choose = field(default=classes[0].OBJECTIVE, metadata={"help": (
            "the training objective: " + "; ".join(f"{c.OBJECTIVE} ({c.__doc__.strip().rstrip('.')})" for c in classes)
            + ".")})
        choose.name, hints["objective"] = "objective", str
        flags.insert(sum(f.default is MISSING for f in flags), choose)

    def main(**given):
        from engine.launch import run_training

        name = given.pop("objective", classes[0].OBJECTIVE)
        cls = by_objective.get(name)
        if cls is None:
            raise UserError(f"--objective {name!r} is not one of {', '.join(by_objective)}")
        own = {f.name for f in flag_fields(cls)}
        foreign = [k for k in given if k not in own]
        if foreign:
            users = [c.OBJECTIVE for c in classes if foreign[0] in {f.name for f in flag_fields(c)}]
            raise UserError(f"--{foreign[0]} belongs to --objective {' / '.join(users)}, not {name}")
        run_training(cls(**given))

    main.__signature__ = inspect.Signature([
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                          default=inspect.Parameter.empty if f.default is MISSING else f.default) for f in flags])
    main.__annotations__ = {f.name: hints[f.name] for f in flags}
    main.__doc__ = "\n".join([classes[0].SUMMARY, "", "Args:"] + [f"    {f.name}: {f.metadata['help']}" for f in flags])
    return main


def run_record(args) -> dict:
    """The flags of a run, as run_config.json records them."""
    return {"launcher": args.LAUNCHER, "objective": args.OBJECTIVE,
            **{k: v for k, v in asdict(args).items() if k != "betas"}}
