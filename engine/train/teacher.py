"""A teacher run beside the model being trained: another checkpoint of ours loaded frozen in the same
job, under the same tensor parallelism (one shard per rank, like the student), in the run's compute
precision, eval mode, no gradients (adapter merged, projections fused, as infer.py loads a model).
Objectives that read a teacher's next-token distributions (teacher_kl's online teacher, on_policy)
build on it; what they make of its outputs is theirs."""
from __future__ import annotations

import os
from typing import Optional

import torch

from engine.runtime.errors import UserError
from engine.text.vocab import Vocab
from models.vocab_parallel import DenseTarget


class FrozenTeacher:
    """model, tok (its tokenizer) and vocab (what each id spells) of the checkpoint in `ckpt_dir`."""

    def __init__(self, ckpt_dir: str, dtype, device, flag: str = "--teacher_ckpt_dir"):
        from engine.checkpoint import load_for_inference

        if not os.path.exists(ckpt_dir):
            raise UserError(f"{flag} {ckpt_dir} does not exist")
        self.ckpt_dir, self.flag = ckpt_dir, flag
        self.model, self.tok, _ = load_for_inference(ckpt_dir, None, dtype, device)
        self.model.eval().requires_grad_(False)
        self.vocab = Vocab.of(self.tok)

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def tokenizer_difference(self, student_tok) -> Optional[str]:
        """None when the teacher's tokenizer spells every id as the student's does, else the first difference."""
        return self.vocab.first_difference(Vocab.of(student_tok))

    def require_same_vocabulary(self, student_tok, student_vocab_size: int, why: str) -> None:
        """Refuse (one sentence, naming both sizes) a teacher whose vocabulary is not the student's."""
        if self.vocab_size != student_vocab_size:
            raise UserError(f"{why}, but the model in {self.flag} {self.ckpt_dir} has a vocabulary of "
                            f"{self.vocab_size} and the student {student_vocab_size}")
        difference = self.tokenizer_difference(student_tok)
        if difference:
            raise UserError(f"{why}, but the tokenizer of {self.flag} {self.ckpt_dir} differs from the student's: "
                            f"{difference}")

    @torch.no_grad()
    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states [B, T, dim_t] of token ids [B, T]."""
        return self.model.forward_hidden(inputs)

    @torch.no_grad()
    def dense_target(self, inputs: torch.Tensor, rows: torch.Tensor, one_hot: Optional[torch.Tensor] = None
                     ) -> DenseTarget:
        """The teacher's full next-token distribution at the flat positions `rows` of `inputs` (same
        vocabulary as the student: its head shard holds the ids of the student's), projected chunk by
        chunk by the loss (models/vocab_parallel.py)."""
        hidden = self.hidden(inputs)
        return DenseTarget(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), self.model.head_weight, one_hot)
