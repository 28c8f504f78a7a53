"""Running the stages of implicit chain of thought (train_implicit.py), and evaluating them.

Order of a run: the lines are read and the prerequisite checkpoints checked (that they exist, were
written by the stage they must come from, and fit the student with the mapping asked for) before any
process group forms or model loads; then the job owns save_dir, the models load, and the trainer of
engine/train/trainer.py runs the stage's Task. Every model directory a stage saves (best/, checkpoint-N/)
holds what inference needs: the model (native shards, or a LoRA adapter naming its base), its
tokenizer, `implicit.json` (the stage, its teacher, layer mapping and teacher-state spec), its state
maps (an authors' emulator: its head), and for the coupled stage the emulator (with its own head or
maps) in `emulator/`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from engine.checkpoint import (
    is_adapter,
    load_for_inference,
    load_lora_into,
    load_model,
    open_checkpoint,
    read_lora_config,
    save_lora,
    write_model_shard,
)
from engine.distill.implicit.data import CoTExamples, read_cot_lines
from engine.distill.implicit.decode import AnswerEvaluator, StateErrorEvaluator, explicit_answers, implicit_answers
from engine.distill.implicit.emulator import EmulatorHead
from engine.distill.implicit.states import StateMaps, StateSpec, check_state_map, parse_layers, same_depth
from engine.distill.implicit.tasks import CoTTeacherTask, CoupleTask, EmulatorTask, MindReadTask
from engine.runtime.errors import UserError
from engine.runtime.fileio import atomic_write_text
from engine.runtime.jobs import job
from engine.text.tokenizer import check_tokenizer_fits, load_tokenizer
from engine.train.args import run_record
from engine.train.checkpointer import Checkpointer
from engine.train.launch import model_from_flags, owned_save_dir
from engine.train.trainer import RunSetup, Trainer
from models.args import ModelArgs

STAGE_FILE = "implicit.json"
EMULATOR_SUBDIR = "emulator"
NO_LIMIT = 10 ** 9  # held-out lines are never left out: one that cannot be answered counts wrong
HOW = {"teacher": "train one with `train_implicit.py teacher` first",
       "mind_read": "train one with `train_implicit.py mind_read` first",
       "emulator": "train one with `train_implicit.py emulator` first"}


# ----- prerequisite checkpoints ------------------------------------------------------------------
def read_stage(path: Optional[str], flag: str, stages: Sequence[str]) -> Tuple[str, dict]:
    """(model directory, its implicit.json) written by one of `stages`; a stage's save_dir stands for
    its best/ (its newest checkpoint-N/ when it was trained without held-out lines)."""
    how = HOW.get(stages[0], "pass a model directory saved by train_implicit.py")
    if not path or not os.path.isdir(path):
        raise UserError(f"{flag} {path} does not exist; {how}")
    for directory in (path, os.path.join(path, "best"), *reversed(Checkpointer(path, None, None).checkpoints())):
        file = os.path.join(directory, STAGE_FILE)
        if os.path.isfile(file):
            try:
                meta = json.load(open(file))
            except (OSError, ValueError):
                raise UserError(f"{file} is not readable JSON; {how}") from None
            if meta.get("stage") not in stages:
                raise UserError(f"{flag} {path} holds a model of the {meta.get('stage')} stage, not of "
                                f"{' or '.join(stages)}; {how}")
            return directory, meta
    raise UserError(f"{flag} {path} holds no {STAGE_FILE}, so no model saved by `train_implicit.py {stages[0]}` "
                    f"(nor has it a best/ or checkpoint-N/ that does); {how}")


def saved_args(directory: str) -> ModelArgs:
    """The model shape of a saved stage directory (native shards or adapter: both hold params.json)."""
    return ModelArgs.load(os.path.join(directory, "params.json"))


def shape(args: ModelArgs) -> dict:
    return {"n_layers": args.n_layers, "dim": args.dim}


@dataclass
class Plan:
    """What the checks found: the prerequisite directories and the layer mappings."""

    teacher_dir: Optional[str] = None
    teacher: Optional[dict] = None
    teacher_layers: Optional[List[int]] = None  # the teacher layer each student layer reads
    emulator_layers: Optional[List[int]] = None  # the emulator layer predicting each teacher layer
    student_dir: Optional[str] = None
    emulator_dir: Optional[str] = None
    emulator_meta: dict = field(default_factory=dict)


def check_prerequisites(args) -> Plan:
    stage = args.STAGE
    if stage == "teacher":
        return Plan()
    if stage in ("mind_read", "emulator"):
        teacher_dir, meta = read_stage(args.teacher_dir, "--teacher_dir", ("teacher",))
        if not meta.get("cot", True):
            raise UserError(f"--teacher_dir {teacher_dir} was trained without a chain of thought (--cot False), "
                            f"so it has no CoT states to read; pass a teacher trained with --cot True")
        t = saved_args(teacher_dir)
        own = open_checkpoint(args.ckpt_dir, args.model_type).args
        who = "the student" if stage == "mind_read" else "the emulator"
        check_state_map(args.state_map, t.dim, own.dim, f"the teacher in {teacher_dir} is {t.dim} wide and {who} "
                                                        f"in {args.ckpt_dir} {own.dim}")
        plan = Plan(teacher_dir=os.path.abspath(teacher_dir), teacher=shape(t))
        if stage == "mind_read":
            plan.teacher_layers = parse_layers(args.teacher_layers, own.n_layers, t.n_layers,
                                               f"--teacher_layers (teacher {teacher_dir})")
        else:
            plan.emulator_layers = same_depth(t.n_layers, own.n_layers)
            if args.emulator == "authors" and own.n_layers < t.n_layers:
                raise UserError(
                    f"--emulator authors predicts the teacher's states one layer after another, so the "
                    f"emulator in {args.ckpt_dir} ({own.n_layers} layers) needs at least the {t.n_layers} "
                    f"layers of the teacher in {teacher_dir}; use a deeper emulator or --emulator readout"
                )
        return plan
    student_dir, s_meta = read_stage(args.student_dir, "--student_dir", ("mind_read",))
    emulator_dir, e_meta = read_stage(args.emulator_dir, "--emulator_dir", ("emulator",))
    if s_meta["teacher_dir"] != e_meta["teacher_dir"]:
        raise UserError(f"--student_dir {student_dir} read the teacher {s_meta['teacher_dir']} but --emulator_dir "
                        f"{emulator_dir} emulates {e_meta['teacher_dir']}; train both from the same teacher")
    if StateSpec.of(s_meta) != StateSpec.of(e_meta):
        raise UserError(f"--student_dir {student_dir} read the teacher states {StateSpec.of(s_meta).to_dict()} but "
                        f"--emulator_dir {emulator_dir} learned to predict {StateSpec.of(e_meta).to_dict()}; train "
                        f"both with the same --state_norm, --delta and --subset")
    return Plan(teacher_dir=s_meta["teacher_dir"], teacher=s_meta["teacher"], teacher_layers=s_meta["teacher_layers"],
                emulator_layers=e_meta["emulator_layers"], student_dir=os.path.abspath(student_dir),
                emulator_dir=os.path.abspath(emulator_dir), emulator_meta=e_meta)


# ----- models ---------------------------------------------------------------------------------
def load_frozen(directory: str, dtype, info):
    """A stage's model for reading or inference: adapter merged, projections fused, no gradients;
    returned with its tokenizer (checked to fit it)."""
    model, tok, _ = load_for_inference(directory, None, dtype, info.device)
    model.eval().requires_grad_(False)
    return model, tok


def load_trainable(directory: str, dtype, info):
    """A stage's model to train on as that stage trained it: full fp32 weights, or the frozen base in
    `dtype` with its LoRA adapter trainable. Returns (model, LoRA config or None, base checkpoint)."""
    if is_adapter(directory):
        _, base = read_lora_config(directory)
        model = load_model(base, dtype=dtype, device=info.device)
        cfg = load_lora_into(model, directory)
        return model.train(), cfg, base
    return load_model(directory, dtype=torch.float32, device=info.device).train(), None, directory


def write_model(model, lora_cfg, base: str, directory: str, tok, info) -> None:
    """A second trained model (the coupled emulator) into `directory`, as the checkpointer writes its own."""
    os.makedirs(directory, exist_ok=True)
    if lora_cfg is not None:
        save_lora(model, lora_cfg, directory, base)
    else:
        write_model_shard(model, directory)
    if info.is_main:
        shutil.copyfile(tok.path, os.path.join(directory, os.path.basename(tok.path)))


# ----- the stages -------------------------------------------------------------------------------
@dataclass
class Built:
    model: torch.nn.Module
    lora_cfg: object
    base_ckpt: str
    tokenizer: object
    task: object  # a Task whose write_files writes the stage's files into every saved model directory
    evaluator: object


def _describe(examples: CoTExamples, path: str, info) -> CoTExamples:
    if info.is_main:
        print(f"{path}: {examples.describe()}", flush=True)
    return examples


def _writer(meta: dict, info, maps: Optional[StateMaps] = None, more=None):
    def write(directory: str) -> None:
        if info.is_main:
            atomic_write_text(os.path.join(directory, STAGE_FILE), json.dumps(meta, indent=2) + "\n")
            if maps is not None:
                maps.save(directory)
        if more is not None:
            more(directory)

    return write


def _fresh_model(args, info):
    model, lora_cfg = model_from_flags(args, info)
    tok = load_tokenizer(args.ckpt_dir)
    check_tokenizer_fits(tok, model.args.vocab_size, args.ckpt_dir)
    return model, lora_cfg, tok


def teacher_evaluator(held: CoTExamples, tok, cot: bool, batch_size: int, max_new_tokens: int, info,
                      n_samples: int = 0):
    """Accuracy of the teacher (or the no-CoT baseline) decoding from `x EOS`; best/ ties broken by the
    answer digits right, then by the held-out loss of its training objective."""
    answers = explicit_answers(held, "model", tok, cot, max_new_tokens)
    return AnswerEvaluator(held, info, batch_size, answers, loss_task=CoTTeacherTask(held, info.device, cot),
                           n_samples=n_samples)


def build_teacher(args, plan: Plan, lines, held_lines, info) -> Built:
    model, lora_cfg, tok = _fresh_model(args, info)
    cot_views = ("model",) if args.cot else ()
    train = _describe(CoTExamples(lines, {"model": tok}, min(args.max_seq_len, model.args.max_seq_len),
                                  args.train_file, cot_views), args.train_file, info)
    evaluator = None
    if held_lines:
        held = CoTExamples(held_lines, {"model": tok}, NO_LIMIT, args.label_file, cot_views)
        evaluator = teacher_evaluator(held, tok, args.cot, args.eval_batch_size, args.max_new_tokens, info,
                                      args.eval_samples)
    meta = {"stage": "teacher", "cot": args.cot}
    task = CoTTeacherTask(train, info.device, args.cot, files=_writer(meta, info))
    return Built(model, lora_cfg, args.ckpt_dir, tok, task, evaluator)


def _beside_teacher(args, plan: Plan, lines, info):
    """What the mind_read and emulator stages start from: their fresh model, the frozen teacher, the
    tokenizer of each ("views") and the training lines in both."""
    model, lora_cfg, tok = _fresh_model(args, info)
    teacher, teacher_tok = load_frozen(plan.teacher_dir, args.dtype, info)
    views = {"model": tok, "teacher": teacher_tok}
    max_len = min(args.max_seq_len, model.args.max_seq_len, teacher.args.max_seq_len)
    train = _describe(CoTExamples(lines, views, max_len, args.train_file), args.train_file, info)
    return model, lora_cfg, tok, teacher, views, train


def build_mind_read(args, plan: Plan, lines, held_lines, info) -> Built:
    model, lora_cfg, tok, teacher, views, train = _beside_teacher(args, plan, lines, info)
    maps = StateMaps(model.args.n_layers, teacher.args.dim, model.args.dim, args.state_map, args.state_map_hidden,
                     args.seed, info.device)
    spec = spec_of(args)
    evaluator = None
    if held_lines:
        held = MindReadTask(CoTExamples(held_lines, views, NO_LIMIT, args.label_file), info.device, teacher, maps,
                            plan.teacher_layers, spec)
        evaluator = student_evaluator(held, tok, args.eval_batch_size, args.max_new_tokens, info, args.eval_samples)
    meta = {"stage": "mind_read", "teacher_dir": plan.teacher_dir, "teacher": plan.teacher,
            "teacher_layers": plan.teacher_layers, "student": shape(model.args), "states": spec.to_dict()}
    task = MindReadTask(train, info.device, teacher, maps, plan.teacher_layers, spec, files=_writer(meta, info, maps))
    return Built(model, lora_cfg, args.ckpt_dir, tok, task, evaluator)


def build_emulator(args, plan: Plan, lines, held_lines, info) -> Built:
    model, lora_cfg, tok, teacher, views, train = _beside_teacher(args, plan, lines, info)
    if args.emulator == "authors":
        head = EmulatorHead(plan.emulator_layers, model.args.dim, teacher.args.dim, args.mixture_size,
                            args.softmax_temperature, args.state_map_hidden, args.seed, info.device)
    else:
        head = StateMaps(teacher.args.n_layers, model.args.dim, teacher.args.dim, args.state_map,
                         args.state_map_hidden, args.seed, info.device)
    spec = spec_of(args)
    evaluator = None
    if held_lines:
        held = EmulatorTask(CoTExamples(held_lines, views, NO_LIMIT, args.label_file), info.device, teacher, head,
                            plan.emulator_layers, spec)
        evaluator = StateErrorEvaluator(held, info, args.eval_batch_size)
    meta = {"stage": "emulator", "emulator_kind": args.emulator, "teacher_dir": plan.teacher_dir,
            "teacher": plan.teacher, "emulator_layers": plan.emulator_layers, "emulator": shape(model.args),
            "states": spec.to_dict()}
    task = EmulatorTask(train, info.device, teacher, head, plan.emulator_layers, spec, files=_writer(meta, info, head))
    return Built(model, lora_cfg, args.ckpt_dir, tok, task, evaluator)


def spec_of(args) -> StateSpec:
    return StateSpec(delta=args.delta, subset=args.subset, norm=args.state_norm)


def load_emulator_head(directory: str, meta: dict, device):
    """The emulator's head (the authors' emulator) or its state maps (the readout; a directory from
    before --emulator was one)."""
    if meta.get("emulator_kind", "readout") == "authors":
        return EmulatorHead.load(directory, device)
    return StateMaps.load(directory, device)


def student_evaluator(held, tok, batch_size: int, max_new_tokens: int, info, n_samples: int = 0) -> AnswerEvaluator:
    """Accuracy of a student (mind-reading or coupled) on the held-out task's lines, its states from
    that task; best/ ties broken by the answer digits right, then by the task's held-out loss."""
    answers = implicit_answers(held.examples, "model", tok, max_new_tokens,
                               lambda pos: held.states(held.micro_batch(pos, 0)))
    return AnswerEvaluator(held.examples, info, batch_size, answers, loss_task=held, n_samples=n_samples)


def build_couple(args, plan: Plan, lines, held_lines, info) -> Built:
    student, s_lora, s_base = load_trainable(plan.student_dir, args.dtype, info)
    emulator, e_lora, e_base = load_trainable(plan.emulator_dir, args.dtype, info)
    s_maps = StateMaps.load(plan.student_dir, info.device)
    e_head = load_emulator_head(plan.emulator_dir, plan.emulator_meta, info.device)
    tok, e_tok = load_tokenizer(plan.student_dir), load_tokenizer(plan.emulator_dir)
    views = {"model": tok, "emulator": e_tok}
    max_len = min(args.max_seq_len, student.args.max_seq_len, emulator.args.max_seq_len)
    train = _describe(CoTExamples(lines, views, max_len, args.train_file, cot_views=()), args.train_file, info)

    def task_on(examples, files=None):
        return CoupleTask(examples, info.device, emulator, e_head, plan.emulator_layers, s_maps, plan.teacher_layers,
                          emulator_lora=e_lora, files=files)

    evaluator = None
    if held_lines:
        held = task_on(CoTExamples(held_lines, views, NO_LIMIT, args.label_file, cot_views=()))
        evaluator = student_evaluator(held, tok, args.eval_batch_size, args.max_new_tokens, info, args.eval_samples)
    meta = {"stage": "couple", "teacher_dir": plan.teacher_dir, "teacher": plan.teacher,
            "teacher_layers": plan.teacher_layers, "student_dir": plan.student_dir,
            "emulator_dir": plan.emulator_dir, "emulator": EMULATOR_SUBDIR,
            "states": StateSpec.of(plan.emulator_meta).to_dict()}
    sub_meta = {**plan.emulator_meta, "emulator": shape(emulator.args)}

    def emulator_files(directory: str) -> None:
        sub = os.path.join(directory, EMULATOR_SUBDIR)
        write_model(emulator, e_lora, e_base, sub, e_tok, info)
        _writer(sub_meta, info, e_head)(sub)

    return Built(student, s_lora, s_base, tok, task_on(train, _writer(meta, info, s_maps, emulator_files)), evaluator)


BUILDERS = {"teacher": build_teacher, "mind_read": build_mind_read, "emulator": build_emulator,
            "couple": build_couple}


def run_stage(args) -> None:
    lines = read_cot_lines(args.train_file, "--train_file")
    held_lines = read_cot_lines(args.label_file, "--label_file") if args.label_file else None
    if held_lines and args.max_eval_examples:
        held_lines = held_lines[:args.max_eval_examples]
    plan = check_prerequisites(args)
    with job(args.tp_size, args.device, **owned_save_dir(args)) as info:
        b = BUILDERS[args.STAGE](args, plan, lines, held_lines, info)
        setup = RunSetup(base_ckpt=b.base_ckpt, meta={**run_record(args), "stage": args.STAGE})
        Trainer(b.model, b.task, args, info, b.tokenizer, b.evaluator, b.lora_cfg, setup).fit()


# ----- evaluation of saved stages ------------------------------------------------------------------
def _timed(evaluator, model, info) -> dict:
    """The evaluator's result plus the wall time of its pass (after one untimed warm-up batch)."""
    if evaluator.mine and hasattr(evaluator, "answer"):
        evaluator.answer(model, evaluator.mine[:evaluator.batch_size])
    device = model.head_weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = evaluator(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest replica decides
    return {**result, "seconds": float(seconds), "examples_per_s": result["total"] / max(float(seconds), 1e-9)}


def evaluate_stage(directory: str, meta: dict, lines, data_file: str, batch_size: int, max_new_tokens: int,
                   dtype, info) -> Tuple[dict, List[dict]]:
    """Accuracy (or, for an emulator, state error) and examples/s of one saved stage on `lines`, and
    each line's record (question, output, prediction, answer, correct; none for an emulator)."""
    stage = meta["stage"]
    model, tok = load_frozen(directory, dtype, info)
    out = {"model_dir": directory, "stage": stage if stage != "teacher" or meta.get("cot", True) else "no_cot"}
    if stage == "teacher":
        cot = meta.get("cot", True)
        held = CoTExamples(lines, {"model": tok}, NO_LIMIT, data_file, ("model",) if cot else ())
        evaluator = teacher_evaluator(held, tok, cot, batch_size, max_new_tokens, info)
        return {**out, **_timed(evaluator, model, info)}, evaluator.all_records()
    if stage in ("mind_read", "emulator"):
        teacher, teacher_tok = load_frozen(meta["teacher_dir"], dtype, info)
        views = {"model": tok, "teacher": teacher_tok}
        examples = CoTExamples(lines, views, NO_LIMIT, data_file)
        spec = StateSpec.of(meta)
        if stage == "emulator":
            head = load_emulator_head(directory, meta, info.device)
            held = EmulatorTask(examples, info.device, teacher, head, meta["emulator_layers"], spec)
            return {**out, **StateErrorEvaluator(held, info, batch_size)(model)}, []
        maps = StateMaps.load(directory, info.device)
        held = MindReadTask(examples, info.device, teacher, maps, meta["teacher_layers"], spec)
    else:
        sub = os.path.join(directory, meta["emulator"])
        e_meta = json.load(open(os.path.join(sub, STAGE_FILE)))
        emulator, emulator_tok = load_frozen(sub, dtype, info)
        views = {"model": tok, "emulator": emulator_tok}
        examples = CoTExamples(lines, views, NO_LIMIT, data_file, cot_views=())
        held = CoupleTask(examples, info.device, emulator, load_emulator_head(sub, e_meta, info.device),
                          e_meta["emulator_layers"], StateMaps.load(directory, info.device), meta["teacher_layers"])
    evaluator = student_evaluator(held, tok, batch_size, max_new_tokens, info)
    return {**out, **_timed(evaluator, model, info)}, evaluator.all_records()


STAGES = ("teacher", "mind_read", "emulator", "couple")


def run_evaluation(data_file: str, model_dirs: List[str], batch_size: int, max_new_tokens: int, max_examples: int,
                   files: Tuple[Optional[str], Optional[str]], dtype, tp_size, device) -> List[dict]:
    """Every model on the same lines; files: (output_file, results_file). The output file gets one
    JSON line per model and line (model_dir, stage, index, question, output, prediction, answer,
    correct), the results file the JSON list of the printed results."""
    output_file, results_file = files
    lines = read_cot_lines(data_file, "--data_file")
    lines = lines[:max_examples] if max_examples else lines
    found = [read_stage(d, "--model_dirs", STAGES) for d in model_dirs]
    results, per_line = [], []
    with job(tp_size, device) as info:
        for directory, meta in found:
            result, records = evaluate_stage(directory, meta, lines, data_file, batch_size, max_new_tokens, dtype, info)
            results.append(result)
            per_line += [{"model_dir": directory, "stage": result["stage"], **r} for r in records]
            if info.is_main:
                print(json.dumps(result), flush=True)
        if info.is_main and output_file:
            atomic_write_text(output_file, "".join(json.dumps(r) + "\n" for r in per_line))
        if info.is_main and results_file:
            atomic_write_text(results_file, json.dumps(results, indent=2) + "\n")
    return results
