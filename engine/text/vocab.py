"""What each token id of a tokenizer spells (byte pieces and byte-level BPE decoded)."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_text(value: int) -> str:
    # a lone byte of a multi-byte character stays distinct from every other byte (surrogate escape)
    return bytes([value]).decode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict:
    """GPT-2's byte-level alphabet (HF ByteLevel pre-tokenizers): printable stand-in char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass
class Vocab:
    """The text of every token id of a tokenizer. `texts[i]` is None for special tokens (BOS, EOS, pad,
    unknown, control); `fallback` holds byte-fallback ids (`<0x41>`), used for a text only when no
    ordinary piece spells it."""

    texts: List[Optional[str]]
    eos_id: Optional[int]
    fallback: frozenset = frozenset()

    @classmethod
    def of(cls, tok) -> "Vocab":
        from engine.text.tokenizer import HFTokenizer, SentencePieceTokenizer

        specials = {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} - {None}
        texts, fallback = [], set()
        if isinstance(tok, SentencePieceTokenizer):
            sp = tok.sp
            for i in range(tok.vocab_size):
                if i in specials or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                    texts.append(None)
                elif sp.is_byte(i):
                    texts.append(_byte_text(int(_BYTE_PIECE.match(sp.id_to_piece(i)).group(1), 16)))
                    fallback.add(i)
                else:
                    texts.append(sp.id_to_piece(i).replace("\u2581", " "))
        elif isinstance(tok, HFTokenizer):
            with open(tok.path, encoding="utf-8") as f:
                spec = json.load(f)
            byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
                spec.get("pre_tokenizer"))
            specials |= {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
            table = _byte_level_decoder()
            for i in range(tok.vocab_size):
                piece = tok.tok.id_to_token(i)
                if piece is None or i in specials:
                    texts.append(None)
                elif byte_level:
                    if all(c in table for c in piece):
                        texts.append(bytes(table[c] for c in piece).decode("utf-8", "surrogateescape"))
                    else:  # an added, non-special token: its text is itself
                        texts.append(piece)
                elif _BYTE_PIECE.match(piece):
                    texts.append(_byte_text(int(_BYTE_PIECE.match(piece).group(1), 16)))
                    fallback.add(i)
                else:
                    texts.append(piece.replace("\u2581", " "))
        else:
            raise TypeError(f"no vocabulary reader for {type(tok).__name__}")
        return cls(texts, tok.eos_id, frozenset(fallback))

    def to_dict(self) -> dict:
        return {"texts": self.texts, "eos_id": self.eos_id, "fallback": sorted(self.fallback)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(list(d["texts"]), d.get("eos_id"), frozenset(d.get("fallback", ())))

    def __len__(self) -> int:
        return len(self.texts)

    def first_difference(self, other: "Vocab") -> Optional[str]:
        """None when both spell every id the same (the same tokenizer), else what differs first."""
        if len(self) != len(other):
            return f"{len(self)} vs {len(other)} tokens"
        if self.eos_id != other.eos_id:
            return f"EOS id {self.eos_id} vs {other.eos_id}"
        for i, (a, b) in enumerate(zip(self.texts, other.texts)):
            if a != b:
                return f"id {i} is {a!r} vs {b!r}"
        return None

    def map_to(self, student: "Vocab") -> np.ndarray:
        """For every id of this (teacher) vocabulary, the student id spelling the same text, or -1.
        EOS maps to EOS; other special tokens to nothing."""
        index = {}
        for i, t in enumerate(student.texts):  # ordinary pieces first, byte fallbacks only where none
            if t is not None and i not in student.fallback:
                index.setdefault(t, i)
        for i in sorted(student.fallback):
            if student.texts[i] is not None:
                index.setdefault(student.texts[i], i)
        out = np.full(len(self.texts), -1, dtype=np.int64)
        for i, t in enumerate(self.texts):
            if t is not None:
                out[i] = index.get(t, -1)
        if self.eos_id is not None and student.eos_id is not None:
            out[self.eos_id] = student.eos_id
        return out

    def spell(self, ids: Sequence[int]) -> List[Optional[str]]:
        return [self.texts[i] if 0 <= i < len(self.texts) else None for i in ids]
