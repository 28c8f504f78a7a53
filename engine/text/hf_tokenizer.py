"""A sentencepiece BPE model as an HF `tokenizer.json`: what transformers' AutoTokenizer (and vLLM)
load as a fast tokenizer with no package beyond `tokenizers`, giving the ids sentencepiece gives.

transformers would otherwise convert `tokenizer.model` itself, which needs protobuf (without it
transformers 5 says "tiktoken is required") and splits runs of spaces differently from
sentencepiece (its Metaspace pre-tokenizer cuts before every space, so `▁▁` never forms).
Here the model file is read directly (a few protobuf fields, parsed by hand), and the pipeline is
sentencepiece's: its normalizer (the precompiled character map, extra whitespace removed when the
model says so, spaces escaped as `▁`, the dummy prefix), no pre-tokenizer (merges may cross
spaces, as they do in sentencepiece), BPE with merges ranked by the merged piece's score, and
byte fallback. Control and unknown pieces are special tokens, so a literal "<s>" in a text is the
BOS token there, as in transformers' own LLaMA tokenizer (sentencepiece reads it as characters)."""
from __future__ import annotations

import struct
from typing import Dict, List, Tuple

from engine.text.tokenizer import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2  # TrainerSpec.model_type


def _varint(data: bytes, i: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> List[Tuple[int, object]]:
    """The (field number, value) pairs of one protobuf message: ints, or bytes for length-delimited
    and fixed-width fields."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = data[i:i + width], i + width
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire}")
        out.append((number, value))
    return out


def read_sentencepiece(path: str) -> dict:
    """pieces [(text, score, type)], model_type, byte_fallback and the normalizer settings of a
    sentencepiece .model file (ModelProto: pieces 1, trainer_spec 2, normalizer_spec 3)."""
    try:
        data = open(path, "rb").read()
        pieces, trainer, normalizer = [], {}, {}
        for number, value in _fields(data):
            if number == 1:
                piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL, **dict(_fields(value))}
                pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], piece[3]))
            elif number == 2:
                trainer = dict(_fields(value))
            elif number == 3:
                normalizer = dict(_fields(value))
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{path} is not a readable sentencepiece model ({e})") from None
    return {"pieces": pieces, "model_type": trainer.get(3, 1), "byte_fallback": bool(trainer.get(35, 0)),
            "charsmap": normalizer.get(2, b""), "add_dummy_prefix": bool(normalizer.get(3, 1)),
            "remove_extra_whitespaces": bool(normalizer.get(4, 1)), "escape_whitespaces": bool(normalizer.get(5, 1))}


def bpe_merges(pieces) -> List[Tuple[str, str]]:
    """Every split of a mergeable piece into two pieces, most preferred first: sentencepiece merges
    the adjacent pair whose union has the highest score, so the merge's rank is its union's score."""
    vocab = {p for p, _, _ in pieces}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind not in (NORMAL, USER_DEFINED):
            continue
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                ranked.append((-score, i, piece[:k], piece[k:]))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _normalizer(model: dict):
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(bytes(model["charsmap"]))] if model["charsmap"] else []
    if model["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if model["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if model["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps)


def sentencepiece_to_hf(path: str, bos_id, eos_id):
    """The `tokenizers.Tokenizer` equal to the sentencepiece BPE model at `path`; BOS (when the model
    has one) is added by its post-processor, as our encode adds it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = read_sentencepiece(path)
    if model["model_type"] != BPE_MODEL:
        raise TokenizerError(f"{path} is not a BPE sentencepiece model (only BPE models, LLaMA-1/2's and Mistral's, "
                             f"are written as tokenizer.json)")
    pieces = model["pieces"]
    vocab: Dict[str, int] = {p: i for i, (p, _, _) in enumerate(pieces)}
    unk = next((p for p, _, kind in pieces if kind == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=unk, fuse_unk=True,
                               byte_fallback=model["byte_fallback"]))
    tok.normalizer = _normalizer(model)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if model["add_dummy_prefix"] else []))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces
                            if kind in (UNKNOWN, CONTROL)])
    if bos_id is not None:
        bos = pieces[bos_id][0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def hf_tokenizer_config(tok, max_len: int) -> dict:
    """tokenizer_config.json beside that tokenizer.json: the generic fast class (transformers 4 and 5
    have it; it takes the file's pipeline as written) and the special tokens by name."""
    piece = tok.id_to_piece
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "bos_token": piece(tok.bos_id) if tok.bos_id is not None else None,
            "eos_token": piece(tok.eos_id) if tok.eos_id is not None else None,
            "unk_token": piece(tok.unk_id) if tok.unk_id is not None else None,
            "pad_token": piece(tok.pad_id) if tok.pad_id is not None else None,
            "add_bos_token": tok.bos_id is not None, "add_eos_token": False, "clean_up_tokenization_spaces": False}
