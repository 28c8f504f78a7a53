"""train.py --objective teacher_kl: the KL against a reference written here, TP=2 == TP=1 (function
and CLI, online and offline teachers), KL 0 against itself, the DTW alignment (hand-made sequences
and the real LLaMA-2 tokenizer), infer.py score --top_k, the data formats, every bad input, and the
path teacher -> top-k file -> student with another tokenizer under torchrun."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint_split as cks
import infer
import train
from data.arithmetic import main as make_arith
from data.make_tokenizer import default_corpus, train_tokenizer
from engine.distill.teacher_kl.alignment import aligned_positions, dtw_align, one_to_one
from engine.runtime.errors import UserError
from engine.text.vocab import Vocab
from tests.conftest import shared_path
from tests.helpers import assert_same_run, full_weights, losses, teacher_and_students, torchrun, train_args

BASE = {"task": "ARITH", "template": "none", "max_seq_len": 64, "lr": 1e-3, "max_steps": 3, "save_every": 3,
        "max_batch_size": 4, "objective": "teacher_kl", "kl_weight": 0.7, "kl_temperature": 1.5}


def metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl")) if '"eval"' not in line]


# ----- the objective ---------------------------------------------------------------------------
def _reference(hidden, weight, p, temperature):
    """T^2 sum_rows KL(p || softmax(hidden @ weight.T / T)), with 0 log 0 = 0, written out directly."""
    log_q = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1)
    log_p = torch.where(p > 0, p.clamp(min=1e-30).log(), torch.zeros_like(p))
    return temperature ** 2 * (p * (log_p - log_q)).sum()


@pytest.mark.processes
def test_kl_equals_a_direct_reference_and_tp2_equals_tp1(dist1, tmp_path):
    """Hand-made states: the dense target (a teacher's full distribution) and a sparse one (ids with
    unused slots, a repeated id, a row without target) give the reference's value and gradients,
    chunked or from logits, at TP=1 and at TP=2 (torchrun); the sharded top-k is the reference's, on
    logits with many equal values too (ties by id, the same tokens at both TP sizes)."""
    from tests.kl_checks import kl_inputs, teacher_kl_grads, tied_logits

    temperature = 1.7
    hidden, weight, t_hidden, t_weight, ids, probs = kl_inputs()
    dense_p = torch.softmax(t_hidden @ t_weight.t() / temperature, dim=-1)
    sparse_p = torch.zeros(len(ids), weight.shape[0])
    for r in range(len(ids)):
        for c in range(ids.shape[1]):
            if ids[r, c] >= 0:
                sparse_p[r, ids[r, c]] += probs[r, c]
    assert sparse_p[2].sum() == 0 and abs(float(sparse_p[1].sum()) - 1) < 1e-6
    refs = {}
    for name, p in (("dense", dense_p), ("sparse", sparse_p)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = _reference(h, w, p, temperature)
        loss.backward()
        refs[name] = {"loss": loss.item(), "grad_h": h.grad, "grad_w": w.grad}
    one = teacher_kl_grads(temperature)
    torchrun("tests/workers/kl_worker.py", str(tmp_path / "tp2.pt"))
    two = torch.load(tmp_path / "tp2.pt")
    worst = {"loss": 0.0, "grad": 0.0}
    for results in (one, two):
        for name, r in results.items():
            if name.startswith("topk"):
                continue
            ref = refs[name.split("-")[0]]
            worst["loss"] = max(worst["loss"], abs(r["loss"] - ref["loss"]) / ref["loss"])
            worst["grad"] = max(worst["grad"], (r["grad_h"] - ref["grad_h"]).abs().max().item(),
                                (r["grad_w"] - ref["grad_w"]).abs().max().item())
    print(f"teacher KL vs reference, TP=1 and TP=2: loss rel. error {worst['loss']:.1e}, grads {worst['grad']:.1e}")
    assert worst["loss"] <= 1e-5 and worst["grad"] <= 1e-5, worst
    ref_lp, ref_ids = torch.log_softmax(t_hidden @ t_weight.t(), dim=-1).topk(5, dim=-1)
    # equal logits: the tokens a stable descending sort puts first (ties by id), at every TP size
    tied_ids = tied_logits().sort(dim=-1, descending=True, stable=True).indices[:, :5]
    for results in (one, two):
        assert torch.equal(results["topk"]["ids"], ref_ids)
        assert (results["topk"]["logprobs"] - ref_lp).abs().max() <= 1e-5
        assert torch.equal(results["topk_tied"], tied_ids)


def test_sparse_probs_renormalise_the_kept_tokens():
    from engine.distill.teacher_kl.teachers import sparse_probs

    logp = torch.tensor([[-0.5, -1.5, -2.0, -4.0], [-1.0, -2.0, -3.0, -3.5]])
    keep = torch.tensor([[True, False, True, True], [False, False, False, False]])
    p = sparse_probs(logp, keep, 2.0)
    ref = torch.tensor([np.exp(-0.25), 0.0, np.exp(-1.0), np.exp(-2.0)])
    assert torch.allclose(p[0], (ref / ref.sum()).float(), atol=1e-7)
    assert p[1].abs().sum() == 0  # keeps nothing: no target (the caller falls back to one-hot)


# ----- the DTW alignment -----------------------------------------------------------------------
def test_dtw_on_hand_made_sequences():
    same = [" The", " answer", " is", " 1", "2"]
    assert one_to_one(same, same, dtw_align(same, same)) == [0, 1, 2, 3, 4]
    # a merge (" ans" + "wer" = " answer") and a split (" 12" = " 1" + "2") around identical spans
    a = [" The", " ans", "wer", " is", " 1", "2", " ."]
    b = [" The", " answer", " is", " 12", " ."]
    path = dtw_align(a, b, 0)
    assert path == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (6, 4)]
    assert one_to_one(a, b, path) == [0, -1, -1, 2, -1, -1, 4]
    assert one_to_one(b, a, dtw_align(b, a, 0)) == [0, -1, 3, -1, 6]
    # same length, different text: paired but never a match
    assert one_to_one([" a", " b"], [" a", " c"], dtw_align([" a", " b"], [" a", " c"])) == [0, -1]
    # unknown tokens (None: their text is unknown) pair with their neighbours and never match
    a = [" x", None, " y", " z"]
    b = [" x", " $", " y", " z"]
    assert one_to_one(a, b, dtw_align(a, b, 0)) == [0, -1, 2, 3]
    assert one_to_one(b, a, dtw_align(b, a, 0)) == [0, -1, 2, 3]
    # without the character band, DTW pairs " is" with the "wer" of " ans|wer" (equal edit cost)
    a, b = [" the", " answer", " is"], [" the", " ans", "wer", " is"]
    assert one_to_one(a, b, dtw_align(a, b, None)) == [0, -1, -1]
    assert one_to_one(a, b, dtw_align(a, b, 0)) == [0, -1, 3]
    # EOS pairs with EOS
    student = Vocab([None, None, None, " 1", "2", " 12", " ."], eos_id=2)
    teacher = Vocab([None, None, " 12", " .", " 1", "2", None], eos_id=6)
    assert aligned_positions([5, 6, 2], [2, 3, 6], student, teacher) == [0, 1, 2]
    assert aligned_positions([3, 4, 6, 2], [2, 3, 6], student, teacher) == [-1, -1, 1, 2]


def test_targets_map_the_teacher_into_the_student_vocabulary():
    """Teacher tokens the student lacks are dropped and the rest renormalised; a position aligned to
    nothing, or whose teacher tokens all lack a student id, learns its own token (one-hot)."""
    from engine.distill.teacher_kl.teachers import _row_targets

    student = Vocab([None, None, None, " a", " b", "A", "A"], eos_id=2, fallback=frozenset({6}))
    teacher = Vocab([None, " b", " c", " a", "A", None], eos_id=5)
    id_map = teacher.map_to(student)
    assert id_map.tolist() == [-1, 4, -1, 3, 5, 2]  # " c" absent; "A" to the piece, not the byte; EOS to EOS
    topk_ids = np.array([[1, 2, 3], [2, 2, 2], [3, 1, 5]])
    topk_lp = np.log(np.array([[0.5, 0.3, 0.1], [0.5, 0.2, 0.1], [0.6, 0.2, 0.1]], dtype=np.float32))
    ids, probs = _row_targets([4, 3, 3, 2], [0, 1, -1, 2], topk_ids, topk_lp, id_map, 1.0)
    assert ids[0].tolist() == [4, -1, 3] and np.allclose(probs[0], [0.5 / 0.6, 0, 0.1 / 0.6])
    assert ids[1].tolist() == [3, -1, -1] and probs[1].tolist() == [1, 0, 0]  # only " c": one-hot fallback
    assert ids[2].tolist() == [3, -1, -1] and probs[2].tolist() == [1, 0, 0]  # not aligned
    assert ids[3].tolist() == [3, 4, 2] and np.allclose(probs[3], [0.6 / 0.9, 0.2 / 0.9, 0.1 / 0.9])


def test_vocab_texts_of_sentencepiece_and_byte_level_tokenizers(tmp_path, tiny_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from engine.text.tokenizer import load_tokenizer

    vocab = Vocab.of(load_tokenizer(tiny_tokenizer))
    assert vocab.texts[:4] == [None, None, None, None] and " Therefore" in vocab.texts and vocab.eos_id == 2
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["the answer is 12 \u20ac\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(str(tmp_path / "hf"))
    v = Vocab.of(tok)
    text = "the answer is 12 \u20ac\n"
    ids = tok.encode(text, bos=False)
    spelt = "".join(v.spell(ids)).encode("utf-8", "surrogateescape").decode("utf-8")
    assert spelt == text and v.texts[tok.eos_id] is None and v.eos_id == tok.eos_id


def test_dtw_on_the_llama2_tokenizer_and_one_trained_here(tmp_path):
    """GSM8K rationales tokenized by LLaMA-2 (digits split, byte fallback) and by a tokenizer trained
    here on other GSM8K text (numbers merged): every one-to-one same-text match covers exactly the
    same characters in both (checked against decoded offsets), and DTW finds nearly every token that
    both tokenizers cut identically."""
    import sentencepiece as spm

    from engine.text.tokenizer import load_tokenizer

    llama = load_tokenizer(shared_path("data", "tokenizers", "llama2.model"))
    corpus = [r["instruction"] + " " + r["output"] for r in json.load(open(shared_path("data", "mcc", "GSM8K",
                                                                                       "test.json")))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "other"),
                                   vocab_size=2000, model_type="bpe", split_digits=False, byte_fallback=True,
                                   character_coverage=1.0, num_threads=1, minloglevel=2, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=3)
    other = load_tokenizer(str(tmp_path / "other.model"))
    va, vb = Vocab.of(other), Vocab.of(llama)

    def spans(tok, ids):
        ends = [len(tok.decode(ids[:n + 1])) for n in range(len(ids))]
        return list(zip([0] + ends[:-1], ends))

    matched = right = cut_alike = found = total = 0
    for rec in json.load(open(shared_path("data", "mcc", "GSM8K", "dev.json")))[:80]:
        a_ids, b_ids = other.encode(rec["output"], bos=False), llama.encode(rec["output"], bos=False)
        match = aligned_positions(a_ids, b_ids, va, vb)
        sa, sb = spans(other, a_ids), spans(llama, b_ids)
        total += len(a_ids)
        for i, j in enumerate(match):
            if j >= 0:
                matched += 1
                right += sa[i] == sb[j] and va.texts[a_ids[i]] == vb.texts[b_ids[j]]
        by_span = {(s, vb.texts[t]): n for n, (s, t) in enumerate(zip(sb, b_ids))}
        for i, (s, t) in enumerate(zip(sa, a_ids)):
            if (s, va.texts[t]) in by_span and va.texts[t]:
                cut_alike += 1
                found += match[i] == by_span[(s, va.texts[t])]
    print(f"LLaMA-2 vs a GSM8K tokenizer: {matched}/{total} student tokens matched one-to-one, {right} at the "
          f"same characters; {found}/{cut_alike} identically cut tokens found")
    assert matched >= 0.4 * total and right / matched >= 0.99 and found / cut_alike >= 0.95


# ----- the trainer, online and offline -----------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    """A student (tiny-llama), a teacher of another family with the same tokenizer (tiny-qwen2: tied
    head, one KV head), a teacher with another tokenizer whose numbers merge (tiny-llama3), each in
    1 and 2 shards; a top-5 file of the latter over the training file."""
    root = tmp_path_factory.mktemp("kl")
    make_arith(str(root / "arith"), n_train=14, n_test=4, min_value=10, style="fixed", seed=1)
    models = teacher_and_students(root, tiny_tokenizer)
    return root, models


@pytest.fixture(scope="module")
def other_file(env, dist1):
    root, models = env
    out = root / "other.topk.jsonl"
    infer.score(ckpt_dir=str(models["other"][0]), data_file=str(root / "arith" / "train.json"),
                output_file=str(out), top_k=5, template="none")
    return out


@pytest.mark.processes
@pytest.mark.parametrize("teacher", ["online-same", "online-other", "offline-other"])
def test_tp2_equals_tp1(env, other_file, teacher, dist1):
    """Losses and updated weights after 3 steps agree at TP=1 and TP=2: an online teacher of another
    family with the same tokenizer (full distribution), an online teacher with another tokenizer, and
    a top-k file of that teacher."""
    root, models = env
    base = {**BASE, "train_file": str(root / "arith" / "train.json")}
    mode, name = teacher.split("-")
    runs = {}
    for tp in (1, 2):
        args = {**base, "ckpt_dir": models["student"][tp - 1], "save_dir": root / f"{teacher}-tp{tp}"}
        args.update({"teacher_ckpt_dir": models[name][tp - 1]} if mode == "online" else {"teacher_file": other_file})
        if tp == 1:
            train.main(**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in args.items()})
        else:
            torchrun("train.py", *train_args(args))
        runs[tp] = str(args["save_dir"])
    assert_same_run(runs[1], runs[2])
    lines = metrics(runs[2])
    assert all(line["loss_kl"] > 0 for line in lines)
    assert all(abs(line["loss"] - 0.3 * line["loss_ce"] - 0.7 * line["loss_kl"]) < 1e-5 for line in lines)

    worst = max(abs(a - b) for a, b in zip(losses(runs[1]), losses(runs[2])))
    wa, wb = (full_weights(os.path.join(runs[tp], "checkpoint-3")) for tp in (1, 2))
    print(f"{teacher}: TP=2 vs TP=1 loss difference {worst:.1e}, "
          f"weights after 3 steps {max((wa[k] - wb[k]).abs().max().item() for k in wa):.1e}")


def test_teacher_equal_to_the_student_starts_at_zero_kl(env, dist1):
    root, models = env
    train.main(**{**BASE, "train_file": str(root / "arith" / "train.json"), "ckpt_dir": str(models["student"][0]),
                  "teacher_ckpt_dir": str(models["student"][0]), "save_dir": str(root / "self")})
    lines = metrics(root / "self")
    assert lines[0]["loss_kl"] <= 1e-6 and lines[0]["loss_ce"] > 1
    assert lines[-1]["loss_kl"] > 1e-6  # the student has moved away from its frozen copy


def test_offline_file_equals_the_online_teacher(env, other_file, dist1):
    """The same teacher, run in the job or read from its top-5 file, trains the same student."""
    root, models = env
    base = {**BASE, "train_file": str(root / "arith" / "train.json"), "ckpt_dir": str(models["student"][0]),
            "teacher_top_k": 5}
    train.main(**base, teacher_ckpt_dir=str(models["other"][0]), save_dir=str(root / "online"))
    train.main(**base, teacher_file=str(other_file), save_dir=str(root / "offline"))
    assert_same_run(str(root / "online"), str(root / "offline"))


@pytest.mark.processes
def test_score_top_k_equals_the_full_log_softmax(env, other_file, dist1):
    """infer.py score --top_k: per output token, the model's top k of log_softmax(full logits), at
    TP=1 and under torchrun at TP=2; the meta file carries the teacher's vocabulary."""
    from engine.checkpoint import load_for_inference
    from engine.text.tokenizer import load_tokenizer

    root, models = env
    model = load_for_inference(str(models["other"][0]), None, torch.float32, "cpu").model
    tok = load_tokenizer(str(models["other"][0]))
    rec = json.load(open(root / "arith" / "train.json"))[3]
    prompt, resp = tok.encode(rec["instruction"]), tok.encode(rec["output"], bos=False, eos=True)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + resp[:-1]]))[0, len(prompt) - 1:]
    ref_lp, ref_ids = torch.log_softmax(logits.float(), dim=-1).topk(5, dim=-1)
    lines = [json.loads(line) for line in open(other_file)]
    assert lines[3]["tokens"] == resp
    assert lines[3]["topk_ids"] == ref_ids.tolist()
    assert np.abs(np.array(lines[3]["topk_logprobs"]) - ref_lp.numpy()).max() <= 1e-5
    own = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(resp)), torch.tensor(resp)]
    assert np.abs(np.array(lines[3]["token_logprobs"]) - own.numpy()).max() <= 1e-5  # each output token's own
    meta = json.load(open(str(other_file) + ".meta.json"))
    assert meta["top_k"] == 5 and Vocab.from_dict(meta["vocab"]).texts == Vocab.of(tok).texts
    torchrun("infer.py", "score", "--ckpt_dir", str(models["other"][1]), "--data_file",
             str(root / "arith" / "train.json"), "--output_file", str(root / "tp2.topk.jsonl"), "--top_k", "5",
             "--template", "none")
    two = [json.loads(line) for line in open(root / "tp2.topk.jsonl")]
    assert [t["topk_ids"] for t in two] == [t["topk_ids"] for t in lines]
    assert max(abs(x - y) for t, o in zip(two, lines) for x, y in zip(t["token_logprobs"], o["token_logprobs"])) <= 1e-5
    assert max(abs(x - y) for t, o in zip(two, lines) for rt, ro in zip(t["topk_logprobs"], o["topk_logprobs"])
               for x, y in zip(rt, ro)) <= 1e-5


# ----- data formats ------------------------------------------------------------------------------
def test_four_formats(tmp_path):
    from data.make_formats import main as make_formats
    from engine.train.batching import grouped_epoch_batches

    make_arith(str(tmp_path / "a"), n_train=10, n_test=2, seed=0)
    make_formats(str(tmp_path / "a" / "train.json"), str(tmp_path / "f.json"), seed=3)
    out = json.load(open(tmp_path / "f.json"))
    records = json.load(open(tmp_path / "a" / "train.json"))
    assert len(out) == 40 and [r["format"] for r in out[:4]] == ["icl_answer", "icl_cot", "zs_answer", "zs_cot"]
    q = records[0]["instruction"]
    zs_answer, zs_cot, icl_answer, icl_cot = (next(r for r in out if r["question"] == 0 and r["format"] == f)
                                              for f in ("zs_answer", "zs_cot", "icl_answer", "icl_cot"))
    assert zs_answer == {**zs_answer, "instruction": f"Question: {q}", "output": f"The answer is {records[0]['label']}"}
    assert zs_cot["instruction"] == f"Question: {q}\nLet's think step by step" and zs_cot["output"] == records[0]["output"]
    for r, cue in ((icl_answer, "The answer is "), (icl_cot, "Therefore, the answer is ")):
        demos = r["instruction"].split("\n\n")
        assert len(demos) == 5 and demos[-1].startswith(f"Question: {q}") and q not in "".join(demos[:-1])
        assert all(d.startswith("Question: ") and cue in d for d in demos[:-1])
    # one format per batch, every example of the chosen formats once per epoch
    groups = [r["format"] if r["format"] in ("icl_cot", "zs_cot") else None for r in out]
    batches = grouped_epoch_batches([len(r["instruction"]) for r in out], groups, 4, 0, 0)
    assert all(len({out[p]["format"] for p in b}) == 1 for b in batches)
    assert {p for b in batches for p in b} == {p for p, g in enumerate(groups) if g}


def test_formats_from_the_real_prompt_files(tmp_path):
    from data.make_formats import main as make_formats

    cot = shared_path("data", "prompts", "gsm8k_complex_cot.txt")
    direct = shared_path("data", "prompts", "gsm8k_direct.txt")
    make_formats(shared_path("data", "mcc", "GSM8K", "dev.json"), str(tmp_path / "f.json"), formats="icl_cot,icl_answer",
                 cot_prompt_file=cot, answer_prompt_file=direct)
    out = json.load(open(tmp_path / "f.json"))
    assert len(out) == 2 * 660
    first = json.load(open(shared_path("data", "mcc", "GSM8K", "dev.json")))[0]["instruction"].strip()
    assert out[0]["instruction"] == open(cot).read().strip() + f"\n\nQuestion: {first}\nLet's think step by step"
    assert out[1]["instruction"] == open(direct).read().strip() + f"\n\nQuestion: {first}"


def test_training_on_formats_holds_one_format_per_batch(env, tmp_path, dist1):
    from data.make_formats import main as make_formats

    root, models = env
    make_formats(str(root / "arith" / "train.json"), str(tmp_path / "f.json"), num_demos=2)
    train.main(task="ARITH", template="none", max_seq_len=256, lr=1e-3, max_steps=4, max_batch_size=4,
               train_file=str(tmp_path / "f.json"), ckpt_dir=str(models["student"][0]), save_dir=str(tmp_path / "r"),
               formats="zs_cot,icl_answer")
    meta = json.load(open(tmp_path / "r" / "run_config.json"))
    assert meta["steps_per_epoch"] == 8  # 14 questions x 2 formats, each format in batches of 4 (the last completed)
    # the trainer's batches: one format each, every example of the chosen formats once an epoch
    from engine.distill.sft import SFTData, SFTTask
    from engine.text.records import read_records
    from engine.text.tokenizer import load_tokenizer
    from engine.train.batching import format_groups, group_by_format
    from engine.train.launch import build_model
    from engine.train.trainer import TrainConfig, Trainer

    records = read_records(str(tmp_path / "f.json"))
    task = SFTTask(SFTData(records, load_tokenizer(str(models["student"][0])), 256, "none"), dist1.device)
    line = group_by_format(task, format_groups(records, "zs_cot,icl_answer", "f.json"))
    assert line == "one data format per batch: icl_answer 14, zs_cot 14 examples (28 of other formats left out)"
    model, _ = build_model(str(models["student"][0]), None, -1, None, 0.0, "wq", torch.float32, dist1)
    trainer = Trainer(model, task, TrainConfig(save_dir=str(tmp_path / "t"), max_batch_size=4, max_steps=1,
                                               progress=False, plot=False), dist1)
    for epoch in (0, 1):
        batches = trainer._epoch_batches(epoch)
        assert len(batches) == 8 and all(len({records[p]["format"] for p in b}) == 1 for b in batches)
        assert {p for b in batches for p in b} == {p for p, r in enumerate(records)
                                                   if r["format"] in ("zs_cot", "icl_answer")}


# ----- bad input ---------------------------------------------------------------------------------
def test_bad_teacher_input(env, other_file, tmp_path, dist1):
    root, models = env
    good = str(root / "arith" / "train.json")
    base = {**BASE, "train_file": good, "ckpt_dir": str(models["student"][0]), "save_dir": str(tmp_path / "s"),
            "max_steps": 1}

    def err(**kw):
        with pytest.raises(UserError) as e:
            train.main(**{**base, **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "exactly one teacher" in err()
    assert "exactly one teacher" in err(teacher_file=str(other_file), teacher_ckpt_dir=str(models["same"][0]))
    assert "--kl_weight must be in [0, 1]" in err(teacher_file=str(other_file), kl_weight=1.5)
    assert "--kl_temperature must be > 0" in err(teacher_file=str(other_file), kl_temperature=0.0)
    assert "needs an online teacher" in err(teacher_file=str(other_file), teacher_top_k=0)
    assert "needs a teacher with the student's tokenizer" in err(teacher_ckpt_dir=str(models["other"][0]),
                                                                 teacher_top_k=0)
    msg = err(teacher_file=str(other_file), teacher_top_k=8)
    assert msg.startswith(f"--teacher_file {other_file} holds the teacher's top 5 tokens per position but "
                          f"--teacher_top_k asks for 8"), msg
    assert "--same_tokenizer True, but the vocabulary of --teacher_file" in err(teacher_file=str(other_file),
                                                                              same_tokenizer=True)
    assert "--same_tokenizer True, but the tokenizer of --teacher_ckpt_dir" in err(
        teacher_ckpt_dir=str(models["other"][0]), same_tokenizer=True)
    # a file of another training file: fewer records, another text
    records = json.load(open(good))
    (tmp_path / "short.json").write_text(json.dumps(records[:-1]))
    msg = err(teacher_file=str(other_file), train_file=str(tmp_path / "short.json"))
    assert msg == (f"--teacher_file {other_file} holds 14 records but --train_file {tmp_path / 'short.json'} has 13; "
                   f"score this training file with `infer.py score --top_k K`")
    changed = [dict(r) for r in records]
    changed[5]["output"] = changed[5]["output"].replace("Therefore, the answer", "So the answer")
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    assert f"--teacher_file {other_file} record 5 spells" in err(teacher_file=str(other_file),
                                                                train_file=str(tmp_path / "changed.json"))
    infer.score(ckpt_dir=str(models["same"][0]), data_file=good, output_file=str(tmp_path / "same.jsonl"), top_k=5,
                template="none")
    msg = err(teacher_file=str(tmp_path / "same.jsonl"), train_file=str(tmp_path / "changed.json"))
    assert msg.startswith(f"--teacher_file {tmp_path / 'same.jsonl'} record 5 holds ") and "tokens but" in msg, msg
    shutil.copy(good, tmp_path / "no-meta.jsonl")
    assert "has no no-meta.jsonl.meta.json beside it" in err(teacher_file=str(tmp_path / "no-meta.jsonl"))
    assert "does not exist" in err(teacher_file=str(tmp_path / "absent.jsonl"))
    # data formats
    assert err(formats="zs_cot,bogus") == "--formats 'bogus' is not one of icl_answer, icl_cot, zs_answer, zs_cot"
    assert "needs records with a 'format'" in err(formats="zs_cot", teacher_file=str(other_file))


def test_every_field_of_a_teacher_file_is_checked(env, other_file, tmp_path, dist1):
    """Each corruption of a top-k file or its .meta.json is one sentence naming the file, the line or
    record, and the field (issue 23.4): before, these were tracebacks, and NaN log-probabilities were
    accepted (the run silently became plain cross-entropy)."""
    root, models = env
    base = {**BASE, "train_file": str(root / "arith" / "train.json"), "ckpt_dir": str(models["student"][0]),
            "save_dir": str(tmp_path / "s"), "max_steps": 1}
    lines = [json.loads(x) for x in open(other_file)]
    meta = json.load(open(str(other_file) + ".meta.json"))

    def err(lines=lines, meta=meta, raw=None, name="t.jsonl"):
        path = tmp_path / name
        path.write_bytes(raw if raw is not None else "".join(json.dumps(x) + "\n" for x in lines).encode())
        (tmp_path / (name + ".meta.json")).write_text(json.dumps(meta))
        with pytest.raises(UserError) as e:
            train.main(**{**base, "teacher_file": str(path)})
        assert "\n" not in str(e.value)
        return str(e.value).replace(str(path), "FILE")

    def changed(record, key, value):
        out = [dict(x) for x in lines]
        out[record][key] = value
        return out

    good = "".join(json.dumps(x) + "\n" for x in lines).encode()
    assert err(raw=b"\xff" + good) == "--teacher_file FILE line 1 is not UTF-8 text (byte 0)"
    assert err(raw=b"[1, 2]\n" + good) == "--teacher_file FILE line 1 is not a JSON object but list"
    ids = lines[2]["topk_ids"]
    floats = [[v + 0.5 for v in row] for row in ids]
    assert err(lines=changed(2, "topk_ids", floats)) == ("--teacher_file FILE record 2 output 0: 'topk_ids' must hold "
                                                         "whole-number token ids, got float64 values")
    strings = [[str(v) for v in row] for row in ids]
    assert "'topk_ids' must hold whole-number token ids" in err(lines=changed(2, "topk_ids", strings))
    big = [[10 ** 6] + row[1:] for row in ids]
    assert err(lines=changed(2, "topk_ids", big)).startswith(
        "--teacher_file FILE record 2 output 0: 'topk_ids' holds token id 1000000, outside the teacher's vocabulary")
    ragged = [ids[0], ids[1][:2]] + ids[2:]
    assert err(lines=changed(2, "topk_ids", ragged)) == ("--teacher_file FILE record 2 output 0: 'topk_ids' is not a "
                                                         "rectangular list of numbers")
    assert "'tokens' holds token id -1" in err(lines=changed(3, "tokens", [-1] + lines[3]["tokens"][1:]))
    nan = [[float("nan")] * len(row) for row in lines[4]["topk_logprobs"]]
    assert err(lines=changed(4, "topk_logprobs", nan)) == ("--teacher_file FILE record 4 output 0: 'topk_logprobs' "
                                                           "holds a value that is not finite (NaN or infinity)")
    positive = [[0.5] + row[1:] for row in lines[4]["topk_logprobs"]]
    assert "'topk_logprobs' holds 0.5, but log-probabilities are <= 0" in err(
        lines=changed(4, "topk_logprobs", positive))
    assert "record 1 output 0: topk_ids/topk_logprobs must be [30 tokens x >= 5], got [] / [30, 5]" in err(
        lines=changed(1, "topk_ids", 7))
    # the .meta.json
    assert err(meta={k: v for k, v in meta.items() if k != "top_k"}).endswith(
        ".meta.json: 'top_k' must be a whole number >= 1, got None")
    assert "'top_k' must be a whole number >= 1, got '5'" in err(meta={**meta, "top_k": "5"})
    assert "'vocab' must be an object whose 'texts' is a list" in err(meta={k: v for k, v in meta.items()
                                                                            if k != "vocab"})
    assert "'vocab' must be an object whose 'texts' is a list" in err(meta={**meta, "vocab": {"texts": [1, 2]}})
    assert "'vocab.eos_id' must be a token id below" in err(meta={**meta, "vocab": {**meta["vocab"], "eos_id": "2"}})
    assert "'include_eos' must be true or false" in err(meta={**meta, "include_eos": "yes"})
    (tmp_path / "bin.jsonl").write_bytes(good)
    (tmp_path / "bin.jsonl.meta.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match="bin.jsonl.meta.json is not readable JSON"):
        train.main(**{**base, "teacher_file": str(tmp_path / "bin.jsonl")})


# ----- end to end --------------------------------------------------------------------------------
@pytest.mark.processes
def test_teacher_file_to_a_smaller_student_with_another_tokenizer(tmp_path, tiny_tokenizer, dist1):
    """A teacher (small-llama) trained here writes its top-5 file with infer.py under torchrun (TP=2);
    a smaller student (tiny-llama) with another tokenizer distils from it through train.py under
    torchrun (TP=2) and is evaluated."""
    make_arith(str(tmp_path / "data"), n_train=300, n_test=20, min_value=10, style="fixed", seed=2)
    teacher_tok = train_tokenizer(str(tmp_path / "teacher.model"), default_corpus(500, seed=1), vocab_size=400,
                                  split_digits=False)
    cks.init("small-llama", str(tmp_path / "t-init"), tokenizer=teacher_tok, seed=0)
    train.main(task="ARITH", template="none", max_seq_len=64, lr=3e-3, max_steps=60, warmup_steps=10,
               max_batch_size=16, train_file=str(tmp_path / "data" / "train.json"), ckpt_dir=str(tmp_path / "t-init"),
               save_dir=str(tmp_path / "teacher"))
    cks.split(str(tmp_path / "teacher" / "checkpoint-60"), str(tmp_path / "teacher-tp2"), n=2)
    torchrun("infer.py", "score", "--ckpt_dir", str(tmp_path / "teacher-tp2"), "--data_file",
             str(tmp_path / "data" / "train.json"), "--output_file", str(tmp_path / "teacher.topk.jsonl"),
             "--top_k", "5", "--template", "none")
    cks.init("tiny-llama", str(tmp_path / "student"), n=2, tokenizer=tiny_tokenizer, seed=1)
    proc = torchrun("train.py", "--objective", "teacher_kl", "--teacher_file", str(tmp_path / "teacher.topk.jsonl"),
                    "--task", "ARITH", "--ckpt_dir", str(tmp_path / "student"), "--save_dir", str(tmp_path / "run"),
                    "--train_file", str(tmp_path / "data" / "train.json"), "--label_file",
                    str(tmp_path / "data" / "test.json"), "--max_batch_size", "16", "--max_steps", "12", "--lr", "5e-3",
                    "--template", "none", "--max_seq_len", "64", "--max_new_tokens", "40", "--kl_weight", "1.0")
    assert "another tokenizer (DTW-aligned), top 5 renormalised" in proc.stdout
    lines = metrics(tmp_path / "run")
    assert len(lines) == 12 and lines[-1]["loss_kl"] < lines[0]["loss_kl"] and lines[0]["loss_kl"] > 0
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"eval"' in line]
    assert evals and evals[-1]["total"] == 20
