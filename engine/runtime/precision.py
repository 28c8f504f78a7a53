"""Precision flags shared by the launchers."""
import torch

from engine.runtime.errors import UserError


def dtype_from_flags(use_float16: bool = False, use_bfloat16: bool = False) -> torch.dtype:
    if use_float16 and use_bfloat16:
        raise UserError("--use_float16 and --use_bfloat16 cannot both be True")
    return torch.float16 if use_float16 else torch.bfloat16 if use_bfloat16 else torch.float32
