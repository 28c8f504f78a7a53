"""The flags of train.py --objective teacher_kl."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from engine.runtime.cli import flag
from engine.train.args import DivergenceFlags, TeacherCheckpointFlag, TrainArgs


@dataclass(kw_only=True)
class TeacherKLArgs(DivergenceFlags, TeacherCheckpointFlag, TrainArgs):
    """distillation from the teacher's next-token distributions: (1 - w) CE + w T^2 KL(teacher || student) or --divergence"""

    OBJECTIVE: ClassVar[str] = "teacher_kl"
    SUMMARY: ClassVar[str] = ("Train a student on the teacher's next-token distributions over its rationales, mixed "
                              "with their cross-entropy.")

    teacher_file: Optional[str] = flag("offline teacher: the top-k file `infer.py score --top_k K` wrote for this "
                                       "train_file.", None)
    kl_weight: Optional[float] = flag("weight w of the KL term; the cross-entropy gets 1 - w (default 0.5; not with "
                                      "--kl_formats).", None)
    teacher_top_k: Optional[int] = flag("teacher tokens kept per position, renormalised (default 5; 0, the default "
                                        "for an online teacher with the student's tokenizer: its full distribution).",
                                        None)
    same_tokenizer: Optional[bool] = flag("True: the teacher shares the student's tokenizer (checked); False: align "
                                          "the two tokenisations by DTW anyway; default: compare the vocabularies.",
                                          None)
    kl_formats: Optional[str] = flag("the authors' per-format loss (their match_distribution): batches of these "
                                     "formats (e.g. icl_cot,zs_cot) train on the KL alone, all others on the "
                                     "cross-entropy alone; default: the (1 - w) CE + w KL mixture on every batch (ours).",
                                     None)
    loss_reduction: str = flag("step_token_mean: the loss is a mean over the response tokens of the optimizer step "
                               "(ours); micro_batch_mean: each micro-batch's loss is its own token mean and the step "
                               "their mean (the authors').", "step_token_mean")
    teacher_probs: str = flag("renormalised: the teacher's top k renormalised at temperature T (ours); raw: its own "
                              "token and its top k with their probabilities as they are, not renormalised (the "
                              "authors').", "renormalised")
    eos_target: str = flag("teacher: the EOS ending a response learns the teacher's distribution there (ours); "
                           "one_hot: it learns EOS one-hot (the authors').", "teacher")
    alignment: str = flag("another tokenizer: ours (whitespace counts, pairs one-to-one both ways) or authors (their "
                          "whitespace-blind DTW, tie order and one-sided copy rule).", "ours")

    def __post_init__(self):
        from engine.distill.teacher_kl.teachers import (
            check_target_flags,
            check_teacher_flags,
        )
        from engine.runtime.errors import UserError
        from engine.train.batching import FORMATS

        super().__post_init__()
        if self.kl_formats is not None and self.kl_weight is not None:
            raise UserError(f"--kl_formats {self.kl_formats} trains each batch on the KL alone or the cross-entropy "
                            f"alone by its format, so --kl_weight {self.kl_weight} has no part to weigh; drop one")
        self.kl_format_names = None
        if self.kl_formats is not None:
            raw = self.kl_formats.split(",") if isinstance(self.kl_formats, str) else self.kl_formats
            names = [str(f).strip() for f in raw if str(f).strip()]
            if not names:
                raise UserError("--kl_formats is empty; name the formats whose batches train on the KL (e.g. "
                                "icl_cot,zs_cot)")
            for name in names:
                if name not in FORMATS:
                    raise UserError(f"--kl_formats {name!r} is not one of {', '.join(FORMATS)}")
            self.kl_format_names = sorted(set(names))
        if self.loss_reduction not in ("step_token_mean", "micro_batch_mean"):
            raise UserError(f"--loss_reduction {self.loss_reduction!r} is not one of step_token_mean, micro_batch_mean")
        check_teacher_flags(self.teacher_ckpt_dir, self.teacher_file, self.teacher_top_k,
                            0.5 if self.kl_weight is None else self.kl_weight, self.kl_temperature)
        check_target_flags(self.teacher_probs, self.eos_target, self.alignment, self.kl_temperature)
        self._check_divergence()

    def _check_divergence(self) -> None:
        """--divergence against the targets: reverse KL is infinite where the teacher gives a token no
        mass, so it needs the full distribution; the authors' raw top k is not a distribution."""
        from engine.runtime.errors import UserError
        from engine.train.args import check_divergence_flags
        from models.vocab_parallel import divergence_needs_full_support

        check_divergence_flags(self.divergence, self.jsd_beta, self.kl_temperature)
        if self.teacher_probs == "raw" and self.divergence != "forward_kl":
            raise UserError(f"--teacher_probs raw keeps the teacher's top k as they are, not a distribution; "
                            f"--divergence {self.divergence} needs one: use --divergence forward_kl")
        if not divergence_needs_full_support(self.divergence, self.jsd_beta):
            return
        what = f"--divergence {self.divergence}" + (" --jsd_beta 1" if self.divergence == "jsd" else "")
        why = f"{what} (KL(student || teacher)) is infinite wherever the teacher gives a token no mass"
        if self.teacher_file or self.teacher_top_k:
            raise UserError(f"{why}, so it needs an online teacher's full distribution (--teacher_ckpt_dir, "
                            f"--teacher_top_k 0), not a top k")
        if self.eos_target == "one_hot":
            raise UserError(f"{why}, and --eos_target one_hot gives the EOS a one-hot target: use --eos_target "
                            f"teacher")

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.checkpoint import open_checkpoint
        from engine.distill.sft import SFTData
        from engine.distill.teacher_kl.task import TeacherKLTask
        from engine.distill.teacher_kl.teachers import OnlineTeacher, TargetRule, TeacherFile, check_kl_formats
        from engine.runtime.errors import UserError
        from engine.text.vocab import Vocab
        from models.vocab_parallel import divergence_needs_full_support

        if self.kl_format_names:
            check_kl_formats(self.kl_format_names, records, self.formats, self.train_file)
        data = SFTData(records, tokenizer, max_len, self.template, self.seed, self.train_file)
        rule = TargetRule(self.kl_temperature, self.teacher_probs, self.eos_target, self.alignment)
        if self.teacher_file:
            teacher = TeacherFile(self.teacher_file, data, Vocab.of(tokenizer), 5 if self.teacher_top_k is None
                                  else self.teacher_top_k, rule, self.same_tokenizer, self.train_file)
            what = f"--teacher_file {self.teacher_file}"
        else:
            student_vocab = open_checkpoint(self.ckpt_dir, self.model_type).args.vocab_size
            teacher = OnlineTeacher(self.teacher_ckpt_dir, data, tokenizer, student_vocab, self.teacher_top_k, rule,
                                    self.same_tokenizer, self.template, self.dtype, info.device)
            what = f"--teacher_ckpt_dir {self.teacher_ckpt_dir}"
            if not teacher.dense and divergence_needs_full_support(self.divergence, self.jsd_beta):
                raise UserError(f"--divergence {self.divergence} (KL(student || teacher)) needs the teacher's full "
                                f"distribution, which --teacher_ckpt_dir {self.teacher_ckpt_dir} cannot give: its "
                                f"tokenizer differs from the student's (only its top k is mapped)")
        kl_weight = 0.5 if self.kl_weight is None else self.kl_weight
        if info.is_main:
            top = getattr(teacher, "top_k", 0)
            how = ("the same tokenizer" if teacher.same else "another tokenizer (DTW-aligned" + (
                ", the authors' rule)" if self.alignment == "authors" else ")")) + (
                ", full distribution" if teacher.dense else
                f", own token + top {top} raw (not renormalised)" if self.teacher_probs == "raw" else
                f", top {top} renormalised")
            if self.eos_target == "one_hot":
                how += ", EOS one-hot"
            if not teacher.same:
                how += (f"; {teacher.coverage():.0%} of the first 50 records' response tokens aligned "
                        + ("to a teacher token" if self.alignment == "authors"
                           else "one-to-one"))
            kl = {"forward_kl": "KL", "reverse_kl": "reverse KL", "jsd": f"JSD(beta {self.jsd_beta:g})"}[self.divergence]
            loss = (f"{kl} alone on {','.join(self.kl_format_names)} batches, cross-entropy alone on the others"
                    if self.kl_format_names else f"{1 - kl_weight:g} CE + {kl_weight:g} {kl} on every batch")
            loss += (", each micro-batch its own token mean" if self.loss_reduction == "micro_batch_mean"
                     else ", token mean over each optimizer step")
            print(f"{self.train_file}: {data.describe()}; teacher {what}: {how}; loss: {loss}", flush=True)
        return TeacherKLTask(data, info.device, teacher, kl_weight, self.kl_temperature, self.kl_format_names,
                             self.loss_reduction, (self.divergence, self.jsd_beta))
