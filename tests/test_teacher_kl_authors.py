"""The authors' variants of train.py --objective teacher_kl and data/make_formats.py (Fu et al. 2023,
FranxYao/FlanT5-CoT-Specialization @a8ffd51), each compared with the authors' computation written out
in tests/fu_reference.py (their file:line there and below), on inputs where it differs from ours:

  --alignment authors      the notebook's worked examples (28 of 51 copied, ours 27) and hand cases
  --teacher_probs raw,     the notebook example's stored top-k through the teacher file, and the loss
  --eos_target one_hot     of a training step
  --kl_formats, --loss_reduction micro_batch_mean
                           the first step's loss and gradient norm at TP=1 and TP=2 (torchrun)
  make_formats --style authors, --demo_file
                           the records the authors' process_data_format writes
plus the online teacher equal to its file under the authors' flags (TP=1 and TP=2), the KL core's
additions at TP=1 and TP=2, and every bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch

import infer
import train
from data.arithmetic import main as make_arith
from engine.distill.teacher_kl.alignment import (
    authors_alignment,
    dtw_align,
    one_to_one,
)
from engine.runtime.errors import UserError
from engine.text.vocab import Vocab
from tests import fu_reference as R
from tests.helpers import assert_same_run, teacher_and_students, torchrun, train_args

EXAMPLES = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                       "fu_notebook_examples.json")))
SP = R.SP
AUTHORS = {"kl_formats": "zs_cot", "loss_reduction": "micro_batch_mean", "teacher_probs": "raw",
           "eos_target": "one_hot"}
TYPES = {"zs_cot": "zero_shot_chain_of_thought", "zs_answer": "zero_shot_answer_only",
         "icl_cot": "in_context_chain_of_thought", "icl_answer": "in_context_answer_only"}


def decoded(pieces):
    return [p.replace(SP, " ") for p in pieces]


def ours(student, teacher):
    """Our rule (the default): one_to_one over dtw_align with the character band, as aligned_positions."""
    return one_to_one(student, teacher, dtw_align(student, teacher, 0))


# ----- point 10: the alignment -------------------------------------------------------------------
def test_authors_alignment_on_the_notebook_examples():
    """nb-dtw In[29]-In[37] (codex_predictions[1][0], 'Weng earns $12 ...'): the reference reproduces
    the flan -> codex mapping the notebook printed (nb-dtw:1001-1051); --alignment authors copies the
    teacher at the same 28 of 51 student tokens, ours at 27 (student 'at' is left out: teacher 'at' is
    also matched with student 's'). GSM8K #0 (nb-dtw In[39]): the stored one-hot rows."""
    ex = EXAMPLES["ex1"]
    flan, codex = ex["flan_tokens"], ex["codex_tokens"]
    ref, flan2codex = R.alignment(codex, flan)
    printed = [f"{f!r} | " + "".join(f"{codex[j]!r} " for j in js) for f, js in zip(flan, flan2codex)]
    assert printed == ex["printed_mapping"]
    theirs = authors_alignment(decoded(flan), codex)
    assert theirs == ref and sum(j >= 0 for j in theirs) == 28
    mine = ours(decoded(flan), codex)
    assert sum(j >= 0 for j in mine) == 27
    assert [i for i in range(len(flan)) if (mine[i] >= 0) != (theirs[i] >= 0)] == [17] and flan[17] == "at"
    ex0 = EXAMPLES["ex0"]
    codex0 = ex0["codex_per_step_tokens_all"][2:-2]  # nb-dtw:1421: the body between ' step' '\n' and the newlines
    copied = [j >= 0 for j in authors_alignment(decoded(ex0["flan_tokens"]), codex0)]
    assert copied == ex0["copied"] == [j >= 0 for j in R.alignment(codex0, ex0["flan_tokens"])[0]]


@pytest.mark.parametrize("name,teacher,student,differs", [
    # ties: the authors' backtrack prefers a teacher step to a student step (src/utils.py:675, np.argmin)
    ("tie order", ["aa", " ab", "aa", " ab"], ["aa", "aa", "b", "ab"], True),
    ("tie order (issue)", ["a", "bab", "a"], ["ab", "a", "ba"], True),
    # the diagonal first (ours too)
    ("diagonal first", ["aa", " ab", "ba"], ["aa", "aa", "b"], False),
    # the cost ignores spaces (nb-dtw:505-506)
    ("spaces", ["aa", "bab", "ba", " ab"], ["a", " b", " ab", "ab"], True),
    # one-sided copy rule (nb-dtw:1427-1433): teacher 'bab' is also matched with student 'a'
    ("one-sided", ["bab", " ab", " b"], ["a", "bab", " a", " b"], True),
])
def test_authors_alignment_on_hand_cases(name, teacher, student, differs):
    ref = R.alignment_decoded(teacher, student)
    assert authors_alignment(student, teacher) == ref, name
    assert (ours(student, teacher) != ref) == differs, name


def test_authors_alignment_equals_the_reference_on_random_sequences():
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", "ab", " a", "ba", "aa", " b", "\n", "bab", " ab", "a\n"]
    for _ in range(400):
        t = [alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(1, 7))]
        s = [alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(1, 7))]
        assert authors_alignment(s, t) == R.alignment_decoded(t, s), (t, s)
    assert authors_alignment(["x", None], ["x", "y"]) == [0, -1]  # an unknown text never copies


# ----- points 9 + 10: the targets of the notebook example through a teacher file ------------------
class _Data:
    """What TeacherFile reads of the training data: records, the student's response ids, its EOS."""

    def __init__(self, text, response, eos_id):
        self.records = [{"instruction": "q", "output": text}]
        self._response = response
        self.tok = type("Tok", (), {"eos_id": eos_id})()
        self.keep = [0]

    def response(self, index, which):
        return self._response


def _notebook_teacher_file(tmp_path):
    """The notebook example as our file layout: the teacher's (Codex) tokens with their own and top-5
    probabilities (nb-dtw:972, as scripts/codex_decode_gsm8k.py:141-147 wrote them), a student
    vocabulary of the Flan pieces and every teacher text without a newline (the T5 vocabulary has none,
    nb-dtw In[39] drops '\\n'), EOS last on both sides."""
    from engine.infer.topk_file import FILE_KIND

    ex = EXAMPLES["ex1"]
    body = ex["codex_per_step_probs"][2:-2]  # nb-dtw:1421-1422
    t_texts = sorted({t for row in body for t, _ in row})
    teacher = Vocab([None] + t_texts, eos_id=0)
    t_id = {t: i + 1 for i, t in enumerate(t_texts)}
    s_texts = sorted(set(decoded(ex["flan_tokens"])) | {t for t in t_texts if "\n" not in t})
    student = Vocab([None, None, None] + s_texts, eos_id=2)
    s_id = {t: i + 3 for i, t in enumerate(s_texts)}
    lp = [[math.log(max(p, 1e-12)) for _, p in row] for row in body]
    line = {"tokens": [t_id[row[0][0]] for row in body] + [0],
            "topk_ids": [[t_id[t] for t, _ in row[1:6]] for row in body] + [[0, 1, 2, 3, 4]],
            "topk_logprobs": [r[1:6] for r in lp] + [[-0.1, -3, -4, -5, -6]],
            "token_logprobs": [r[0] for r in lp] + [-0.1]}
    path = tmp_path / "nb.topk.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (tmp_path / "nb.topk.jsonl.meta.json").write_text(json.dumps({"kind": FILE_KIND, "top_k": 5,
                                                                  "vocab": teacher.to_dict()}))
    response = [s_id[t] for t in decoded(ex["flan_tokens"])] + [2]
    return str(path), _Data(ex["text"], response, 2), student, s_id


def _dense(ids, probs, n):
    out = np.zeros((ids.shape[0], n))
    for r in range(ids.shape[0]):
        for i, p in zip(ids[r], probs[r]):
            if i >= 0:
                out[r, i] += p
    return out


def test_raw_targets_of_the_notebook_example(tmp_path):
    """--teacher_probs raw --eos_target one_hot --alignment authors: the student's targets equal the
    authors' transform_step_probs (nb-dtw:1404-1446: the sampled token first with its own
    probability, then the top 5, by text into the student vocabulary, not renormalised; one-hot
    elsewhere) and the EOS one-hot (src/data_utils.py:324-325); our defaults give other targets."""
    from engine.distill.teacher_kl.teachers import TargetRule, TeacherFile

    path, data, student, s_id = _notebook_teacher_file(tmp_path)
    ex = EXAMPLES["ex1"]
    psp = [[tuple(e) for e in row] for row in ex["codex_per_step_probs"]]
    code, rows = R.transform_step_probs(psp, ex["flan_tokens"], lambda piece: piece.replace(SP, " ") in s_id)
    assert code == 1 and len(rows) == 51
    expect = np.zeros((52, len(student)))
    for r, d in enumerate(rows):
        for piece, p in d.items():
            expect[r, s_id[piece.replace(SP, " ")]] = p
    expect[51, 2] = 1.0  # the EOS
    assert np.abs(expect.sum(axis=1) - 1).max() > 0.05  # copied rows whose mass is not 1: renormalising would show
    teacher = TeacherFile(path, data, student, 5, TargetRule(1.0, "raw", "one_hot", "authors"), None, "train.json")
    ids, probs = teacher.host_targets(0, 0)
    got = _dense(ids, probs, len(student))
    assert np.abs(got - expect).max() <= 1e-6, np.abs(got - expect).max(axis=1)
    assert sum(j >= 0 for j in teacher._matches[(0, 0)]) == 28
    default = TeacherFile(path, data, student, 5, TargetRule(), None, "train.json")
    ids, probs = default.host_targets(0, 0)
    assert np.abs(_dense(ids, probs, len(student)) - expect).max() > 0.05


def test_raw_targets_drop_duplicates_and_unmapped_tokens():
    """raw_targets: the own token first with its own probability, a repeated student id keeps its first
    probability, an id the student lacks is dropped, nothing renormalised; a row where nothing maps is
    one-hot on the student's token (targets_from_topk, nb-dtw:1434-1444)."""
    from engine.distill.teacher_kl.teachers import raw_targets

    id_map = torch.tensor([-1, 5, 6, 5, 7])  # teacher 1 and 3 spell the same student token
    t_ids = torch.tensor([[1, 2, 3, 0], [0, 0, 0, 0]])
    lp = torch.log(torch.tensor([[0.3, 0.5, 0.1, 0.05], [0.9, 0.01, 0.01, 0.01]]))
    ids, probs = raw_targets(t_ids, lp, id_map, torch.tensor([5, 9]))
    ref = R.targets_from_topk([1, 0], [math.log(0.3), math.log(0.9)], [[2, 3, 0], [0, 0, 0]],
                              np.log([[0.5, 0.1, 0.05], [0.01, 0.01, 0.01]]), [True, True], [5, 9],
                              teacher_to_student=id_map.numpy())
    assert ref[1] == {}  # the reference has no fallback: nothing maps (the authors' own token always does)
    assert {int(i): round(float(p), 6) for i, p in zip(ids[0], probs[0]) if i >= 0} == {5: 0.3, 6: 0.5}
    assert {k: round(v, 6) for k, v in ref[0].items()} == {5: 0.3, 6: 0.5}
    assert ids[1].tolist() == [9, -1, -1, -1] and probs[1].tolist() == [1, 0, 0, 0]


# ----- the KL core: what the authors' variants add ----------------------------------------------
@pytest.mark.processes
def test_kl_core_against_the_authors_formula_at_tp1_and_tp2(dist1, tmp_path):
    """The chunked KL against an unnormalised sparse target and against a dense teacher with one-hot
    rows (the EOS), and sharded_token_logprobs, at TP=1 and TP=2 (torchrun): the value of the authors'
    kl_divergence (src/utils.py:632-640, T=1) and its gradient."""
    from tests.kl_checks import authors_kl_inputs, authors_kl_results, token_ids

    one = authors_kl_results()
    torchrun("tests/workers/kl_worker.py", str(tmp_path / "tp2.pt"), "authors")
    two = torch.load(tmp_path / "tp2.pt")
    hidden, weight, t_hidden, t_weight, sparse_p, one_hot = authors_kl_inputs()
    dense_p = torch.softmax(t_hidden @ t_weight.t(), dim=-1)
    dense_p[one_hot >= 0] = 0.0
    dense_p[(one_hot >= 0).nonzero().flatten(), one_hot[one_hot >= 0]] = 1.0
    assert abs(float(sparse_p[0].sum()) - 0.7) < 1e-6  # unnormalised
    for name, p in (("raw", sparse_p), ("dense_one_hot", dense_p)):
        h, w = hidden.clone().double().requires_grad_(), weight.clone().double().requires_grad_()
        loss = R.kl_divergence(p.double(), torch.softmax(h @ w.t(), dim=-1)).sum()
        loss.backward()
        for results in (one, two):
            r = results[name]
            assert abs(r["loss"] - loss.item()) <= 1e-5 * abs(loss.item()), (name, r["loss"], loss.item())
            assert (r["grad_h"].double() - h.grad).abs().max() <= 1e-5
            assert (r["grad_w"].double() - w.grad).abs().max() <= 1e-5
    ref_lp = torch.log_softmax(t_hidden @ t_weight.t(), dim=-1)
    ids = token_ids(len(ref_lp), ref_lp.shape[1])
    assert (ids < ref_lp.shape[1] // 2).any() and (ids >= ref_lp.shape[1] // 2).any()
    for results in (one, two):
        assert (results["token_logprobs"] - ref_lp[torch.arange(len(ids)), ids]).abs().max() <= 1e-5


# ----- point 8: the loss of a training step, TP=1 and TP=2 ---------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_tokenizer):
    """A student (tiny-llama, 1 and 2 shards); teachers with its tokenizer (tiny-qwen2) and with
    another (tiny-llama3, numbers merged), 1 and 2 shards; a formats file (zs_answer, zs_cot) of 14
    arithmetic questions and both teachers' top-5 files over it."""
    from data.make_formats import main as make_formats

    root = tmp_path_factory.mktemp("fu")
    make_arith(str(root / "arith"), n_train=14, n_test=4, min_value=10, style="fixed", seed=1)
    make_formats(str(root / "arith" / "train.json"), str(root / "formats.json"), formats="zs_answer,zs_cot")
    models = teacher_and_students(root, tiny_tokenizer)
    files = {}
    for name in ("same", "other"):
        files[name] = root / f"{name}.topk.jsonl"
        infer.score(ckpt_dir=str(models[name][0]), data_file=str(root / "formats.json"), output_file=str(files[name]),
                    top_k=5, template="none")
    # the same file with the teacher's own tokens given real mass where they lie outside its top 5 (a
    # random teacher gives them ~1/256), as a token sampled at temperature 0.5 can in the authors' data
    lines = [json.loads(line) for line in open(files["same"])]
    for line in lines:
        line["token_logprobs"] = [lp if t in ids else math.log(0.2) for t, ids, lp in
                                  zip(line["tokens"], line["topk_ids"], line["token_logprobs"])]
    files["sampled"] = root / "sampled.topk.jsonl"
    files["sampled"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "sampled.topk.jsonl.meta.json").write_text(open(str(files["same"]) + ".meta.json").read())
    return root, models, files


STEP = {"task": "ARITH", "template": "none", "max_seq_len": 128, "lr": 1e-3, "max_batch_size": 4,
        "accumulation_steps": 8, "max_steps": 1, "objective": "teacher_kl", "max_grad_norm": 0.0}


def _authors_step(env, dist1, variant=None):
    """The first optimizer step's loss and gradient norm as the authors compute them
    (train_distill_simple.py:84-115): the trainer's 8 micro-batches (one format each: the whole epoch,
    14 questions x 2 formats in batches of 4), each with its own loss: zs_cot batches KL alone against
    the raw targets (the teacher's own token, then its top 5, not renormalised) and EOS one-hot,
    zs_answer batches NLL alone, each a token mean, divided by grad_accum_steps = 8 and summed.
    variant: a way of computing it otherwise (ours on that point), to show that it matters here."""
    from engine.distill.sft import SFTData, SFTTask
    from engine.text.records import read_records
    from engine.text.sequences import pad_batch
    from engine.text.tokenizer import load_tokenizer
    from engine.train.batching import (
        format_groups,
        group_by_format,
        grouped_epoch_batches,
    )
    from engine.train.launch import build_model

    root, models, files = env
    records = read_records(str(root / "formats.json"))
    tok = load_tokenizer(str(models["student"][0]))
    data = SFTData(records, tok, 128, "none")
    task = SFTTask(data, dist1.device)
    group_by_format(task, format_groups(records, None, "formats.json"))
    batches = grouped_epoch_batches(task.lengths(0), task.groups, 4, 0, 0)
    assert len(batches) == 8
    lines = [json.loads(line) for line in open(files["sampled"])]
    model, _ = build_model(str(models["student"][0]), None, -1, None, 0.0, "wq", torch.float32, dist1)
    micro, sizes = [], []
    for b in batches:
        index = [data.keep[p] for p in b]
        x, y = pad_batch([data.example(i, 0) for i in index], tok.padding_id)
        logits = model(x)
        fmt = records[index[0]]["format"]
        target = None
        if fmt == "zs_cot":
            steps = []
            for i in index:
                line = lines[i]
                n = len(line["tokens"]) - 1  # the EOS row: one-hot EOS (data_utils.py:324-325)
                topk_ids, topk_lp = np.array(line["topk_ids"])[:n], np.array(line["topk_logprobs"])[:n]
                own_ids, own_lp = line["tokens"][:n], line["token_logprobs"][:n]
                if variant == "no own token":  # the top 1 in its place: dropped as a duplicate
                    own_ids, own_lp = topk_ids[:, 0], topk_lp[:, 0]
                d = R.targets_from_topk(own_ids, own_lp, topk_ids, topk_lp, [True] * n, line["tokens"][:n])
                if variant == "renormalised":
                    d = [{k: v / sum(r.values()) for k, v in r.items()} for r in d]
                steps.append(d)
            target = R.target_dist_decoder(steps, y, logits.shape[-1], tok.eos_id).float()
            if variant == "teacher eos":  # the EOS row gets the teacher's distribution as elsewhere
                for r, i in enumerate(index):
                    line = lines[i]
                    e = (y[r] != -100).nonzero().flatten()[-1]
                    target[r, e] = 0.0
                    for tid, lp in [(line["tokens"][-1], line["token_logprobs"][-1])] + list(
                            zip(line["topk_ids"][-1], line["topk_logprobs"][-1])):
                        if target[r, e, tid] == 0:
                            target[r, e, tid] = math.exp(lp)
        loss = R.micro_batch_loss(logits, y, TYPES[fmt], "match_distribution", target, grad_accum_steps=8)
        if variant == "mixture" and target is not None:  # ours: (1 - w) CE + w KL on a CoT batch too
            loss = 0.5 * loss + 0.5 * R.micro_batch_loss(logits, y, TYPES[fmt], "match_sample", grad_accum_steps=8)
        micro.append(loss)
        sizes.append(int((y != -100).sum()))
    if variant == "step token mean":  # every token of the step weighs the same
        total = sum(m * 8 * n for m, n in zip(micro, sizes)) / sum(sizes)
    else:
        total = sum(micro)  # train_distill_simple.py:104-115
    if variant is not None:
        return float(total.detach()), None
    total.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    return float(total.detach()), norm


@pytest.mark.processes
def test_the_step_equals_the_authors_loss_at_tp1_and_tp2(env, dist1):
    """--kl_formats zs_cot --loss_reduction micro_batch_mean --teacher_probs raw --eos_target one_hot:
    the first step's loss and gradient norm are the authors' (_authors_step) at TP=1 and TP=2; each
    point of the authors' computation computed our way instead gives another loss on these inputs."""
    root, models, files = env
    ref_loss, ref_norm = _authors_step(env, dist1)
    for variant in ("renormalised", "no own token", "teacher eos", "step token mean", "mixture"):
        other, _ = _authors_step(env, dist1, variant)
        assert abs(other - ref_loss) > 1e-3 * ref_loss, f"{variant}: {other} vs {ref_loss}"
    got = {}
    for tp in (1, 2):
        args = {**STEP, **AUTHORS, "train_file": root / "formats.json", "teacher_file": files["sampled"],
                "ckpt_dir": models["student"][tp - 1], "save_dir": root / f"step-tp{tp}"}
        if tp == 1:
            train.main(**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in args.items()})
        else:
            torchrun("train.py", *train_args(args))
        line = json.loads(open(root / f"step-tp{tp}" / "metrics.jsonl").readline())
        got[tp] = line
        assert abs(line["loss"] - ref_loss) <= 1e-5 * ref_loss, (tp, line["loss"], ref_loss)
        assert abs(line["grad_norm"] - ref_norm) <= 1e-4 * ref_norm, (tp, line["grad_norm"], ref_norm)
        assert abs(line["loss"] - line["loss_ce"] - line["loss_kl"]) <= 1e-6 and line["loss_ce"] > 0 < line["loss_kl"]
    print(f"authors' step: loss {ref_loss:.6f}, grad norm {ref_norm:.6f}; TP=1 {got[1]['loss']:.6f} / "
          f"{got[1]['grad_norm']:.6f}, TP=2 {got[2]['loss']:.6f} / {got[2]['grad_norm']:.6f}")


@pytest.mark.parametrize("teacher", ["same", "other"])
def test_online_teacher_equals_its_file_under_the_authors_flags(env, dist1, teacher):
    """The same teacher run in the job or read from its top-5 file trains the same student under every
    authors' flag (the online teacher computes its own token's log-probability and the raw targets on
    the device); with another tokenizer under --alignment authors too."""
    root, models, files = env
    base = {**STEP, **AUTHORS, "max_steps": 3, "save_every": 3, "accumulation_steps": 2,
            "train_file": str(root / "formats.json"), "ckpt_dir": str(models["student"][0]), "teacher_top_k": 5}
    if teacher == "other":
        base["alignment"] = "authors"
    train.main(**base, teacher_ckpt_dir=str(models[teacher][0]), save_dir=str(root / f"online-{teacher}"))
    train.main(**base, teacher_file=str(files[teacher]), save_dir=str(root / f"offline-{teacher}"))
    assert_same_run(str(root / f"online-{teacher}"), str(root / f"offline-{teacher}"))


@pytest.mark.processes
def test_online_teacher_under_the_authors_flags_tp2_equals_tp1(env, dist1):
    """An online teacher of another tokenizer, every authors' flag, --alignment authors: TP=2 == TP=1."""
    root, models, files = env
    runs = {}
    for tp in (1, 2):
        args = {**STEP, **AUTHORS, "alignment": "authors", "max_steps": 3, "save_every": 3, "accumulation_steps": 2,
                "teacher_top_k": 5, "train_file": root / "formats.json", "ckpt_dir": models["student"][tp - 1],
                "teacher_ckpt_dir": models["other"][tp - 1], "save_dir": root / f"online-authors-tp{tp}"}
        if tp == 1:
            train.main(**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in args.items()})
        else:
            proc = torchrun("train.py", *train_args(args))
            assert "the authors' rule" in proc.stdout and "KL alone on zs_cot batches" in proc.stdout
        runs[tp] = str(args["save_dir"])
    assert_same_run(runs[1], runs[2])


def test_dense_online_teacher_learns_eos_one_hot(env, dist1):
    """The full distribution of a same-tokenizer teacher (--teacher_top_k 0) with --eos_target one_hot:
    the KL at the first step equals the authors' KL against that distribution with the EOS rows one-hot."""
    from engine.distill.sft import SFTData
    from engine.text.records import read_records
    from engine.text.sequences import pad_batch
    from engine.text.tokenizer import load_tokenizer
    from engine.train.launch import build_model

    root, models, _ = env
    records = [r for r in read_records(str(root / "formats.json")) if r["format"] == "zs_cot"][:4]
    (root / "cot4.json").write_text(json.dumps(records))
    args = {**STEP, "accumulation_steps": 1, "train_file": str(root / "cot4.json"), "kl_formats": "zs_cot",
            "eos_target": "one_hot", "ckpt_dir": str(models["student"][0]), "teacher_ckpt_dir": str(models["same"][0])}
    tok = load_tokenizer(str(models["student"][0]))
    data = SFTData(records, tok, 128, "none")
    x, y = pad_batch([data.example(i, 0) for i in range(4)], tok.padding_id)
    student, _ = build_model(str(models["student"][0]), None, -1, None, 0.0, "wq", torch.float32, dist1)
    teacher, _ = build_model(str(models["same"][0]), None, -1, None, 0.0, "wq", torch.float32, dist1)
    with torch.no_grad():
        p = torch.softmax(teacher(x), dim=-1)
        eos = y == tok.eos_id
        p[eos] = 0.0
        p[eos, tok.eos_id] = 1.0
        ref = float(R.loss_match_dist(student(x), p, y))
        teacher_eos = float(R.loss_match_dist(student(x), torch.softmax(teacher(x), dim=-1), y))
    assert abs(ref - teacher_eos) > 1e-3 * ref
    train.main(**args, save_dir=str(root / "dense-eos"))
    line = json.loads(open(root / "dense-eos" / "metrics.jsonl").readline())
    assert abs(line["loss_kl"] - ref) <= 1e-5 * ref, (line["loss_kl"], ref)


# ----- point 11: the formats ---------------------------------------------------------------------
GSM8K_TRAIN = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
               {"question": "What is 4 times 2?", "answer": "4*2=<<4*2=8>>8 in all.\n#### 8"},
               {"question": "Ann reads 10 pages a day. Pages in 3 days?", "answer": "10*3=<<10*3=30>>30\n#### 30"},
               {"question": "A box holds 6 eggs. Eggs in 2 boxes?", "answer": "6*2=<<6*2=12>>12\n#### 12"},
               {"question": "Sam had 9 and gave 4 away. Left?", "answer": "9-4=<<9-4=5>>5 left.\n#### 5"}]
RECORDS = [{"instruction": "Mia has 3 cats and gets 4 more. How many cats?", "label": "7",
            "output": ["3 + 4 = 8.\nThe answer is 8", "She has 3 + 4 = 7 cats.\nThe answer is 7 cats.", "3 + 4 = 7.\nThe answer is 7"]},
           {"instruction": "What is 5 times 5?", "label": "25", "output": ["5 * 5 = 20.\nThe answer is 20"]},
           {"instruction": "Lee walks 2 miles a day for 6 days. Miles?", "label": "12",
            "output": ["2 * 6 = 12 miles.\nThe answer is 12", "2 * 6 = 12.\nThe answer is 12"]}]


def test_authors_formats_equal_the_reference(tmp_path):
    """--style authors --demo_file: the records the authors' process_data_format writes
    (src/data_utils.py:481-563, tests/fu_reference.build_formats) for each question, same prompts and
    targets; the demonstrations are 4 distinct GSM8K gold examples in their layout (data_utils.py:247-266,
    calculator annotations removed), drawn for every example (theirs unseeded, ours seeded)."""
    from data.make_formats import main as make_formats

    (tmp_path / "in.json").write_text(json.dumps(RECORDS))
    (tmp_path / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TRAIN))
    make_formats(str(tmp_path / "in.json"), str(tmp_path / "f.json"), style="authors",
                 demo_file=str(tmp_path / "gsm8k_train.jsonl"), task="GSM8K")
    out = json.load(open(tmp_path / "f.json"))
    demos = {fmt: {R.sample_in_context_example([ex], 1, fmt == "icl_cot", np.random.RandomState(0))
                   for ex in GSM8K_TRAIN} for fmt in ("icl_cot", "icl_answer")}
    assert all("<<" not in d for d in demos["icl_cot"])
    for q, rec in enumerate(RECORDS):
        preds = [f"Model output {j}: \n{o}\n" for j, o in enumerate(rec["output"])]
        labels = [int(o.split("The answer is ")[-1].split()[0].rstrip(".") == rec["label"]) for o in rec["output"]]
        ref = R.build_formats(f"Question {q}: {rec['instruction']}", preds, labels, "", GSM8K_TRAIN, 4,
                              np.random.RandomState(0))
        for fmt, name in TYPES.items():
            mine = [r for r in out if r["question"] == q and r["format"] == fmt]
            assert len(mine) == len(ref[name]), (q, fmt, len(mine), len(ref[name]))
            for m, r in zip(mine, ref[name]):
                assert m["output"] == r["answer"]
                if fmt.startswith("icl"):
                    cut = r["question"].rindex("Q: ")
                    assert m["instruction"].endswith(r["question"][cut:])
                    head = m["instruction"][:len(m["instruction"]) - len(r["question"]) + cut]
                    shown = [d for d in demos[fmt] if d in head]
                    assert len(shown) == 4 and sum(len(d) for d in shown) == len(head), head
                else:
                    assert m["instruction"] == r["question"]
    assert [r["output"] for r in out if r["format"] == "zs_answer"] == ["The answer is 7 cats.", "The answer is 12"]
    counts = {f: sum(r["format"] == f for r in out) for f in TYPES}
    assert counts == {"zs_cot": 4, "zs_answer": 2, "icl_cot": 4, "icl_answer": 2}  # question 1 has no correct output
    cots = [r for r in out if r["format"] == "icl_cot"]
    assert len({r["instruction"] for r in cots}) == len(cots)  # demonstrations drawn per example


def test_demo_file_in_our_style_and_records_without_output(tmp_path):
    """--demo_file also gives our layout its demonstrations; a record without 'output' is one sentence
    naming the file and the record (it was a raw KeyError), and answer-only formats need no output."""
    from data.make_formats import main as make_formats
    from engine.runtime.errors import DataError

    (tmp_path / "in.json").write_text(json.dumps(RECORDS))
    (tmp_path / "demos.json").write_text(json.dumps(GSM8K_TRAIN))
    make_formats(str(tmp_path / "in.json"), str(tmp_path / "f.json"), formats="icl_cot",
                 demo_file=str(tmp_path / "demos.json"), num_demos=2)
    out = json.load(open(tmp_path / "f.json"))
    assert len(out) == 3 and out[0]["output"] == RECORDS[0]["output"]
    head = out[0]["instruction"].split("\n\n")
    assert len(head) == 3 and head[-1] == f"Question: {RECORDS[0]['instruction']}\nLet's think step by step"
    assert all(d.startswith("Question: ") and "<<" not in d and "\nThe answer is " in d for d in head[:2])
    bare = [{"instruction": r["instruction"], "label": r["label"]} for r in RECORDS]
    bare[1]["output"] = "x"
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    for kw in ({"formats": "zs_cot"}, {"num_demos": 2}, {"style": "authors", "formats": "zs_answer"}):
        with pytest.raises(DataError) as e:
            make_formats(str(tmp_path / "bare.json"), str(tmp_path / "g.json"), overwrite=True, **kw)
        assert str(e.value) == f"{tmp_path / 'bare.json'} record 0 lacks the key 'output'", str(e.value)
    make_formats(str(tmp_path / "bare.json"), str(tmp_path / "g.json"), formats="zs_answer,icl_answer", num_demos=2)
    assert len(json.load(open(tmp_path / "g.json"))) == 6
    bad = [dict(GSM8K_TRAIN[0]), {"question": "q", "answer": "no final answer"}]
    (tmp_path / "bad_demos.json").write_text(json.dumps(bad))
    with pytest.raises(DataError) as e:
        make_formats(str(tmp_path / "in.json"), str(tmp_path / "h.json"), formats="icl_cot", num_demos=1,
                     demo_file=str(tmp_path / "bad_demos.json"))
    assert str(e.value) == (f"--demo_file {tmp_path / 'bad_demos.json'} record 1: 'answer' has no '#### N' final "
                            f"answer (GSM8K's gold layout)")
    with pytest.raises(DataError) as e:
        make_formats(str(tmp_path / "in.json"), str(tmp_path / "h.json"), style="authors", formats="icl_cot")
    assert "--style authors draws the demonstrations of icl_cot from GSM8K's gold train solutions" in str(e.value)
    with pytest.raises(DataError) as e:
        make_formats(str(tmp_path / "in.json"), str(tmp_path / "h.json"), style="theirs")
    assert str(e.value) == "--style 'theirs' is not one of ours, authors"


@pytest.mark.processes
def test_make_formats_cli_style_authors(tmp_path):
    """The flags through the command line, and its one-sentence error."""
    from tests.helpers import run_cli

    (tmp_path / "in.json").write_text(json.dumps(RECORDS))
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TRAIN))
    proc = run_cli("data/make_formats.py", "--input_file", str(tmp_path / "in.json"), "--output_file",
                   str(tmp_path / "f.json"), "--style", "authors", "--demo_file", str(tmp_path / "demos.jsonl"),
                   "--task", "GSM8K", "--formats", "zs_answer,icl_cot")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["formats"] == {"zs_answer": 2, "icl_cot": 4}
    proc = run_cli("data/make_formats.py", "--input_file", str(tmp_path / "in.json"), "--output_file",
                   str(tmp_path / "g.json"), "--demo_file", str(tmp_path / "absent.jsonl"))
    assert proc.returncode != 0 and f"--demo_file {tmp_path / 'absent.jsonl'} does not exist" in proc.stderr


# ----- bad input ---------------------------------------------------------------------------------
def test_bad_authors_flags(env, dist1, tmp_path):
    root, models, files = env
    base = {**STEP, "train_file": str(root / "formats.json"), "ckpt_dir": str(models["student"][0]),
            "save_dir": str(tmp_path / "s"), "teacher_file": str(files["same"])}

    def err(**kw):
        with pytest.raises(UserError) as e:
            train.main(**{**base, **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert err(kl_formats="zs_cot", kl_weight=0.5).startswith("--kl_formats zs_cot trains each batch on the KL alone")
    assert err(kl_formats="zs_cot,bogus") == "--kl_formats 'bogus' is not one of icl_answer, icl_cot, zs_answer, zs_cot"
    assert err(kl_formats="") == "--kl_formats is empty; name the formats whose batches train on the KL (e.g. icl_cot,zs_cot)"
    assert "--kl_formats icl_cot names no format this run trains on" in err(kl_formats="icl_cot")
    assert "--kl_formats zs_cot names no format this run trains on (zs_answer)" in err(kl_formats="zs_cot",
                                                                                      formats="zs_answer")
    assert err(loss_reduction="sum") == "--loss_reduction 'sum' is not one of step_token_mean, micro_batch_mean"
    assert err(teacher_probs="exp") == "--teacher_probs 'exp' is not one of renormalised, raw"
    assert err(eos_target="none") == "--eos_target 'none' is not one of teacher, one_hot"
    assert err(alignment="simpledtw") == "--alignment 'simpledtw' is not one of ours, authors"
    assert "pass --kl_temperature 1, not 2.0" in err(teacher_probs="raw", kl_temperature=2.0)
    # --kl_formats needs the records' formats
    plain = json.load(open(root / "arith" / "train.json"))
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    assert "record 0 has no 'format'" in err(kl_formats="zs_cot", train_file=str(tmp_path / "plain.json"))
    # --teacher_probs raw needs the teacher's own log-probabilities: a file of an older infer.py lacks them
    lines = [json.loads(line) for line in open(files["same"])]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps({k: v for k, v in x.items() if k != "token_logprobs"})
                                                + "\n" for x in lines))
    (tmp_path / "old.jsonl.meta.json").write_text(open(str(files["same"]) + ".meta.json").read())
    msg = err(teacher_probs="raw", teacher_file=str(tmp_path / "old.jsonl"))
    assert msg == (f"--teacher_probs raw adds the teacher's own token with its own probability, but --teacher_file "
                   f"{tmp_path / 'old.jsonl'} record 0 has no token_logprobs; rewrite the file with "
                   f"`infer.py score --top_k K`")
