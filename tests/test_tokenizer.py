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


# ----- the HF export's tokenizer: transformers loads it (no protobuf) and gives our ids ---------------
EXPORT_SETS = ("GSM8K", "SVAMP", "CSQA")


def _exported(tmp_path, tokenizer_path: str) -> str:
    import checkpoint_split as cks

    cks.init("tiny-llama", str(tmp_path / "native"), tokenizer=tokenizer_path)
    cks.to_hf(str(tmp_path / "native"), str(tmp_path / "hf"))
    return str(tmp_path / "hf")


def _test_prompts() -> list:
    """Every test prompt of GSM8K, SVAMP and CSQA in the default template, and their gold outputs."""
    from engine.text.prompts import format_prompt

    texts = []
    for name in EXPORT_SETS:
        for rec in json.load(open(shared_path("data", "mcc", name, "test.json"))):
            texts += [format_prompt(rec["instruction"]), rec["output"] if isinstance(rec["output"], str) else ""]
    return [t for t in texts if t]


def test_hf_export_tokenizer_gives_our_ids_on_the_test_prompts(tmp_path):
    """AutoTokenizer on to_hf's output (the LLaMA-2 tokenizer) loads the fast tokenizer from its
    tokenizer.json and gives, BOS included, the ids of our sentencepiece encode on every GSM8K, SVAMP
    and CSQA test prompt (double spaces and all), and decodes them back to our text."""
    from transformers import AutoTokenizer

    hf_dir = _exported(tmp_path, shared_path("data", "tokenizers", "llama2.model"))
    ours, theirs = load_tokenizer(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(ours, SentencePieceTokenizer) and theirs.is_fast
    texts = _test_prompts()
    assert len(texts) > 2500 and sum("  " in t for t in texts) > 100  # the prompts that used to split apart
    differ = [t for t in texts if theirs(t)["input_ids"] != ours.encode(t)]
    assert not differ, (len(differ), differ[:2])
    for t in texts[:300]:
        ids = ours.encode(t)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids[1:])
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_hf_export_of_a_normalizing_tokenizer(tmp_path, tiny_tokenizer):
    """Our tiny tokenizer normalises (NFKC, extra whitespace removed): the exported one does the same."""
    from transformers import AutoTokenizer

    hf_dir = _exported(tmp_path, tiny_tokenizer)
    ours, theirs = load_tokenizer(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    texts = TEXTS + ["a  b", "  lead", "trail  ", "ｆｕｌｌ width ①", "x\u00a0y", " \n ", "a   \t  b", ""]
    for t in texts:
        assert theirs(t)["input_ids"] == ours.encode(t), t
    assert theirs.pad_token_id == ours.pad_id == 3


@pytest.mark.processes
def test_hf_export_tokenizer_loads_without_protobuf_or_sentencepiece(tmp_path):
    """In a Python whose packages lack protobuf, sentencepiece and tiktoken (a plain transformers
    install), AutoTokenizer loads the export as a fast tokenizer and encodes a GSM8K prompt as we do."""
    import subprocess
    import sys

    from engine.text.prompts import format_prompt
    from tests.helpers import child_env, site_without

    hf_dir = _exported(tmp_path, shared_path("data", "tokenizers", "llama2.model"))
    prompt = format_prompt(json.load(open(shared_path("data", "mcc", "GSM8K", "test.json")))[0]["instruction"])
    site_dir = site_without(tmp_path, ("google", "protobuf", "sentencepiece", "tiktoken"))
    script = ("import json, sys\n"
              "from transformers import AutoTokenizer\n"
              "for name in ('google.protobuf', 'sentencepiece', 'tiktoken'):\n"
              "    try:\n"
              "        __import__(name)\n"
              "        sys.exit(name + ' is importable')\n"
              "    except ImportError:\n"
              "        pass\n"
              "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "print(json.dumps({'fast': tok.is_fast, 'ids': tok(sys.argv[2])['input_ids']}))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", script, hf_dir, prompt], capture_output=True, text=True,
                          env=child_env(PYTHONPATH=site_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-500:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fast"] and got["ids"] == load_tokenizer(hf_dir).encode(prompt)
