"""A record's prompt as the model reads it: the instruction in the prompt template, encoded, and cut
from the left when it leaves too little room for the response. One function, `encode_prompt`, for
every caller: generation jobs, scoring, calibration and the evaluator of training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from engine.runtime.errors import UserError
from engine.text.prompts import format_prompt


def prompt_room(max_seq_len: int, max_new_tokens: int) -> int:
    """How many tokens a prompt may take so that max_new_tokens still fit under max_seq_len (at least 1)."""
    return max(1, max_seq_len - max_new_tokens)


def fit_prompt(ids: List[int], limit: int, bos_id: Optional[int]) -> List[int]:
    """Cut a prompt from the left to at most `limit` tokens, keeping a leading BOS."""
    if len(ids) <= limit:
        return ids
    head = ids[:1] if bos_id is not None and ids[:1] == [bos_id] else []
    return head + ids[len(ids) - (limit - len(head)):]


@dataclass
class Prompt:
    text: str  # the instruction in the template
    ids: List[int]  # its tokens (BOS first), cut from the left to the room asked for
    n_tokens: int  # how many tokens it had before the cut

    @property
    def cut(self) -> bool:
        return self.n_tokens > len(self.ids)


def encode_prompt(tokenizer, instruction: str, template: str, room: Optional[int] = None) -> Prompt:
    """`instruction` (with its task prefix, if any) in `template`, encoded; with `room`, cut from the
    left to at most that many tokens (see prompt_room)."""
    text = format_prompt(instruction, template)
    ids = tokenizer.encode(text)
    return Prompt(text, ids if room is None else fit_prompt(ids, room, tokenizer.bos_id), len(ids))


def check_room(max_new_tokens: int, ckpt_dir: str, lora_dir: Optional[str] = None, model_type: Optional[str] = None):
    """Refuse a generation budget that leaves a prompt no room under the model's length (every prompt
    would be cut to its BOS, or skipped), read from the checkpoint's description before anything loads."""
    from engine.checkpoint import adapter_and_base, open_checkpoint

    base, _ = adapter_and_base(ckpt_dir, lora_dir)
    length = open_checkpoint(base, model_type).args.max_seq_len
    if max_new_tokens > length - 2:
        raise UserError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a prompt under the max_seq_len {length} of the "
            f"model in {base}; pass --max_new_tokens below {length - 1}"
        )
