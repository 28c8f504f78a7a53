"""The flags of train.py --objective step_by_step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from engine.runtime.cli import flag
from engine.runtime.errors import UserError
from engine.train.args import TrainArgs


@dataclass(kw_only=True)
class StepByStepArgs(TrainArgs):
    """distilling step-by-step: label and rationale tasks over one model, optionally an MI term between them."""

    OBJECTIVE: ClassVar[str] = "step_by_step"

    alpha: Optional[float] = flag("step_by_step: weight of the label task; the rationale task gets 1 - alpha (in "
                                  "[0, 1]; default 0.5, with --standard True 1).", None)
    label_type: str = flag(
        "step_by_step: the label task's target: gt (the record's 'label') or llm (its "
        "'llm_label', else the answer its rationale states).",
        "gt",
    )
    beta: Optional[float] = flag(
        "step_by_step: weight of the mutual-information term between the two tasks (0: off); "
        "default 0.1 with --mi_estimator authors (their main.py), else 0.",
        None,
    )
    mi_estimator: Optional[str] = flag(
        "step_by_step: the MI term's estimator: authors (Chen et al.'s code: max-pooled probabilities "
        "as logits of a soft-target CE, padding included), pooled_distribution_ce (ours, alias pooled_ce: "
        "CE of normalised pooled distributions over real positions) or critic (ours: InfoNCE with a "
        "learned projection head); default pooled_distribution_ce when --beta > 0.",
        None,
    )
    mi_mask_padding: Optional[bool] = flag(
        "step_by_step: --mi_estimator authors max-pools over real response positions only (default "
        "False: padding included, as the authors' code does).",
        None,
    )
    standard: bool = flag("step_by_step: the authors' --model_type standard baseline: the same records without "
                          "task prefixes, the label task alone (fine-tuning with --label_type gt, distillation "
                          "on the teacher's labels with llm; --alpha 0: the rationale task alone).", False)
    subsample: float = flag("step_by_step: train on this seeded fraction of --train_file, in (0, 1] (the authors' "
                            "--subsample: datasets' train_test_split(test_size=1 - F, seed=--seed)['train']).", 1.0)
    holdout_fraction: float = flag("step_by_step: leave this fraction of the (subsampled) records out of training, "
                                   "in [0, 1) (the authors' unused 'valid' split: 0.1, with --holdout_seed 0).", 0.0)
    holdout_seed: int = flag("step_by_step: seed of the --holdout_fraction draw (the authors': 0).", 0)
    eval_rationale_task: bool = flag(
        "step_by_step: each evaluation also decodes the rationale task "
        "(rationale_accuracy; rationale_bleu against label_file's 'output').",
        False,
    )
    rationale_bleu: str = flag(
        "step_by_step: the BLEU of --eval_rationale_task: corpus (ours: sacreBLEU's, 0-100, smoothed; "
        "logged rationale_bleu) or sentence_mean (the authors': mean of unsmoothed per-record BLEU, 0-1; "
        "logged rationale_sentence_bleu).",
        "corpus",
    )

    def __post_init__(self):
        from engine.distill.step_by_step.data import LABEL_TYPES
        from engine.distill.step_by_step.mi import mi_estimator_name
        from engine.distill.step_by_step.task import StepByStepTask
        from engine.infer.metrics import BLEU_KINDS

        super().__post_init__()
        self.check_selection()
        if self.alpha is None:
            self.alpha = 1.0 if self.standard else 0.5
        if self.beta is None:  # the authors' default weight goes with the authors' term
            self.beta = 0.1 if self.mi_estimator == "authors" else 0.0
        if self.standard and (self.alpha not in (0.0, 1.0) or self.beta > 0):
            raise UserError(f"--standard True trains one task without task prefixes: --alpha must be 1 (the label "
                            f"task, the default) or 0 (the rationale task) and --beta 0; got --alpha {self.alpha} "
                            f"--beta {self.beta}")
        if self.mi_estimator is not None and self.beta == 0:
            raise UserError(
                f"--mi_estimator {self.mi_estimator} has no effect with --beta 0; pass --beta > 0 to "
                f"add the mutual-information term"
            )
        StepByStepTask.check(self.alpha, self.beta, self.mi_estimator or "pooled_distribution_ce")
        if self.beta > 0:
            self.mi_estimator = mi_estimator_name(self.mi_estimator or "pooled_distribution_ce")
        if self.mi_mask_padding is not None and self.mi_estimator != "authors":
            raise UserError(
                f"--mi_mask_padding belongs to --mi_estimator authors (the only estimator that can pool "
                f"over padding), not {self.mi_estimator or 'no MI term (--beta 0)'}"
            )
        if self.rationale_bleu not in BLEU_KINDS:
            raise UserError(f"--rationale_bleu {self.rationale_bleu!r} is not one of {', '.join(BLEU_KINDS)}")
        if self.rationale_bleu != "corpus" and not self.eval_rationale_task:
            raise UserError(f"--rationale_bleu {self.rationale_bleu} has no effect without --eval_rationale_task True")
        if self.label_type not in LABEL_TYPES:
            raise UserError(f"--label_type {self.label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        if self.eval_rationale_task and not self.label_file:
            raise UserError("--eval_rationale_task True needs --label_file (the records evaluated)")
        if self.label_type == "llm" and "label" not in StepByStepTask.passes_for(self.alpha, self.beta):
            raise UserError("--label_type llm has no effect with --alpha 0 and --beta 0 (the label task is not "
                            "trained)")

    def check_selection(self):
        if not 0 < self.subsample <= 1:
            raise UserError(f"--subsample must be in (0, 1] (the fraction of --train_file trained on), got "
                            f"{self.subsample}")
        if not 0 <= self.holdout_fraction < 1:
            raise UserError(f"--holdout_fraction must be in [0, 1) (the fraction left out of training), got "
                            f"{self.holdout_fraction}")

    def task_prefixes(self) -> Optional[dict]:
        """The prefixes telling the tasks apart: the authors' predict: / explain:, none for --standard."""
        from engine.text.prompts import TASK_PREFIXES

        return {name: "" for name in TASK_PREFIXES} if self.standard else None

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.distill.step_by_step.data import LabelSource, StepByStepData, authors_training_indices
        from engine.distill.step_by_step.task import StepByStepTask

        passes = StepByStepTask.passes_for(self.alpha, self.beta)
        selected = authors_training_indices(len(records), self.subsample, self.seed, self.holdout_fraction,
                                            self.holdout_seed)
        if not selected:
            raise UserError(f"--subsample {self.subsample} and --holdout_fraction {self.holdout_fraction} leave none "
                            f"of the {len(records)} records of {self.train_file} to train on")
        data = StepByStepData(records, tokenizer, max_len, self.template, self.seed, self.train_file,
                              LabelSource(self.task, self.label_type), passes, self.task_prefixes(), selected)
        if info.is_main:
            print(f"{self.train_file}: {data.describe()}", flush=True)
        critic_dim = 0
        if self.mi_estimator == "critic":  # the critic reads the model's hidden states
            from engine.checkpoint import open_checkpoint

            if self.max_batch_size // info.dp_size < 2:  # InfoNCE of one question against itself is always 0
                raise UserError(f"--mi_estimator critic needs 2 or more questions per micro-batch on each of the "
                                f"{info.dp_size} data-parallel replicas (its negatives); --max_batch_size is "
                                f"{self.max_batch_size}")
            critic_dim = open_checkpoint(self.ckpt_dir, self.model_type).args.dim
        return StepByStepTask(
            data,
            info.device,
            self.alpha,
            self.beta,
            self.mi_estimator or "pooled_distribution_ce",
            critic_dim,
            self.seed,
            bool(self.mi_mask_padding),
        )

    def make_evaluator(self, records, tokenizer, info):
        from engine.distill.step_by_step.evaluator import StepByStepEvaluator
        from engine.train.evaluator import Decoding

        return StepByStepEvaluator(records, tokenizer, info, Decoding.of(self), self.eval_rationale_task,
                                   self.rationale_bleu, self.task_prefixes())
