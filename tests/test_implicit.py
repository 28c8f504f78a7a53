"""Implicit chain of thought (train_implicit.py): the line format and the multiplication generator,
the CoT diagonal and the state injection against hand computations, every stage at TP=2 against
TP=1 through the CLI (teacher, student and emulator of different families, depths and widths),
exact resume of the coupled stage, and one-sentence errors for bad input."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import train_implicit
from data.multiplication import main as make_mult, make_splits, multiplication_line, operands
from engine import checkpoint as ck
from engine.distill.implicit.data import CoTExamples, CoTLine, read_cot_lines
from engine.distill.implicit.states import StateMaps, diagonal_positions, inject_hook, parse_layers, same_depth
from engine.distill.implicit.tasks import MindReadTask, teacher_states
from engine.runtime.errors import UserError
from engine.text.sequences import IGNORE
from engine.text.tokenizer import load_tokenizer
from models.args import ModelArgs
from models.registry import model_args_for
from tests.conftest import shared_path
from tests.helpers import full_weights, losses, run_cli, torchrun, train_args

SEED_EXAMPLE = ("9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) + "
                "0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")


# ----- data ----------------------------------------------------------------------------------------
def test_lines_are_read_and_bad_ones_named(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("1 2 * 3 4||3 6 + 0 4 #### 3 0 4 0\n\nwhat is 2+2?||<<2+2=4>> #### 4\nx|| #### 5\n")
    assert read_cot_lines(str(good)) == [CoTLine("1 2 * 3 4", "3 6 + 0 4", "3 0 4 0"),
                                         CoTLine("what is 2+2?", "<<2+2=4>>", "4"), CoTLine("x", "", "5")]
    cases = [("1 2 * 3 4 #### 3 0 4 0\n", "line 1 has no '||' between the input and the chain of thought"),
             ("a||b #### c\n1 2 * 3 4||3 6 + 0 4\n", "line 2 has no '####' before the answer"),
             ("a #### c||b\n", "line 1 has no '####' before the answer after its '||'"),
             ("||b #### c\n", "line 1 has an empty input"), ("a||b ####  \n", "line 1 has an empty answer"),
             ("\n\n", "holds no `input||cot #### answer` line")]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.txt"
        path.write_text(text)
        with pytest.raises(UserError, match=f"--train_file {path} " + message.replace("(", r"\(").replace("|", r"\|")):
            read_cot_lines(str(path))
    with pytest.raises(UserError, match="--label_file nowhere.txt does not exist"):
        read_cot_lines("nowhere.txt", "--label_file")


def test_generator_writes_the_seed_format(tmp_path):
    assert multiplication_line(3719, 3349, 4, 4) == SEED_EXAMPLE  # the example of the seed's README
    assert operands("9 1 7 3 * 9 4 3 3") == (3719, 3349, 4, 4)
    # a zero digit of b gives an all-zero partial product of full width; 2 x 3 has unequal widths
    assert multiplication_line(50, 105, 2, 3) == "0 5 * 5 0 1||0 5 2 + 0 0 0 0 ( 0 5 2 0 ) + 0 0 0 5 0 #### 0 5 2 5 0"
    splits = make_splits(2, 2, {"train": 50, "test": 20}, seed=1, exclude=["1 1 * 1 1"])
    questions = [l.split("||")[0] for s in splits.values() for l in s]
    assert len(set(questions)) == 70 and "1 1 * 1 1" not in questions
    for line in splits["train"]:
        a, b, n, m = operands(line.split("||")[0])
        assert 10 <= a < 100 and 10 <= b < 100 and line == multiplication_line(a, b, n, m)
        answer = line.split("####")[1].split()
        assert int("".join(reversed(answer))) == a * b and len(answer) == 4
    make_mult(str(tmp_path / "d"), n=2, m=2, n_train=30, n_valid=0, n_test=10)
    assert len(read_cot_lines(str(tmp_path / "d" / "train.txt"))) == 30
    assert not os.path.exists(tmp_path / "d" / "valid.txt")
    make_mult(str(tmp_path / "e"), n=2, m=2, n_train=30, n_valid=0, n_test=0, exclude=str(tmp_path / "d" / "test.txt"))
    held = {l.input for l in read_cot_lines(str(tmp_path / "d" / "test.txt"))}
    assert not held & {l.input for l in read_cot_lines(str(tmp_path / "e" / "train.txt"))}


@pytest.mark.parametrize("name", ["4_by_4_mult", "5_by_5_mult"])
def test_generator_reproduces_the_real_files(name):
    for split in ("valid.txt", "test_bigbench.txt"):
        path = shared_path("data", "implicit_cot", name, split)
        lines = [l.rstrip("\n") for l in open(path) if l.strip()]
        assert len(lines) == 1000
        for line in lines:
            a, b, n, m = operands(line.split("||")[0])
            assert " ".join(line.split()) == multiplication_line(a, b, n, m), line


# ----- the diagonal, the layer mapping, the injection ------------------------------------------------
def test_diagonal_and_layer_mapping_by_hand():
    assert diagonal_positions(5, 17, 4) == [5, 9, 13, 17]  # 12 / 3 = 4 per layer
    assert diagonal_positions(3, 8, 3) == [3, 5, 8]  # 2.5 rounds to 2 (half to even, as torch.round)
    assert diagonal_positions(3, 10, 3) == [3, 7, 10]  # 3.5 rounds to 4
    assert diagonal_positions(4, 12, 4) == [4, 7, 9, 12]  # 8/3 = 2.67 -> 3, 16/3 = 5.33 -> 5
    assert diagonal_positions(4, 9, 1) == [4]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # the authors' formula: first_sep + round(l * delta), delta = (s2 - s1) / (L - 1)
        s1, span, n = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(0, 60, (1,), generator=g)), \
            int(torch.randint(2, 13, (1,), generator=g))
        ref = s1 + torch.round(torch.arange(n) * torch.tensor(span / (n - 1), dtype=torch.float64)).long()
        assert diagonal_positions(s1, s1 + span, n) == ref.tolist()
    assert same_depth(4, 2) == [0, 0, 1, 1] and same_depth(2, 4) == [0, 3] and same_depth(3, 3) == [0, 1, 2]
    assert same_depth(6, 4) == [0, 1, 1, 2, 2, 3] and same_depth(1, 5) == [0]
    assert parse_layers("", 2, 3) == [0, 2] and parse_layers("1,1", 2, 3) == [1, 1]
    with pytest.raises(UserError, match="names 3 teacher layers but the student has 2 layers"):
        parse_layers("0,1,2", 2, 3)
    with pytest.raises(UserError, match=r"layer 3 does not exist in the teacher, whose layers are 0..2"):
        parse_layers("0,3", 2, 3)


def _random_model(args: ModelArgs, path, tokenizer, seed, n=1):
    files = ck.tokenizer_files_for(tokenizer)
    ck.write_native(ck.RandomSource(args, seed, tokenizer_files=files), str(path), n, overwrite=True, progress=False)
    return str(path)


TEACHER_ARGS = dict(dim=96, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=160, norm_eps=1e-5, max_seq_len=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """A 3-layer, 96-wide LLaMA teacher; a 2-layer, 64-wide Qwen2 student (one KV head, tied
    embeddings, q/k/v biases); a Mixtral emulator; 2x2 multiplication lines."""
    root = tmp_path_factory.mktemp("implicit")
    vocab = -(-load_tokenizer(tiny_tokenizer).vocab_size // 64) * 64
    made = {}
    for name, args, seed in (("teacher", ModelArgs(vocab_size=vocab, **TEACHER_ARGS), 1),
                             ("student", model_args_for("tiny-qwen2", vocab_size=vocab), 2),
                             ("emulator", model_args_for("tiny-mixtral", vocab_size=vocab), 3)):
        made[name] = _random_model(args, root / f"{name}-1", tiny_tokenizer, seed)
        made[name + "2"] = _random_model(args, root / f"{name}-2", tiny_tokenizer, seed, n=2)
    splits = make_splits(2, 2, {"train": 24, "valid": 6}, seed=5)
    for split, lines in splits.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root, made


def _hand_forward(model, tokens, replace=None):
    """The decoder run block by block by hand: replace(l, h) edits layer l's input in place. Returns
    (final hidden states, every layer's input)."""
    h = model.tok_embeddings(tokens)
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape)
    cos, sin = model.rope(positions, h.dtype)
    inputs = []
    for l, layer in enumerate(model.layers):
        if replace is not None:
            h = h.clone()
            replace(l, h)
        inputs.append(h)
        h = layer(h, cos, sin, positions, None)
    return model.norm(h), inputs


def test_state_injection_against_a_hand_computation(models, tiny_tokenizer, dist1):
    """Positions chosen on the diagonal, states replaced only at the last input position before every
    student layer, the loss and its gradients reaching the maps (and nothing reaching what they replace)."""
    root, made = models
    teacher = ck.load_model(made["teacher"]).eval().requires_grad_(False)
    student = ck.load_model(made["student"]).train()
    tok = load_tokenizer(tiny_tokenizer)
    lines = read_cot_lines(str(root / "train.txt"))[:3]
    examples = CoTExamples(lines, {"model": tok, "teacher": tok}, 512, "train")
    maps = StateMaps(2, 96, 64, "mlp", seed=7)
    layers = same_depth(2, 3)
    assert layers == [0, 2]  # student layer 1 reads the teacher's last layer
    task = MindReadTask(examples, torch.device("cpu"), teacher, maps, layers)
    batch = task.micro_batch([0, 1, 2], 0)

    # positions, by hand from the token counts: s1 the EOS after x, s2 the EOS after the CoT
    eos = tok.eos_id
    for b, line in enumerate(lines):
        s1 = len(tok.encode(line.input, bos=True))
        s2 = s1 + 1 + len(tok.encode(line.cot, bos=False))
        assert batch.extra["t_tokens"][b, s1] == eos and batch.extra["t_tokens"][b, s2] == eos
        assert batch.extra["t_diag"][b].tolist() == [s1, s1 + round((s2 - s1) / 2), s2]
        assert batch.extra["s1"][b] == s1 and batch.inputs[b, s1] == eos
        assert (batch.labels[b, :s1] == IGNORE).all() and batch.labels[b, s1] == tok.encode(line.answer, bos=False)[0]
    # the teacher's inputs of layers 0 and 2 at their diagonal positions
    _, t_inputs = _hand_forward(teacher, batch.extra["t_tokens"])
    rows = torch.arange(3)
    z_hand = torch.stack([t_inputs[t][rows, batch.extra["t_diag"][:, t]] for t in layers], dim=1)
    z = teacher_states(teacher, batch.extra["t_tokens"], batch.extra["t_diag"], layers)
    assert torch.allclose(z, z_hand, atol=1e-6)

    # the student by hand, with the mapped states written at s1 before each layer
    injected = maps(z_hand)
    s1 = batch.extra["s1"]

    def replace(l, h):
        h[rows, s1] = injected[:, l]

    hidden_hand, s_inputs = _hand_forward(student, batch.inputs, replace)
    logits = student.logits(hidden_hand)
    ce_hand = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE,
                              reduction="sum")
    ce = task.loss_sums(student, batch)["ce"]
    assert torch.allclose(ce, ce_hand, rtol=1e-5), (ce, ce_hand)

    # only position s1 changes at a layer's input: before s1 everything is as without injection,
    # and layer 0's input (the embeddings) differs from the plain one at s1 alone
    _, plain = _hand_forward(student, batch.inputs)
    for l in range(2):
        assert torch.equal(s_inputs[l][rows, s1], injected[:, l])
        for b in range(3):
            assert torch.equal(s_inputs[l][b, :s1[b]], plain[l][b, :s1[b]])
    changed = (s_inputs[0] != plain[0]).any(-1)
    assert changed.sum() == 3 and changed[rows, s1].all()
    assert not torch.allclose(s_inputs[1][:, -1], plain[1][:, -1])  # later positions read the injected state

    # gradients: every map gets one; the embedding replaced at s1 gets none, its neighbours do
    grads = {}

    def keep_grad(module, args, out):
        out.register_hook(lambda g: grads.setdefault("embedded", g))

    handle = student.tok_embeddings.register_forward_hook(keep_grad)
    student.zero_grad()
    task.loss_sums(student, batch)["ce"].backward()
    handle.remove()
    for mlp in maps.mlps:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    assert (grads["embedded"][rows, s1] == 0).all() and (grads["embedded"][rows, s1 - 1].abs().sum(-1) > 0).all()
    assert all(p.grad is None for p in teacher.parameters())
    # the hook is the same injection the task and the decoder use
    hook = inject_hook(injected.detach(), rows, s1)
    assert torch.allclose(student.forward_hidden(batch.inputs, layer_hook=hook), hidden_hand, atol=1e-5)


def test_answers_are_read_between_the_right_eos(tiny_tokenizer):
    from engine.distill.implicit.decode import answer_of, output_text

    tok = load_tokenizer(tiny_tokenizer)
    eos, four, cot = tok.eos_id, tok.encode("4 2", bos=False), tok.encode("1 + 3", bos=False)
    assert answer_of(cot + [eos] + four + [eos, 9, 9], eos, True, tok) == "4 2"
    assert answer_of(four + [eos] + cot, eos, False, tok) == "4 2"
    assert answer_of(cot + [eos] + four, eos, True, tok) is None  # stopped before the second EOS
    assert answer_of(four + [tok.vocab_size + 3, eos], eos, False, tok) is None  # a padded vocabulary row
    # what evaluate's --output_file shows: the data file's `cot #### answer`
    assert output_text(cot + [eos] + four + [eos], eos, tok) == "1 + 3 #### 4 2"
    assert output_text(four + [eos], eos, tok) == "4 2"
    assert output_text(cot + [eos] + four, eos, tok) == "1 + 3 #### 4 2"  # stopped before its EOS
    assert output_text(four + [tok.vocab_size + 3], eos, tok) == "4 2"


def test_each_line_is_recorded_as_answered(tiny_tokenizer):
    """AnswerEvaluator's per-line records (evaluate's --output_file) against answers chosen by hand:
    right, wrong, unparsable; the counts are the records' own."""
    from types import SimpleNamespace

    from engine.distill.implicit.decode import AnswerEvaluator

    lines = [CoTLine(f"{i} * 3", f"{i} + {i} + {i}", str(3 * i)) for i in range(5)]
    examples = CoTExamples(lines, {"model": load_tokenizer(tiny_tokenizer)}, 64, "lines.txt")
    said = {0: "0", 1: "4", 2: None, 3: "9", 4: "1 2"}  # right, wrong, unparsable, right, wrong

    def answer(model, positions):
        return [(f"cot #### {said[p]}" if said[p] is not None else "cot", said[p]) for p in positions]

    evaluator = AnswerEvaluator(examples, SimpleNamespace(dp_rank=0, dp_size=1), 2, answer)
    result = evaluator(SimpleNamespace(head_weight=torch.zeros(1)))
    assert (result["correct"], result["total"], result["unparsable"]) == (2, 5, 1)
    assert evaluator.all_records() == [
        {"index": i, "question": f"{i} * 3", "output": f"cot #### {said[i]}" if said[i] is not None else "cot",
         "prediction": said[i], "answer": str(3 * i), "correct": i in (0, 3)} for i in range(5)]


# ----- the four stages through the CLI: TP=2 == TP=1, end to end ------------------------------------
STEPS = 3


def _common(root):
    return {"train_file": root / "train.txt", "label_file": root / "valid.txt", "max_steps": STEPS,
            "save_every": STEPS, "max_batch_size": 4, "lr": 1e-3, "max_new_tokens": 40, "eval_batch_size": 3}


def _run_pipeline(root, made, tp):
    """teacher -> mind_read, emulator -> couple -> evaluate, in-process at TP=1 or via torchrun at TP=2."""
    out = root / f"tp{tp}"
    sfx = "" if tp == 1 else "2"
    stages = [("teacher", {"ckpt_dir": made["teacher" + sfx]}),
              ("mind_read", {"ckpt_dir": made["student" + sfx], "teacher_dir": out / "teacher"}),
              ("emulator", {"ckpt_dir": made["emulator" + sfx], "teacher_dir": out / "teacher"}),
              ("couple", {"student_dir": out / "mind_read", "emulator_dir": out / "emulator"})]
    for stage, own in stages:
        flags = {**_common(root), **own, "save_dir": out / stage}
        if tp == 1:
            getattr(train_implicit, stage)(**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in flags.items()})
        else:
            torchrun("train_implicit.py", stage, *train_args(flags))
    dirs = ",".join(str(out / s) for s, _ in stages)
    eval_flags = ["--data_file", str(root / "valid.txt"), "--model_dirs", dirs, "--batch_size", "3",
                  "--max_new_tokens", "40", "--results_file", str(out / "eval.json"), "--output_file",
                  str(out / "outputs.jsonl")]
    if tp == 1:
        train_implicit.evaluate(data_file=str(root / "valid.txt"), model_dirs=dirs, batch_size=3, max_new_tokens=40,
                                results_file=str(out / "eval.json"), output_file=str(out / "outputs.jsonl"))
    else:
        torchrun("train_implicit.py", "evaluate", *eval_flags)
    return out


def _maps(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "state_maps.safetensors"))


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pipelines(models, dist1):
    root, made = models
    return _run_pipeline(root, made, 1), _run_pipeline(root, made, 2)


@pytest.mark.processes
def test_every_stage_tp2_equals_tp1(pipelines):
    """Losses and grad norms agree to ~1e-6; weights to 1e-4 (a step moves them by ~lr = 1e-3): Adam
    divides by sqrt(v) + 1e-8, so an element whose gradient is ~1e-9 turns float noise into ~1e-5."""
    one, two = pipelines
    for stage in ("teacher", "mind_read", "emulator", "couple"):
        la, lb = losses(one / stage), losses(two / stage)
        assert len(la) == len(lb) == STEPS and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (stage, la, lb)
        ckpt = f"checkpoint-{STEPS}"
        assert _worst(full_weights(one / stage / ckpt), full_weights(two / stage / ckpt)) < 1e-4, stage
        if stage != "teacher":
            assert _worst(_maps(one / stage / ckpt), _maps(two / stage / ckpt)) < 1e-4, stage
    sub = f"checkpoint-{STEPS}/emulator"  # the coupled emulator (Mixtral) and its maps were trained too
    assert _worst(full_weights(one / "couple" / sub), full_weights(two / "couple" / sub)) < 1e-4
    assert _worst(_maps(one / "couple" / sub), _maps(two / "couple" / sub)) < 1e-4
    assert _worst(full_weights(one / "emulator" / f"checkpoint-{STEPS}"), full_weights(one / "couple" / sub)) > 1e-4
    grad_norms = [[json.loads(l)["grad_norm"] for l in open(p / "couple" / "metrics.jsonl") if "grad_norm" in l]
                  for p in (one, two)]
    assert max(abs(a - b) for a, b in zip(*grad_norms)) < 1e-4  # split weights counted once at TP=2


@pytest.mark.processes
def test_end_to_end_outputs(pipelines, models):
    one, two = pipelines
    root, made = models
    for out in (one, two):
        for stage in ("teacher", "mind_read", "emulator", "couple"):
            meta = json.load(open(out / stage / "best" / "implicit.json"))
            assert meta["stage"] == stage and os.path.exists(out / stage / "curves.png")
        meta = json.load(open(out / "mind_read" / "best" / "implicit.json"))
        assert meta["teacher"] == {"n_layers": 3, "dim": 96} and meta["teacher_layers"] == [0, 2]
        assert json.load(open(out / "emulator" / "best" / "implicit.json"))["emulator_layers"] == [0, 0, 1]
        results = json.load(open(out / "eval.json"))
        assert [r["stage"] for r in results] == ["teacher", "mind_read", "emulator", "couple"]
        for r in results:
            if r["stage"] == "emulator":
                assert r["total"] == 6 and r["mse"] > 0
            else:
                assert r["total"] == 6 and r["examples_per_s"] > 0 and 0 <= r["correct"] <= 6
    a, b = (json.load(open(p / "eval.json")) for p in (one, two))
    assert [r.get("correct") for r in a] == [r.get("correct") for r in b]
    assert abs(a[2]["mse"] - b[2]["mse"]) < 1e-4 * a[2]["mse"] + 1e-7
    outputs = [[json.loads(line) for line in open(p / "outputs.jsonl")] for p in (one, two)]
    assert outputs[0] == [{**r, "model_dir": r["model_dir"].replace(str(two), str(one))} for r in outputs[1]]
    _check_outputs(outputs[0], a, read_cot_lines(str(root / "valid.txt")))
    # 2 data-parallel replicas each answer half the lines; the file holds them all, in file order
    torchrun("train_implicit.py", "evaluate", "--data_file", str(root / "valid.txt"), "--model_dirs",
             ",".join(str(one / s) for s in ("teacher", "couple")), "--batch_size", "3", "--max_new_tokens", "40",
             "--tp_size", "1", "--output_file", str(two / "dp2.jsonl"))
    assert [json.loads(line) for line in open(two / "dp2.jsonl")] == [
        r for r in outputs[0] if r["stage"] in ("teacher", "couple")]


def _check_outputs(records, results, lines):
    """evaluate's --output_file: each generating model's lines in file order, their counts its result's."""
    generating = [r for r in results if r["stage"] != "emulator"]
    assert [(r["stage"], r["index"]) for r in records] == [(g["stage"], i) for g in generating for i in range(len(lines))]
    for g in generating:
        mine = [r for r in records if r["model_dir"] == g["model_dir"]]
        assert sum(r["correct"] for r in mine) == g["correct"]
        assert sum(r["prediction"] is None for r in mine) == g["unparsable"]
        for r in mine:
            line = lines[r["index"]]
            assert (r["question"], r["answer"]) == (line.input, line.answer)
            assert r["correct"] == (r["prediction"] is not None and r["prediction"].split() == line.answer.split())
            if r["prediction"] is not None:  # the answer is the output's (a teacher's: after its CoT)
                assert r["output"].split(" #### ")[1 if g["stage"] == "teacher" else 0].split() == r["prediction"].split()


@pytest.mark.processes
def test_couple_resumes_exactly(pipelines, models, dist1):
    one, _ = pipelines
    root, _ = models
    flags = {**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in _common(root).items()},
             "student_dir": str(one / "mind_read"), "emulator_dir": str(one / "emulator"), "max_steps": 4,
             "save_every": 2, "label_file": None}
    train_implicit.couple(save_dir=str(root / "straight"), **flags)
    train_implicit.couple(save_dir=str(root / "resumed"), exit_after_steps=2, **flags)
    train_implicit.couple(save_dir=str(root / "resumed"), resume=True, **flags)
    la, lb = losses(root / "straight"), losses(root / "resumed")
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-6, (la, lb)
    for sub in ("checkpoint-4", "checkpoint-4/emulator"):
        assert _worst(full_weights(root / "straight" / sub), full_weights(root / "resumed" / sub)) < 1e-6
        assert _worst(_maps(root / "straight" / sub), _maps(root / "resumed" / sub)) < 1e-6


# ----- bad input: one sentence --------------------------------------------------------------------
@pytest.mark.processes
def test_prerequisites_and_mappings_are_refused(pipelines, models, tmp_path):
    one, _ = pipelines
    root, made = models
    base = {"train_file": str(root / "train.txt"), "save_dir": str(tmp_path / "x")}
    teacher = str(one / "teacher")
    with pytest.raises(UserError, match=r"--teacher_dir .*nowhere does not exist; train one with `train_implicit.py "
                                        r"teacher` first"):
        train_implicit.mind_read(ckpt_dir=made["student"], teacher_dir=str(tmp_path / "nowhere"), **base)
    with pytest.raises(UserError, match=r"--teacher_dir .*teacher-1 holds no implicit.json, so no model saved by "
                                        r"`train_implicit.py teacher`"):
        train_implicit.mind_read(ckpt_dir=made["student"], teacher_dir=made["teacher"], **base)
    with pytest.raises(UserError, match=r"--teacher_dir .*mind_read holds a model of the mind_read stage, not of teacher"):
        train_implicit.emulator(ckpt_dir=made["emulator"], teacher_dir=str(one / "mind_read"), **base)
    no_cot = tmp_path / "no_cot"
    shutil.copytree(one / "teacher" / "best", no_cot)
    (no_cot / "implicit.json").write_text(json.dumps({"stage": "teacher", "cot": False}))
    with pytest.raises(UserError, match="was trained without a chain of thought"):
        train_implicit.mind_read(ckpt_dir=made["student"], teacher_dir=str(no_cot), **base)
    with pytest.raises(UserError, match=r"--state_map identity needs equal widths, but the teacher in .* is 96 wide "
                                        r"and the student in .* 64"):
        train_implicit.mind_read(ckpt_dir=made["student"], teacher_dir=teacher, state_map="identity", **base)
    with pytest.raises(UserError, match="names 3 teacher layers but the student has 2 layers"):
        train_implicit.mind_read(ckpt_dir=made["student"], teacher_dir=teacher, teacher_layers="0,1,2", **base)
    with pytest.raises(UserError, match="layer 3 does not exist in the teacher"):
        train_implicit.mind_read(ckpt_dir=made["student"], teacher_dir=teacher, teacher_layers="0,3", **base)
    with pytest.raises(UserError, match=r"--student_dir .*emulator holds a model of the emulator stage, not of mind_read; "
                                        r"train one with `train_implicit.py mind_read` first"):
        train_implicit.couple(student_dir=str(one / "emulator"), emulator_dir=str(one / "emulator"), **base)
    with pytest.raises(UserError, match=r"--emulator_dir .* does not exist; train one with `train_implicit.py emulator`"):
        train_implicit.couple(student_dir=str(one / "mind_read"), emulator_dir=str(tmp_path / "none"), **base)
    other = tmp_path / "other_emulator"
    shutil.copytree(one / "emulator" / "best", other)
    meta = json.load(open(other / "implicit.json"))
    (other / "implicit.json").write_text(json.dumps({**meta, "teacher_dir": "/elsewhere/teacher"}))
    with pytest.raises(UserError, match="emulates /elsewhere/teacher; train both from the same teacher"):
        train_implicit.couple(student_dir=str(one / "mind_read"), emulator_dir=str(other), **base)
    with pytest.raises(UserError, match="--model_dirs .* holds no implicit.json"):
        train_implicit.evaluate(data_file=str(root / "valid.txt"), model_dirs=made["student"])


@pytest.mark.processes
def test_bad_lines_end_in_one_sentence_through_the_cli(models, tmp_path):
    root, made = models
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 * 3 4||3 6 + 0 4 #### 3 0 4 0\n1 2 * 3 4 #### 3 0 4 0\n")
    proc = run_cli("train_implicit.py", "teacher", "--ckpt_dir", made["teacher"], "--save_dir", str(tmp_path / "t"),
                   "--train_file", str(bad))
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"error: --train_file {bad} line 2 has no '||' between the input and the chain of "
                                   f"thought (expected `input||cot #### answer`)")
    proc = run_cli("train_implicit.py", "mind_read", "--ckpt_dir", made["student"], "--save_dir", str(tmp_path / "m"),
                   "--train_file", str(root / "train.txt"), "--teacher_dir", str(tmp_path / "t"))
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_lora_stages_continue_their_adapters(models, dist1, tmp_path):
    """LoRA teacher, LoRA student, full emulator: the coupled stage goes on training the student's
    adapter on its original base, and the emulator's full weights; evaluate reads both back."""
    root, made = models
    common = {**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in _common(root).items()}, "max_steps": 1,
              "save_every": 1, "max_eval_examples": 2}
    lora = {"lora_rank": 4, "lora_targets": "wq,wv"}
    train_implicit.teacher(ckpt_dir=made["teacher"], save_dir=str(tmp_path / "t"), **lora, **common)
    train_implicit.mind_read(ckpt_dir=made["student"], save_dir=str(tmp_path / "s"), teacher_dir=str(tmp_path / "t"),
                             **lora, **common)
    train_implicit.emulator(ckpt_dir=made["emulator"], save_dir=str(tmp_path / "e"), teacher_dir=str(tmp_path / "t"),
                            **common)
    train_implicit.couple(student_dir=str(tmp_path / "s"), emulator_dir=str(tmp_path / "e"),
                          save_dir=str(tmp_path / "c"), **common)
    best = tmp_path / "c" / "best"
    config = json.load(open(best / "lora_config.json"))
    assert config["base_ckpt"] == os.path.abspath(made["student"]) and config["rank"] == 4
    assert os.path.exists(best / "emulator" / "consolidated.00.safetensors")
    before, after = (full_weights(p, lora=True) for p in (tmp_path / "s" / "best", best))
    assert before.keys() == after.keys() and _worst(before, after) > 0
    train_implicit.evaluate(data_file=str(root / "valid.txt"), model_dirs=f"{tmp_path / 't'},{tmp_path / 'c'}",
                            max_new_tokens=40, results_file=str(tmp_path / "eval.json"),
                            output_file=str(tmp_path / "outputs.jsonl"))
    results = json.load(open(tmp_path / "eval.json"))
    assert [r["total"] for r in results] == [6, 6]
    _check_outputs([json.loads(line) for line in open(tmp_path / "outputs.jsonl")], results,
                   read_cot_lines(str(root / "valid.txt")))
    held = read_cot_lines(str(root / "valid.txt"))  # the stages' --label_file, 2 lines of it evaluated
    for stage in ("t", "s", "c"):  # each evaluation's first lines as the stage answered them (samples.jsonl)
        samples = [json.loads(line) for line in open(tmp_path / stage / "samples.jsonl")]
        assert [(r["step"], r["index"]) for r in samples] == [(1, 0), (1, 1)]
        assert [(r["instruction"], r["label"]) for r in samples] == [(h.input, h.answer) for h in held[:2]]
        assert all(r["correct"] == (r["prediction"] is not None and r["prediction"].split() == r["label"].split())
                   for r in samples)
    assert not os.path.exists(tmp_path / "e" / "samples.jsonl")  # the emulator generates nothing


def test_flag_errors(tmp_path):
    base = {"ckpt_dir": "unused", "teacher_dir": "unused", "train_file": "unused", "save_dir": str(tmp_path / "x")}
    with pytest.raises(UserError, match="--state_map_hidden 8 sizes MLPs, but --state_map identity has none"):
        train_implicit.mind_read(state_map="identity", state_map_hidden=8, **base)
    with pytest.raises(UserError, match="--state_map 'linear' is not one of mlp, identity"):
        train_implicit.emulator(state_map="linear", **base)
    with pytest.raises(UserError, match="--max_new_tokens must be >= 1"):
        train_implicit.teacher(max_new_tokens=0, **{k: v for k, v in base.items() if k != "teacher_dir"})
    with pytest.raises(UserError, match="--max_eval_examples must be >= 0"):
        train_implicit.couple(student_dir="s", emulator_dir="e", train_file="t", save_dir=str(tmp_path / "x"),
                              max_eval_examples=-1)
    with pytest.raises(UserError, match="--model_dirs names no directory"):
        train_implicit.evaluate(data_file="unused", model_dirs=",")
    with pytest.raises(UserError, match="--output_file and --results_file are the same file o.json; name two"):
        train_implicit.evaluate(data_file="d.txt", model_dirs="m", output_file="o.json", results_file="o.json")
    with pytest.raises(UserError, match="--output_file d.txt is the --data_file; name another file"):
        train_implicit.evaluate(data_file="d.txt", model_dirs="m", output_file="d.txt")
    with pytest.raises(UserError, match=f"--results_file {tmp_path} is a directory"):
        train_implicit.evaluate(data_file="d.txt", model_dirs="m", results_file=str(tmp_path))


# ----- the README's commands, as a new user runs them -----------------------------------------------
READS = ("--ckpt_dir", "--teacher_dir", "--student_dir", "--emulator_dir", "--model_dirs", "--train_file",
         "--label_file", "--data_file", "--tokenizer")
WRITES = ("--save_dir", "--out_dir", "--output", "--output_file", "--results_file")


def _readme_implicit_commands():
    """The first bash block of the README's implicit section: one token list per command, `[...]`
    options and comments left out."""
    import re
    import shlex

    from tests.helpers import ROOT

    section = open(os.path.join(ROOT, "README.md")).read().split("## Implicit chain of thought", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]) for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line.strip()]


def _flag_values(cmd):
    return {tok: cmd[i + 1] for i, tok in enumerate(cmd[:-1]) if tok.startswith("--")}


def test_readme_implicit_commands_read_only_what_earlier_ones_write():
    """Every checkpoint, data and tokenizer file an implicit command names is written by an earlier one."""
    written = []
    for cmd in _readme_implicit_commands():
        flags = _flag_values(cmd)
        for name in READS:
            for path in flags.get(name, "").split(",") if name in flags else ():
                assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in written), \
                    f"README: `{' '.join(cmd)}` reads {name} {path}, which no earlier command writes"
        written += [flags[name] for name in WRITES if name in flags]
    assert {"init-tp2", "student-tp2", "emulator-tp2"} <= set(written)


TINY = {"--n_train": "24", "--n_valid": "4", "--n_test": "4", "--batch_size": "4", "--max_steps": "2"}
STAGE = {"--max_steps": "2", "--max_batch_size": "4", "--eval_batch_size": "4", "--max_new_tokens": "40"}


def _tiny(cmd):
    """(script, its arguments) of a README command at a tiny size: tiny-llama models, 24 training
    lines, 2 steps; `torchrun --nproc_per_node 2` becomes this one process, which reads the 2 shards."""
    script, args = (cmd[3], cmd[4:]) if cmd[0] == "torchrun" else (cmd[1], cmd[2:])
    args = ["tiny-llama" if a == "small-llama" else a for a in args]
    args = [TINY.get(args[i - 1], a) if i and args[i - 1] in TINY else a for i, a in enumerate(args)]
    if script == "train_implicit.py" and args[0] != "evaluate":
        flags = _flag_values(args)
        args = [STAGE.get(args[i - 1], a) if i and args[i - 1] in STAGE else a for i, a in enumerate(args)]
        args += [x for name, value in STAGE.items() if name not in flags for x in (name, value)]
    elif script == "train_implicit.py":
        args += ["--max_new_tokens", "40"]
    return script, args


def test_readme_implicit_commands_run_in_order(tmp_path, monkeypatch, dist1):
    """The README's implicit commands, in order, through each launcher's CLI (in this process: a
    start per command costs more than the tiny run), then what evaluate wrote is read back."""
    import sys

    import checkpoint_split
    from data import make_tokenizer, multiplication
    from engine.runtime.cli import run_cli as launch

    launchers = {"data/multiplication.py": multiplication.main, "data/make_tokenizer.py": make_tokenizer.main,
                 "checkpoint_split.py": checkpoint_split.COMMANDS, "train_implicit.py": train_implicit.COMMANDS}
    monkeypatch.chdir(tmp_path)
    commands = [_tiny(cmd) for cmd in _readme_implicit_commands()]
    for script, args in commands:
        monkeypatch.setattr(sys, "argv", [script, *args])
        launch(launchers[script])
    for name in ("init-tp2", "student-tp2", "emulator-tp2"):
        assert sorted(f for f in os.listdir(name) if f.endswith(".safetensors")) == [
            "consolidated.00.safetensors", "consolidated.01.safetensors"]
    results = json.load(open("results.json"))
    assert [r["stage"] for r in results] == ["teacher", "no_cot", "mind_read", "emulator", "couple"]
    _check_outputs([json.loads(line) for line in open("outputs.jsonl")], results, read_cot_lines("mult3/test.txt"))
