"""The flags of train.py --objective on_policy."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from engine.runtime.cli import flag
from engine.train.args import DivergenceFlags, TeacherCheckpointFlag, TrainArgs


@dataclass(kw_only=True)
class OnPolicyArgs(DivergenceFlags, TeacherCheckpointFlag, TrainArgs):
    """on-policy distillation (GKD): the student samples responses, a frozen teacher scores every token"""

    OBJECTIVE: ClassVar[str] = "on_policy"
    SUMMARY: ClassVar[str] = ("Train a student on the teacher's next-token distributions over responses the "
                              "student samples itself (a fraction --lmbda of the micro-batches) or the data file's.")

    self_distill: bool = flag("not offered: the live student as its own teacher has divergence 0 on its own "
                              "samples; True is refused (pass --teacher_ckpt_dir, which may be the student's "
                              "own starting checkpoint).", False)
    lmbda: float = flag("fraction of the micro-batches whose responses the student samples (GKD's lambda; the "
                        "others use the data file's rationales, or the teacher's samples with --seq_kd True).", 1.0)
    gen_temperature: float = flag("sampling temperature of the responses (0: greedy).", 1.0)
    gen_top_p: float = flag("nucleus mass of the sampled responses, in (0, 1].", 1.0)
    num_samples: int = flag("responses sampled per prompt of a sampled micro-batch.", 1)
    seq_kd: bool = flag("True: the micro-batches the student does not sample get responses the teacher samples "
                        "(sequence-level KD) instead of the data file's.", False)
    save_samples: bool = flag("write every sampled response to save_dir/samples.jsonl (step, record, sample, "
                              "writer, seed, tokens, text).", False)

    def __post_init__(self):
        from engine.runtime.errors import UserError
        from engine.train.args import check_divergence_flags

        super().__post_init__()
        if self.self_distill:
            raise UserError("--self_distill True: on-policy distillation needs a teacher other than the live "
                            "student (against itself the divergence is 0 on every sample); pass "
                            "--teacher_ckpt_dir (the student's starting checkpoint is a valid teacher)")
        if not self.teacher_ckpt_dir:
            raise UserError("--objective on_policy needs --teacher_ckpt_dir: the frozen teacher whose next-token "
                            "distributions the student learns on its own samples")
        check_divergence_flags(self.divergence, self.jsd_beta, self.kl_temperature)
        if not 0 <= self.lmbda <= 1:
            raise UserError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if self.gen_temperature < 0:
            raise UserError(f"--gen_temperature must be >= 0, got {self.gen_temperature}")
        if not 0 < self.gen_top_p <= 1:
            raise UserError(f"--gen_top_p must be in (0, 1], got {self.gen_top_p}")
        if self.num_samples < 1:
            raise UserError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.seq_kd and self.lmbda == 1:
            raise UserError("--seq_kd True has the teacher write the micro-batches the student does not sample, "
                            "but --lmbda 1 has the student sample them all; lower --lmbda or drop --seq_kd")
        if not os.path.exists(self.teacher_ckpt_dir):
            raise UserError(f"--teacher_ckpt_dir {self.teacher_ckpt_dir} does not exist")

    def make_task(self, records, tokenizer, max_len: int, info):
        from engine.checkpoint import open_checkpoint
        from engine.distill.on_policy.task import OnPolicySettings, OnPolicyTask
        from engine.distill.sft import SFTData
        from engine.infer.generation import SamplingParams
        from engine.train.teacher import FrozenTeacher

        data = SFTData(records, tokenizer, max_len, self.template, self.seed, self.train_file)
        teacher = FrozenTeacher(self.teacher_ckpt_dir, self.dtype, info.device)
        teacher.require_same_vocabulary(tokenizer, open_checkpoint(self.ckpt_dir, self.model_type).args.vocab_size,
                                        "--objective on_policy compares the teacher's and the student's next-token "
                                        "distributions token by token")
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.gen_temperature,
                                  top_p=self.gen_top_p, vocab_size=tokenizer.vocab_size)
        settings = OnPolicySettings(
            lmbda=self.lmbda, seq_kd=self.seq_kd, divergence=self.divergence, jsd_beta=self.jsd_beta,
            kl_temperature=self.kl_temperature, sampling=sampling, num_samples=self.num_samples, seed=self.seed,
            slots=self.max_batch_size // info.dp_size * self.num_samples,
            samples_file=os.path.join(self.save_dir, "samples.jsonl") if self.save_samples else None)
        if info.is_main:
            div = {"forward_kl": "T^2 KL(teacher || student)", "reverse_kl": "T^2 KL(student || teacher)",
                   "jsd": f"T^2 JSD(beta {self.jsd_beta:g})"}[self.divergence]
            others = "the teacher's samples" if self.seq_kd else "the data file's rationales"
            print(f"{self.train_file}: {data.describe()}; teacher --teacher_ckpt_dir {self.teacher_ckpt_dir}; the "
                  f"student samples {self.num_samples} response(s) per prompt (temperature {self.gen_temperature:g}, "
                  f"top_p {self.gen_top_p:g}, at most {self.max_new_tokens} tokens) for a fraction {self.lmbda:g} of "
                  f"the micro-batches, the others use {others}; loss: {div} at T={self.kl_temperature:g}, a token "
                  f"mean over each optimizer step", flush=True)
        return OnPolicyTask(data, info.device, teacher, settings, self.dtype, self.compile, info.is_main)
