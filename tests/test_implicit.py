"""Implicit chain of thought (train_implicit.py): the line format and the multiplication generator,
the CoT diagonal, the LayerNorm of teacher states, the thought emulator and its loss against the
authors' code (da03/implicit_chain_of_thought at 51027999, transcribed below with file:line), the
state injection against hand computations, best/'s tie-break, every stage at TP=2 against TP=1
through the CLI (teacher, student and emulator of different families, depths and widths), exact
resume of the coupled stage, and one-sentence errors for bad input."""

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
from engine.distill.implicit.emulator import EmulatorHead
from engine.distill.implicit.states import (
    StateMaps,
    StateSpec,
    diagonal_positions,
    inject_hook,
    parse_layers,
    same_depth,
)
from engine.distill.implicit.tasks import EmulatorTask, MindReadTask, teacher_states
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
def _authors_positions(first_sep: int, second_sep: int, num_layers: int, delta: str = "dynamic", subset="diagonal"):
    """One row of src/models/teacher.py:54-55 and 32-51 (compute_positions_to_extract_per_layer), as
    released: the whole sum rounded in float32, clamped to the CoT's EOS."""
    if delta.isnumeric():  # teacher.py:54-55
        delta = int(delta)
    layer_ids = torch.arange(start=0, end=num_layers)  # :35
    first_position_to_extract = torch.tensor(first_sep)  # :37
    last_position_to_extract = torch.tensor(second_sep)  # :38
    if subset == "diagonal":  # :39-41
        if delta == "dynamic":
            delta = (last_position_to_extract - first_position_to_extract) / (num_layers - 1)
    elif subset == "first_column" or subset == "last_column":  # :42-43 (last_column lands here too)
        delta = 0
    positions_to_extract = torch.round(first_position_to_extract + layer_ids * delta)  # :48
    positions_to_extract = positions_to_extract.clamp(max=last_position_to_extract)  # :49
    return positions_to_extract.long().tolist()  # :50, into a LongTensor


def test_diagonal_and_layer_mapping_by_hand():
    assert diagonal_positions(5, 17, 4) == [5, 9, 13, 17]  # 12 / 3 = 4 per layer
    assert diagonal_positions(3, 8, 3) == [3, 6, 8]  # round(5.5) = 6 (half to even on the whole sum)
    assert diagonal_positions(3, 10, 3) == [3, 6, 10]  # round(6.5) = 6
    assert diagonal_positions(4, 12, 4) == [4, 7, 9, 12]  # 8/3 = 2.67 -> 3, 16/3 = 5.33 -> 5
    assert diagonal_positions(4, 9, 1) == [4]
    assert diagonal_positions(0, 31, 15)[7] == 15  # float32: 7 * (31/14) = 15.4999.. (exactly: 15.5 -> 16)
    # the released function on the authors' 4x4 and 5x5 files (GPT-2: s1 = 10, s2 = 58; 12, 88)
    assert diagonal_positions(10, 58, 12) == [10, 14, 19, 23, 27, 32, 36, 41, 45, 49, 54, 58]
    assert diagonal_positions(12, 88, 12) == [12, 19, 26, 33, 40, 47, 53, 60, 67, 74, 81, 88]
    assert diagonal_positions(10, 30, 12, "2") == [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 30]
    g = torch.Generator().manual_seed(0)
    ties = 0
    for _ in range(400):
        s1, span, n = (int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(0, 60, (1,), generator=g)),
                       int(torch.randint(2, 16, (1,), generator=g)))
        assert diagonal_positions(s1, s1 + span, n) == _authors_positions(s1, s1 + span, n), (s1, span, n)
        offset_only = [s1 + round(l * span / (n - 1)) for l in range(n)]  # the formula we used to have
        ties += offset_only != _authors_positions(s1, s1 + span, n)
        delta = str(int(torch.randint(0, 5, (1,), generator=g)))
        assert diagonal_positions(s1, s1 + span, n, delta) == _authors_positions(s1, s1 + span, n, delta)
    assert ties > 20  # the cases above include many where rounding the offset alone differs
    spec = StateSpec()
    assert spec.positions(3, 8, 3) == _authors_positions(3, 8, 3)
    assert StateSpec(subset="first_column").positions(3, 8, 3) == _authors_positions(3, 8, 3, subset="first_column")
    # last_column as the authors intend it (teacher.py:46-47); their code gives first_column's
    assert StateSpec(subset="last_column").positions(3, 8, 3) == [8, 8, 8]
    assert _authors_positions(3, 8, 3, subset="last_column") == [3, 3, 3]
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
    embeddings, q/k/v biases); a 4-layer, 64-wide Mixtral emulator (the authors' emulator needs at
    least the teacher's depth); 2x2 multiplication lines."""
    root = tmp_path_factory.mktemp("implicit")
    vocab = -(-load_tokenizer(tiny_tokenizer).vocab_size // 64) * 64
    made = {}
    for name, args, seed in (("teacher", ModelArgs(vocab_size=vocab, **TEACHER_ARGS), 1),
                             ("student", model_args_for("tiny-qwen2", vocab_size=vocab), 2),
                             ("emulator", model_args_for("tiny-mixtral", vocab_size=vocab, n_layers=4), 3)):
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


def _teacher_and_lines(models, tokenizer, n: int):
    """(the frozen teacher, the tokenizer, the first n training lines, their CoTExamples read by the teacher
    and by the model)."""
    teacher = ck.load_model(models[1]["teacher"]).eval().requires_grad_(False)
    tok = load_tokenizer(tokenizer)
    lines = read_cot_lines(str(models[0] / "train.txt"))[:n]
    return teacher, tok, lines, CoTExamples(lines, {"model": tok, "teacher": tok}, 512, "train")


def test_state_injection_against_a_hand_computation(models, tiny_tokenizer, dist1):
    """Positions chosen on the diagonal, states replaced only at the last input position before every
    student layer, the loss and its gradients reaching the maps (and nothing reaching what they replace)."""
    teacher, tok, lines, examples = _teacher_and_lines(models, tiny_tokenizer, 3)
    student = ck.load_model(models[1]["student"]).train()
    maps = StateMaps(2, 96, 64, "mlp", seed=7)
    layers = same_depth(2, 3)
    assert layers == [0, 2]  # student layer 1 reads the teacher's last layer
    task = MindReadTask(examples, torch.device("cpu"), teacher, maps, layers, StateSpec())
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
    # the teacher's inputs of layers 0 and 2 at their diagonal positions, through the authors'
    # nn.LayerNorm(hidden_size, elementwise_affine=False) (src/models/teacher.py:24, 83)
    _, t_inputs = _hand_forward(teacher, batch.extra["t_tokens"])
    rows = torch.arange(3)
    raw = torch.stack([t_inputs[t][rows, batch.extra["t_diag"][:, t]] for t in layers], dim=1)
    z_hand = torch.nn.LayerNorm(96, elementwise_affine=False)(raw)
    z = teacher_states(teacher, batch.extra["t_tokens"], batch.extra["t_diag"], layers, StateSpec())
    assert torch.allclose(z, z_hand, atol=1e-5) and not torch.allclose(z, raw, atol=0.1)
    raw_spec = StateSpec(norm="none")
    assert torch.equal(teacher_states(teacher, batch.extra["t_tokens"], batch.extra["t_diag"], layers, raw_spec), raw)

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


# ----- the authors' thought emulator --------------------------------------------------------------
def _authors_forward_emulator(model, head, input_ids, positions_to_take, requires_backward=True):
    """src/models/modeling_gpt2_implicit.py:145-239 (mode 'forward_emulator'), line for line with the
    authors' names, on our decoder run block by block; head holds the modules of
    src/models/emulator.py:25-36 and the temperature of configuration_emulator.py:9. Returns f_h_cs."""
    hidden_states = model.tok_embeddings(input_ids)
    pos = torch.arange(input_ids.shape[1]).expand(input_ids.shape)
    cos, sin = model.rope(pos, hidden_states.dtype)
    batch_size = input_ids.shape[0]
    rnn, mlps, key_proj, query_proj, out_proj = head.rnn, head.mlps, head.key_proj, head.query_proj, head.out_proj
    softmax_temperature = head.softmax_temperature
    f_h_cs = []
    rnn_state = None  # 149
    past_keys = None  # 152
    context = None  # 153
    weight = head.mixture_components.weight  # 155
    for i, block in enumerate(model.layers):  # 156
        hidden_size = hidden_states.shape[-1]
        z = hidden_states.gather(1, positions_to_take.view(-1, 1, 1).expand(-1, -1, hidden_size)).squeeze(1)  # 176
        c = z  # 182
        if weight.shape[0] == 1:  # 194-201
            mixture_embedding = weight.expand(batch_size, -1)
        else:
            log_probs = c @ weight.T
            log_probs = log_probs / softmax_temperature
            probs = log_probs.softmax(dim=-1)
            mixture_embedding = probs @ weight
        f_h_c = mlps[i](torch.cat((z, mixture_embedding), dim=-1))  # 202
        f_h_cs.append(f_h_c)  # 206
        next_input = f_h_c  # 207
        if context is None:  # 211-212
            context = next_input.new_zeros(next_input.shape)
        output, rnn_state = rnn((next_input + context).unsqueeze(0), rnn_state)  # 213
        output = output.squeeze(0)
        current_key = key_proj(output)  # 215
        if past_keys is not None:  # 216-222
            current_query = query_proj(output)
            attn_weights = torch.bmm(past_keys, current_query.unsqueeze(-1))
            attn_probs = attn_weights.softmax(dim=1)
            attn_probs = attn_probs.squeeze(-1).unsqueeze(1)
            context = torch.bmm(attn_probs, past_keys).squeeze(1)
            past_keys = torch.cat((past_keys, current_key.unsqueeze(1)), dim=1)
        else:
            past_keys = current_key.unsqueeze(1)  # 224
        output = out_proj(torch.cat((output, context), dim=-1))  # 225
        next_input = output
        if requires_backward:  # 233-234
            hidden_states = hidden_states.clone()
        if positions_to_take.eq(positions_to_take[0]).all():  # 235-239
            hidden_states[:, positions_to_take[0]] = next_input
        else:
            for batch_id in range(positions_to_take.shape[0]):
                hidden_states[batch_id, positions_to_take[batch_id]] = next_input[batch_id]
        hidden_states = block(hidden_states, cos, sin, pos, None)  # 273-284
    return f_h_cs


def _scaled_model(directory):
    """A saved random model in float64, its weights scaled up so that the states are not all tiny
    (the write-back, the mixture's softmax and the attention then all move the predictions)."""
    model = ck.load_model(directory).double().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


@pytest.mark.parametrize("mixture_size", [1, 3])
def test_emulator_head_against_the_authors_loop(models, dist1, mixture_size):
    """Our EmulatorHead as a layer_hook on our decoder gives the authors' predictions (float64), on
    rows whose last input positions differ and on rows whose positions agree (their broadcast branch)."""
    root, made = models
    model = _scaled_model(made["emulator"])  # 4 layers, 64 wide: the authors' case, widths and depths equal
    head = EmulatorHead(list(range(4)), 64, 64, mixture_size=mixture_size, seed=5).double()
    tokens = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in head.parameters():  # PyTorch's default init is too small to move anything much
            p.mul_(3.0)
        # mixture logits z W^T / 0.05 of about unit spread: a mixture neither uniform nor one-hot
        z_scale = model.tok_embeddings(tokens).norm(dim=-1).mean()
        head.mixture_components.weight.normal_(generator=torch.Generator().manual_seed(4)).mul_(0.05 / z_scale)
    for positions in (torch.tensor([5, 8, 6]), torch.tensor([6, 6, 6])):
        ours = head(model, tokens, positions)
        theirs = torch.stack(_authors_forward_emulator(model, head, tokens, positions), dim=1)
        assert ours.shape == (3, 4, 64)
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10), (ours - theirs).abs().max()
    head.zero_grad()
    ours.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    ours = ours.detach()
    # what the write-back changes: without it, the later layers' predictions differ
    rows = torch.arange(3)
    read_only = []

    def no_write_back(layer, h):
        z = h[rows, positions]
        read_only.append(head.mlps[layer](torch.cat((z, head.mixture_embedding(z)), dim=-1)))
        return h

    model.forward_hidden(tokens, layer_hook=no_write_back)
    assert torch.allclose(read_only[0], ours[:, 0]) and not torch.allclose(read_only[2], ours[:, 2], atol=1e-3)
    if mixture_size == 1:
        assert torch.equal(head.mixture_embedding(ours[:, 0]), head.mixture_components.weight.expand(3, -1))
    else:  # a soft mixture at these inputs: no component is chosen outright, so T matters
        z0 = model.tok_embeddings(tokens)[rows, positions]
        probs = (z0 @ head.mixture_components.weight.T / 0.05).softmax(-1)
        assert probs.max() < 0.99 and probs.min() > 0.001, probs


def test_emulator_head_across_widths_and_depths(models, dist1):
    """Our generalisation: a 96-wide, 3-layer teacher predicted before emulator layers 0, 2, 3 of a
    64-wide emulator; the unmapped layer's input is left alone; every parameter gets a gradient."""
    root, made = models
    model = ck.load_model(made["emulator"]).eval().requires_grad_(False)
    head = EmulatorHead(same_depth(3, 4), 64, 96, mixture_size=2, seed=1)
    tokens = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    seen = {}

    def spy(layer, h):
        seen[layer] = h.clone()
        return h

    pred = head(model, tokens, torch.tensor([4, 6]))
    assert head.layer_map == [0, 2, 3] and pred.shape == (2, 3, 96)
    pred.pow(2).sum().backward()
    # with 3 states only the last step attends over 2 keys, and its write-back feeds no later
    # prediction: the query projection cannot reach the loss (with 4 or more states it does, below)
    grads = {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in head.named_parameters()}
    assert all(g > 0 for n, g in grads.items() if not n.startswith("query_proj")) and grads["query_proj.weight"] == 0
    run_inputs = []

    def record(layer, h):
        run_inputs.append(h)
        return h

    from engine.distill.implicit.emulator import EmulatorRun

    run = EmulatorRun(head, torch.arange(2), torch.tensor([4, 6]))
    with torch.no_grad():
        model.forward_hidden(tokens, layer_hook=lambda l, h: record(l, run(l, spy(l, h))))
    assert torch.equal(run_inputs[1], seen[1])  # layer 1 predicts nothing: its input passes through
    changed = (run_inputs[0] != seen[0]).any(-1)
    assert changed.sum() == 2 and changed[0, 4] and changed[1, 6]  # only each row's last input position
    with pytest.raises(UserError, match="strictly increasing layers"):
        EmulatorHead([0, 0, 1], 64, 96)


def test_emulator_loss_against_the_authors(models, dist1, tiny_tokenizer):
    """The emulator stage's loss is the authors' Emulator.compute_loss on LayerNorm'd teacher states;
    the readout's is the per-element mean; the evaluator's state MSE is per element for both."""
    from engine.distill.implicit.decode import StateErrorEvaluator

    teacher, tok, lines, examples = _teacher_and_lines(models, tiny_tokenizer, 4)
    emulator = ck.load_model(models[1]["emulator"]).eval()
    head = EmulatorHead(same_depth(3, 4), 64, 96, seed=2)
    task = EmulatorTask(examples, torch.device("cpu"), teacher, head, same_depth(3, 4), StateSpec())
    batch = task.micro_batch([0, 1, 2, 3], 0)
    ours = task.loss_sums(emulator, batch)["state"] / batch.counts["state"]
    # the authors: teacher states through nn.LayerNorm(elementwise_affine=False) (teacher.py:24, 83),
    # then emulator.py:62-66
    _, t_inputs = _hand_forward(teacher, batch.extra["t_tokens"])
    rows, diag = torch.arange(4), batch.extra["t_diag"]
    layer_norm = torch.nn.LayerNorm(96, elementwise_affine=False)
    teacher_states_ = [layer_norm(t_inputs[i][rows, diag[:, i]]) for i in range(3)]
    emulated_teacher_states = list(head(emulator, batch.inputs, batch.extra["s1"]).unbind(1))
    loss_fct = torch.nn.MSELoss(reduction="none")
    loss = 0
    for teacher_state, emulated_teacher_state in zip(teacher_states_, emulated_teacher_states):
        loss += loss_fct(teacher_state, emulated_teacher_state).sum(-1) / 2
    loss = loss.mean()
    assert torch.allclose(ours, loss, rtol=1e-5), (ours, loss)
    squared = 2 * float(loss.detach()) * 4
    result = StateErrorEvaluator(task, dist1, 3)(emulator)
    assert result["mse"] == pytest.approx(squared / (4 * 3 * 96), rel=1e-5)
    maps = StateMaps(3, 64, 96, seed=2)
    readout = EmulatorTask(examples, torch.device("cpu"), teacher, maps, same_depth(3, 4), StateSpec(norm="none"))
    batch = readout.micro_batch([0, 1, 2, 3], 0)
    own = torch.stack([_hand_forward(emulator, batch.inputs)[1][l][rows, batch.extra["s1"]] for l in (0, 2, 3)], 1)
    raw = torch.stack([t_inputs[i][rows, diag[:, i]] for i in range(3)], dim=1)
    mse = (maps(own) - raw).pow(2).mean()
    assert batch.counts["state"] == 4 * 3 * 96
    assert torch.allclose(readout.loss_sums(emulator, batch)["state"] / batch.counts["state"], mse, rtol=1e-5)


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
              ("emulator", {"ckpt_dir": made["emulator" + sfx], "teacher_dir": out / "teacher", "mixture_size": 3}),
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


def _maps(path, name="state_maps.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, name))


def _head(path):
    return _maps(path, "emulator_head.safetensors")


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _assert_tp_agrees(a: dict, b: dict, what: str) -> None:
    """TP=2's weights are TP=1's: none 1e-3 apart, at most 1 in 1,000 more than 1e-4. Adam divides by
    sqrt(v) + 1e-8, so an element whose gradient is ~1e-9 turns float noise into ~1e-5 or more (a few
    elements of the emulator head reach 1.4e-4 on some CPUs); a missing or doubled sum moves most."""
    worst = _worst(a, b)
    beyond = sum(int(((a[k].float() - b[k].float()).abs() > 1e-4).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert worst < 1e-3 and beyond <= total / 1000, (what, worst, beyond, total)


@pytest.fixture(scope="module")
def pipelines(models, dist1):
    root, made = models
    return _run_pipeline(root, made, 1), _run_pipeline(root, made, 2)


@pytest.mark.processes
def test_every_stage_tp2_equals_tp1(pipelines):
    """Losses and grad norms agree to ~1e-6; weights to 1e-4 but for a few elements (a step moves them
    by ~lr = 1e-3; _assert_tp_agrees says why a few)."""
    one, two = pipelines
    for stage in ("teacher", "mind_read", "emulator", "couple"):
        la, lb = losses(one / stage), losses(two / stage)
        assert len(la) == len(lb) == STEPS and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (stage, la, lb)
        ckpt = f"checkpoint-{STEPS}"
        _assert_tp_agrees(full_weights(one / stage / ckpt), full_weights(two / stage / ckpt), stage)
        if stage in ("mind_read", "couple"):
            _assert_tp_agrees(_maps(one / stage / ckpt), _maps(two / stage / ckpt), stage)
        if stage == "emulator":  # the authors' emulator head (mixture of 3), trained beside the model
            _assert_tp_agrees(_head(one / stage / ckpt), _head(two / stage / ckpt), stage)
    sub = f"checkpoint-{STEPS}/emulator"  # the coupled emulator (Mixtral) and its head were trained too
    _assert_tp_agrees(full_weights(one / "couple" / sub), full_weights(two / "couple" / sub), "coupled emulator")
    _assert_tp_agrees(_head(one / "couple" / sub), _head(two / "couple" / sub), "coupled emulator head")
    assert _worst(full_weights(one / "emulator" / f"checkpoint-{STEPS}"), full_weights(one / "couple" / sub)) > 1e-4
    assert _worst(_head(one / "emulator" / f"checkpoint-{STEPS}"), _head(one / "couple" / sub)) > 1e-6
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
        assert meta["states"] == {"delta": "dynamic", "subset": "diagonal", "norm": "layernorm"}
        meta = json.load(open(out / "emulator" / "best" / "implicit.json"))
        assert meta["emulator_layers"] == [0, 2, 3] and meta["emulator_kind"] == "authors"
        head = EmulatorHead.load(str(out / "couple" / "best" / "emulator"))
        assert head.mixture_size == 3 and head.layer_map == [0, 2, 3] and (head.d_model, head.d_teacher) == (64, 96)
        results = json.load(open(out / "eval.json"))
        assert [r["stage"] for r in results] == ["teacher", "mind_read", "emulator", "couple"]
        for r in results:
            if r["stage"] == "emulator":  # LayerNorm'd targets: an untrained emulator is near 1 per element
                assert r["total"] == 6 and 0.2 < r["mse"] < 5
            else:
                assert r["total"] == 6 and r["examples_per_s"] > 0 and 0 <= r["correct"] <= 6
                assert r["held_out_loss"] > 0
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
    for load, sub in ((_maps, "checkpoint-4"), (_head, "checkpoint-4/emulator")):
        assert _worst(load(root / "straight" / sub), load(root / "resumed" / sub)) < 1e-6


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
    with pytest.raises(
        UserError,
        match=r"--emulator authors predicts the teacher's states one layer after another, so the emulator "
        r"in .*student-1 \(2 layers\) needs at least the 3 layers of the teacher in .*; use a deeper "
        r"emulator or --emulator readout",
    ):
        train_implicit.emulator(ckpt_dir=made["student"], teacher_dir=teacher, **base)
    raw = tmp_path / "raw_emulator"
    shutil.copytree(one / "emulator" / "best", raw)
    meta = json.load(open(raw / "implicit.json"))
    (raw / "implicit.json").write_text(json.dumps({**meta, "states": {**meta["states"], "norm": "none"}}))
    with pytest.raises(
        UserError, match=r"learned to predict .*'norm': 'none'.*; train both with the same --state_norm"
    ):
        train_implicit.couple(student_dir=str(one / "mind_read"), emulator_dir=str(raw), **base)


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
                            mixture_size=2, **common)
    train_implicit.couple(student_dir=str(tmp_path / "s"), emulator_dir=str(tmp_path / "e"),
                          save_dir=str(tmp_path / "c"), **common)
    best = tmp_path / "c" / "best"
    config = json.load(open(best / "lora_config.json"))
    assert config["base_ckpt"] == os.path.abspath(made["student"]) and config["rank"] == 4
    assert os.path.exists(best / "emulator" / "consolidated.00.safetensors")
    assert EmulatorHead.load(str(best / "emulator")).mixture_size == 2  # the authors' emulator, as trained
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
    for flags, message in (
        ({"emulator": "lstm"}, "--emulator 'lstm' is not one of authors, readout"),
        ({"state_norm": "rms"}, "--state_norm 'rms' is not one of layernorm, none"),
        ({"subset": "top_row"}, "--subset 'top_row' is not one of .* AssertionError there, teacher.py:45"),
        ({"delta": "2.5"}, "--delta '2.5' is neither dynamic nor a whole number"),
        ({"delta": 2, "subset": "first_column"}, "--delta 2 spaces the diagonal; --subset first_column"),
        ({"mixture_size": 0}, "--mixture_size must be >= 1"),
        ({"softmax_temperature": 0.0}, "--softmax_temperature must be > 0"),
        ({"emulator": "readout", "mixture_size": 4}, "--mixture_size and --softmax_temperature belong to"),
        ({"state_map": "identity"}, "--state_map identity maps states for --emulator readout"),
    ):
        with pytest.raises(UserError, match=message):
            train_implicit.emulator(**flags, **base)
    with pytest.raises(UserError, match="--subset 'bottom_row'"):
        train_implicit.mind_read(subset="bottom_row", **base)


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
    variables, commands = {}, []
    for line in filter(str.strip, lines):
        assignment = re.fullmatch(r"\s*(\w+)=(.*)", line)
        if assignment:  # NAME="..." then $NAME: the shell's expansion of the README's variables
            variables["$" + assignment.group(1)] = shlex.split(assignment.group(2))[0].split()
            continue
        commands.append([part for tok in shlex.split(line) for part in variables.get(tok, [tok])])
    return commands


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
    _check_outputs([json.loads(line) for line in open("outputs.jsonl")], results, read_cot_lines("mult/test.txt"))


def test_readout_emulator_and_old_directories(models, dist1, tmp_path):
    """--emulator readout (ours) still trains, couples and evaluates; a directory saved before the
    emulator kinds and state specs existed reads as a readout on raw states."""
    root, made = models
    common = {
        **{k: str(v) if isinstance(v, os.PathLike) else v for k, v in _common(root).items()},
        "max_steps": 1,
        "save_every": 1,
        "max_eval_examples": 2,
    }
    t, s, e = (str(tmp_path / x) for x in "tse")
    train_implicit.teacher(ckpt_dir=made["teacher"], save_dir=t, **common)
    raw = {"state_norm": "none", "delta": 1}
    train_implicit.mind_read(ckpt_dir=made["student"], save_dir=s, teacher_dir=t, **raw, **common)
    train_implicit.emulator(ckpt_dir=made["student"], save_dir=e, teacher_dir=t, emulator="readout", **raw, **common)
    meta = json.load(open(os.path.join(e, "best", "implicit.json")))
    assert meta["emulator_kind"] == "readout" and meta["emulator_layers"] == [0, 0, 1]
    assert meta["states"] == {"delta": "1", "subset": "diagonal", "norm": "none"}
    assert os.path.exists(os.path.join(e, "best", "state_maps.safetensors"))
    assert not os.path.exists(os.path.join(e, "best", "emulator_head.safetensors"))
    for d in (s, e):  # as written before --emulator and --state_norm
        path = os.path.join(d, "best", "implicit.json")
        old = {k: v for k, v in json.load(open(path)).items() if k not in ("emulator_kind", "states")}
        open(path, "w").write(json.dumps(old))
    c = str(tmp_path / "c")
    train_implicit.couple(student_dir=s, emulator_dir=e, save_dir=c, **common)
    assert os.path.exists(os.path.join(c, "best", "emulator", "state_maps.safetensors"))
    out = str(tmp_path / "eval.json")
    train_implicit.evaluate(data_file=str(root / "valid.txt"), model_dirs=f"{e},{c}", max_new_tokens=40,
                            results_file=out)
    first, second = json.load(open(out))
    assert first["stage"] == "emulator" and first["mse"] > 0 and second["total"] == 6


def test_best_breaks_accuracy_ties_by_digits_then_loss(models, dist1, tiny_tokenizer, tmp_path):
    """best/ moves on equal accuracy when more answer digits are right, or as many and a lower held-out
    loss; the trainer state keeps the key, and a state from before keys resumes from its accuracy."""
    from engine.distill.implicit.decode import AnswerEvaluator
    from engine.distill.implicit.tasks import CoTTeacherTask
    from engine.train.config import TrainConfig
    from engine.train.trainer import Trainer

    root, made = models
    tok = load_tokenizer(tiny_tokenizer)
    examples = CoTExamples(read_cot_lines(str(root / "train.txt")), {"model": tok}, 512, "train", ("model",))
    script = [  # (accuracy, digits right, held-out loss) after steps 1..5, and whether best/ moves
        ((0.0, 0.10, 3.0), True),
        ((0.0, 0.30, 2.9), True),
        ((0.0, 0.30, 3.1), False),
        ((0.0, 0.30, 2.5), True),
        ((0.0, 0.20, 1.0), False),
    ]

    class Scripted(AnswerEvaluator):
        def __init__(self):
            self.results = [{"accuracy": a, "word_accuracy": w, "held_out_loss": l} for (a, w, l), _ in script]
            self.records, self.n_samples = [], 0

        def __call__(self, model):
            return {**self.results.pop(0), "correct": 0, "total": 6, "unparsable": 0}

    cfg = TrainConfig(save_dir=str(tmp_path / "run"), max_steps=5, eval_every=1, lr=1e-4, progress=False, plot=False)
    trainer = Trainer(ck.load_model(made["teacher"]).train(), CoTTeacherTask(examples, dist1.device), cfg, dist1)
    trainer.evaluator = Scripted()
    trainer.fit()
    moved = [i + 1 for i, (_, moves) in enumerate(script) if moves]
    assert json.load(open(tmp_path / "run" / "best" / "eval.json"))["step"] == moved[-1]
    assert trainer.best_key == (0.0, 0.30, -2.5)
    assert Trainer._saved_best({"best_accuracy": -1.0}) is None  # none yet, before keys
    assert Trainer._saved_best({"best_accuracy": 0.25}) == (0.25,)
    assert Trainer._saved_best({"best_key": [0.0, 0.3, -2.5]}) == (0.0, 0.3, -2.5)
