"""A model whose vocabulary is padded beyond its tokenizer's (`checkpoint_split.py init` rounds up to a
multiple of 64, as many released checkpoints do): the padding ids are never chosen by infer.py or
train.py's evaluation, and decoding skips ids the tokenizer lacks (issue 23.7; before, sentencepiece
raised `IndexError: piece id is out of range`)."""
import json

import pytest
import torch

import checkpoint_split as cks
import infer
import train
from data.arithmetic import main as make_arith
from engine.infer.generation import SamplingParams, choose_tokens
from engine.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data.make_tokenizer import default_corpus, train_tokenizer

    return train_tokenizer(str(tmp_path_factory.mktemp("tok300") / "t.model"), default_corpus(500), vocab_size=300)


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tokenizer):
    """A tiny-llama whose padding rows of the output head dominate every logit: without the limit,
    greedy decoding picks a padding id at every step."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("padded")
    make_arith(str(root / "arith"), n_train=8, n_test=4, min_value=10, style="fixed", seed=1)
    cks.init("tiny-llama", str(root / "m"), n=1, tokenizer=tokenizer, seed=2)
    path = root / "m" / "consolidated.00.safetensors"
    weights = load_file(str(path))
    vocab = load_tokenizer(tokenizer).vocab_size
    head = weights["output.weight"]
    assert head.shape[0] > vocab, "the fixture needs a padded vocabulary"
    head[:vocab] *= 0.01
    head[vocab:] *= 100.0
    save_file(weights, str(path), metadata={"format": "cot-engine", "rank": "0", "world_size": "1"})
    return root, vocab, head.shape[0]


def test_padding_ids_are_never_chosen(padded):
    _, vocab, model_vocab = padded
    logits = torch.zeros(3, model_vocab)
    logits[:, vocab:] = 100.0  # the padding rows win every comparison
    logits[:, 5] = 1.0
    seeds, draws = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    assert choose_tokens(logits, SamplingParams(vocab_size=vocab), seeds, draws).tolist() == [5, 5, 5]
    assert (choose_tokens(logits, SamplingParams(), seeds, draws) >= vocab).all()  # the limit is what keeps them out
    sampled = choose_tokens(logits, SamplingParams(temperature=1.0, vocab_size=vocab), seeds, draws)
    assert (sampled < vocab).all()


def test_decoding_skips_ids_the_tokenizer_lacks(tokenizer):
    tok = load_tokenizer(tokenizer)
    ids = tok.encode("12 + 3", bos=False)
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 7, -1]) == tok.decode(ids)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_infer_on_a_padded_vocabulary(padded, tmp_path, dist1, temperature):
    root, vocab, _ = padded
    out = tmp_path / "o.jsonl"
    infer.generate(ckpt_dir=str(root / "m"), data_file=str(root / "arith" / "test.json"), output_file=str(out),
                   template="none", max_new_tokens=6, temperature=temperature, progress=False)
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == 4 and all(line["output"] for line in lines)  # real tokens, each with text


def test_training_evaluation_on_a_padded_vocabulary(padded, tmp_path, dist1, monkeypatch):
    import engine.train.evaluator as evaluator

    root, vocab, _ = padded
    chosen = []

    def recorded(*args, **kwargs):
        chosen.extend(evaluator_complete(*args, **kwargs))
        return chosen[-len(args[1]):]

    evaluator_complete = evaluator.complete_prompts
    monkeypatch.setattr(evaluator, "complete_prompts", recorded)
    train.main(task="ARITH", template="none", ckpt_dir=str(root / "m"), save_dir=str(tmp_path / "s"),
               train_file=str(root / "arith" / "train.json"), label_file=str(root / "arith" / "test.json"),
               max_steps=1, max_batch_size=4, max_new_tokens=6, eval_at_start=True, max_seq_len=64)
    evals = [json.loads(x) for x in open(tmp_path / "s" / "metrics.jsonl") if '"eval"' in x]
    assert evals and evals[0]["total"] == 4
    assert chosen and all(0 <= t < vocab for ids in chosen for t in ids)  # the ids the evaluation decoded


def test_implicit_decoding_never_chooses_padding_ids(padded):
    """train_implicit.py's own greedy loop (the stages' evaluation and `evaluate`) keeps to the tokenizer."""
    from engine import checkpoint as ck
    from engine.distill.implicit.decode import greedy_decode

    root, vocab, model_vocab = padded
    model = ck.load_model(str(root / "m")).eval()
    prompts = [[1, 5, 7], [1, 9]]
    unlimited = greedy_decode(model, prompts, eos=2, n_eos=1, max_new_tokens=5)
    assert any(t >= vocab for ids in unlimited for t in ids)  # what the padding rows would win
    limited = greedy_decode(model, prompts, eos=2, n_eos=1, max_new_tokens=5, vocab_size=vocab)
    assert all(len(ids) and all(t < vocab for t in ids) for ids in limited)
