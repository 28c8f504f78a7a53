import json

import pytest

from engine.runtime.errors import UserError
from engine.text.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from tests.conftest import shared_path

TEXTS = ["Hello world", "Natalia sold clips to 48 of her friends in April. Therefore, the answer is 72 .",
         "  leading spaces and ümlauts, emoji 🙂 and 中文", "a\nmulti-line\n\ttext", "1,234.56 + (7 * 8) = ?"]


def test_llama2_tokenizer_round_trips():
    tok = load_tokenizer(shared_path("data", "tokenizers", "llama2.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, None)
    assert tok.padding_id == 2
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 32000 for i in ids)
        assert tok.decode(ids[1:-1]) == text.lstrip(" ") or tok.decode(ids[1:-1]) == text
    assert tok.encode("Hello world", bos=False) == [15043, 3186]  # LLaMA-2's known ids


def test_tiny_tokenizer_splits_digits(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    ids = tok.encode("the answer is 1234", bos=False)
    assert [tok.id_to_piece(i) for i in ids][-4:] == ["1", "2", "3", "4"]
    assert tok.decode(ids) == "the answer is 1234"


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    for text in TEXTS:
        ids = tok.encode(text, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids[1:-1]) == text


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="tokenizer.model is not a sentencepiece model"):
        load_tokenizer(str(tmp_path))
