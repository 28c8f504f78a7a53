"""One tokenizer interface over a sentencepiece `.model` and an HF `tokenizer.json`."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from engine.runtime.errors import UserError


class TokenizerError(UserError):
    pass


class Tokenizer:
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]  # None when the tokenizer defines no padding token
    unk_id: Optional[int]
    vocab_size: int
    path: str

    @property
    def padding_id(self) -> int:
        """Id used to fill padded positions (never attended to or trained on)."""
        for i in (self.pad_id, self.eos_id, 0):
            if i is not None:
                return i

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self._encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def known(self, ids: Sequence[int]) -> List[int]:
        """ids without those the tokenizer does not have (a padded model vocabulary's rows have no text)."""
        return [int(i) for i in ids if 0 <= int(i) < self.vocab_size]

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        from sentencepiece import SentencePieceProcessor

        self.path = path
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path} is not a sentencepiece model ({' '.join(str(e).split())[:200]})") from None
        opt = lambda i: i if i >= 0 else None  # noqa: E731  (sentencepiece says -1 for "none")
        self.bos_id, self.eos_id = opt(self.sp.bos_id()), opt(self.sp.eos_id())
        self.pad_id, self.unk_id = opt(self.sp.pad_id()), opt(self.sp.unk_id())
        self.vocab_size = self.sp.vocab_size()

    def _encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(self.known(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HFTokenizer(Tokenizer):
    """tokenizer.json via the `tokenizers` library; special ids from tokenizer_config.json or
    config.json beside it. BOS/EOS are added by `encode` only, never by the file's post-processor."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise TokenizerError(f"{path}: reading tokenizer.json needs the 'tokenizers' package") from None
        self.path = path
        try:
            self.tok = _Tok.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({' '.join(str(e).split())[:200]})") from None
        directory = os.path.dirname(path)
        cfg = _read_optional_json(os.path.join(directory, "tokenizer_config.json"))
        model_cfg = _read_optional_json(os.path.join(directory, "config.json"))

        def special(name: str) -> Optional[int]:
            tok = cfg.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                i = self.tok.token_to_id(tok)
                if i is not None:
                    return i
            i = model_cfg.get(name + "_id")
            return i[0] if isinstance(i, list) else i

        self.bos_id, self.eos_id = special("bos_token"), special("eos_token")
        self.pad_id, self.unk_id = special("pad_token"), special("unk_token")
        if cfg.get("add_bos_token") is False and "bos_token" not in cfg:
            self.bos_id = None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(self.known(ids), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i))


def _read_optional_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def check_tokenizer_fits(tok: Tokenizer, vocab_size: int, ckpt_dir: str) -> None:
    """A tokenizer whose ids reach past the model's vocabulary would feed it rows it never learnt
    (or crash on a GPU): refuse the pair at load."""
    if tok.vocab_size > vocab_size:
        raise TokenizerError(f"{tok.path} has {tok.vocab_size} tokens but the model in {ckpt_dir} has a vocabulary "
                             f"of {vocab_size}; use the tokenizer the model was trained with")


def find_tokenizer_file(path: str) -> Optional[str]:
    if os.path.isfile(path):
        return path
    for name in ("tokenizer.model", "tokenizer.json"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            return p
    return None


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer file, or a directory holding tokenizer.model / tokenizer.json."""
    file = find_tokenizer_file(path)
    if file is None:
        raise TokenizerError(f"{path} holds no tokenizer.model or tokenizer.json")
    if not os.path.exists(file):
        raise TokenizerError(f"{file} does not exist")
    if file.endswith(".json"):
        return HFTokenizer(file)
    return SentencePieceTokenizer(file)
