"""The teacher file `infer.py score --top_k K` writes: its kind and its `.meta.json`."""
from __future__ import annotations

import os
from typing import Optional

from engine.runtime.fileio import file_sha256
from engine.text.vocab import Vocab

FILE_KIND = "teacher_topk"


def meta_path(path: str) -> str:
    return path + ".meta.json"


def teacher_meta(top_k: int, ckpt_dir: str, tokenizer, model_vocab: int, include_eos: bool, template: str,
                 data_file: Optional[str]) -> dict:
    """What a top-k file's reader needs to know about how it was written (FILE.meta.json)."""
    return {"kind": FILE_KIND, "top_k": top_k, "ckpt_dir": os.path.abspath(ckpt_dir), "template": template,
            "tokenizer_file": os.path.abspath(tokenizer.path), "tokenizer_sha256": file_sha256(tokenizer.path),
            "model_vocab_size": model_vocab, "include_eos": include_eos,
            "data_file": os.path.abspath(data_file) if data_file else None,
            "logprobs": "log-softmax of the teacher's logits at temperature 1, top k per token, descending",
            "vocab": Vocab.of(tokenizer).to_dict()}
