"""The flags of train.py --objective teacher_kl."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from engine.runtime.cli import flag
from engine.train.args import TrainArgs


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
        from engine.distill.teacher_kl.teachers import check_teacher_flags

        super().__post_init__()
        check_teacher_flags(self.teacher_ckpt_dir, self.teacher_file, self.teacher_top_k, self.kl_weight,
                            self.kl_temperature)

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.checkpoint import open_checkpoint
        from engine.distill.sft import SFTData
        from engine.distill.teacher_kl.task import TeacherKLTask
        from engine.distill.teacher_kl.teachers import OnlineTeacher, TeacherFile
        from engine.text.vocab import Vocab

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
