"""The MI term, calibration and rationale BLEU of Chen et al. 2024 (xinchen9/cot_distillation_ACL2024 @
59ca033) against their computation, written out here from their code with file:line, on inputs where
ours differs: --mi_estimator authors (TP=1 and TP=2, padding included and masked, and through the
training step), equal-mass bins, token-level correctness and the confidence's position (by hand on
the model), and the mean of unsmoothed per-record BLEU (HF evaluate's, which their code calls)."""

import collections
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infer
import train
from engine.distill.step_by_step.mi import authors_mi_sum, pooled_distribution_ce_sum
from engine.infer.args import BleuArgs
from engine.infer.metrics import calibration_bins, corpus_bleu, file_bleu, mean_sentence_bleu, sentence_bleu
from engine.runtime.errors import UserError
from tests.helpers import arith_and_model, torchrun
from tests.workers.mi_worker import hand_made_mi_inputs

PREFIX = {"label": "predict: ", "rationale": "explain: "}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer):
    return arith_and_model(tmp_path_factory.mktemp("mi"), tiny_tokenizer, "tiny-llama", "m1", n_train=12,
                           n_test=6, data_seed=2, model_seed=3)


# ----- the MI term ----------------------------------------------------------------------------------
def authors_ms_loss(pred_logits, expl_logits):
    """xinchen9/cot_distillation_ACL2024 model_utils.py:62-72 (TaskPrefixTrainer.compute_loss), verbatim:
    logits [B, W, V] of the T5 decoder at every position of the padded micro-batch."""
    pred_logits = (pred_logits).detach()
    expl_logits = expl_logits
    pred_prob = pred_logits.softmax(dim=-1)
    expl_prob = expl_logits.softmax(dim=-1)

    pred_prob_1 = torch.max(pred_prob, dim=-2)[0]
    expl_prob_1 = torch.max(expl_prob, dim=-2)[0]
    Loss = nn.CrossEntropyLoss()
    ms_loss = Loss(expl_prob_1, pred_prob_1)
    return ms_loss


def authors_reference(label, rationale, label_mask=None, rationale_mask=None):
    """Their term summed over examples (their CrossEntropyLoss takes the mean over the B examples; our
    sums are divided by the step's questions): over every position, or, with masks, each example's real
    positions alone (examples without one in a pass left out)."""
    if label_mask is None:
        return authors_ms_loss(label, rationale) * len(label)
    total = torch.zeros(())
    for b in range(len(label)):
        if label_mask[b].any() and rationale_mask[b].any():
            total = total + authors_ms_loss(label[b : b + 1, label_mask[b]], rationale[b : b + 1, rationale_mask[b]])
    return total


def test_authors_mi_is_their_code_padding_included_or_masked(dist1):
    label, label_mask, rationale, rationale_mask = hand_made_mi_inputs()
    rationale = rationale.clone().requires_grad_()
    label = label.clone().requires_grad_()
    got = authors_mi_sum(label, rationale)
    ref = authors_reference(label, rationale)
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    (g_got,) = torch.autograd.grad(got, rationale)
    (g_ref,) = torch.autograd.grad(ref, rationale)
    assert (g_got - g_ref).abs().max() < 1e-7 and g_got.abs().max() > 0
    with pytest.raises(RuntimeError):  # the label pass is detached (model_utils.py:62): no graph reaches it
        torch.autograd.grad(authors_mi_sum(label, rationale.detach()), label)
    # the authors' max-pool runs over the padding too: a padding position that wins the max changes the term
    noisy = rationale.detach().clone()
    noisy[1, 4:, 5] = 30.0  # row 1's padding puts all its mass on token 5
    assert abs(authors_mi_sum(label, noisy).item() - got.item()) > 1e-3
    assert authors_mi_sum(label, noisy).item() == pytest.approx(authors_reference(label, noisy).item(), abs=1e-5)
    # --mi_mask_padding True: the real positions alone, the padding's content irrelevant
    masked = authors_mi_sum(label, rationale, label_mask, rationale_mask)
    assert masked.item() == pytest.approx(
        authors_reference(label, rationale, label_mask, rationale_mask).item(), abs=1e-5
    )
    assert authors_mi_sum(label, noisy, label_mask, rationale_mask).item() == pytest.approx(masked.item(), abs=1e-6)
    assert abs(masked.item() - got.item()) > 1e-2


def test_authors_and_pooled_distribution_ce_differ(dist1):
    """The same logits, the two estimators: the authors' pooled probabilities enter a log-softmax as
    logits (so the term is about log V x the target's mass, with a small gradient); ours renormalises
    the pooled probabilities to distributions and takes their cross-entropy."""
    label, label_mask, rationale, rationale_mask = hand_made_mi_inputs()
    rationale = rationale.clone().requires_grad_()
    ours = pooled_distribution_ce_sum(label, label_mask, rationale, rationale_mask)
    theirs = authors_mi_sum(label, rationale, label_mask, rationale_mask)
    (g_ours,) = torch.autograd.grad(ours, rationale)
    (g_theirs,) = torch.autograd.grad(theirs, rationale)
    assert abs(ours.item() - theirs.item()) > 5  # 12.5 vs 20.8 here; gradient norms 0.70 vs 0.16
    assert g_theirs.norm() < 0.5 * g_ours.norm()
    assert F.cosine_similarity(g_ours.flatten(), g_theirs.flatten(), dim=0) < 0.5


@pytest.mark.processes
def test_authors_mi_at_tp2_is_their_code(tmp_path, dist1):
    torchrun("tests/workers/mi_worker.py", str(tmp_path / "tp2.pt"))
    results = torch.load(tmp_path / "tp2.pt")
    label, label_mask, rationale, rationale_mask = hand_made_mi_inputs()
    for name, masks in (("authors", ()), ("authors_masked", (label_mask, rationale_mask))):
        r = rationale.clone().requires_grad_()
        ref = authors_reference(label, r, *masks)
        (grad,) = torch.autograd.grad(ref, r)
        assert results[name]["loss"] == pytest.approx(ref.item(), abs=1e-5), name
        assert (results[name]["grad_rationale"] - grad).abs().max() < 1e-7, name
        assert results[name]["label_grad_is_none"]


def _window_logits(model, prompt, response, width, pad_id):
    """The authors' T5 window on our decoder: the logits at the `width` positions from the one
    predicting the response's first token, the positions past the response fed pad tokens (as the
    T5 decoder is fed pads where the collator padded the labels with -100)."""
    ids = prompt + response[:-1]
    ids = ids + [pad_id] * (len(prompt) - 1 + width - len(ids))
    return model(torch.tensor([ids]))[0, len(prompt) - 1 : len(prompt) - 1 + width]


@pytest.mark.parametrize("mask_padding", [False, True])
def test_first_step_authors_mi_is_their_code_on_the_model(root, tiny_tokenizer, dist1, tmp_path, mask_padding):
    """--mi_estimator authors (beta 0.1 by default, as their main.py:44): the logged MI part of a step
    whose micro-batch holds all 6 questions equals their term on the windows their collator would
    form (each pass padded to its longest target, model_utils.py:26-39), computed here from the
    model's full logits; with --mi_mask_padding True, on the real positions alone."""
    from engine.checkpoint import load_model
    from engine.text.tokenizer import load_tokenizer

    records = json.load(open(root / "arith" / "train.json"))[:6]
    path = tmp_path / "six.json"
    path.write_text(json.dumps(records))
    save = tmp_path / "run"
    flags = {"mi_mask_padding": True} if mask_padding else {}
    train.main(
        objective="step_by_step",
        task="ARITH",
        template="none",
        max_seq_len=64,
        lr=1e-3,
        max_steps=1,
        save_every=1,
        train_file=str(path),
        ckpt_dir=str(root / "m1"),
        save_dir=str(save),
        max_batch_size=6,
        alpha=0.3,
        mi_estimator="authors",
        **flags,
    )
    assert json.load(open(save / "run_config.json"))["beta"] == 0.1
    logged = json.loads(open(save / "metrics.jsonl").readline())
    tok, model = load_tokenizer(tiny_tokenizer), load_model(str(root / "m1"))
    windows = {}
    with torch.no_grad():
        for task, field in (("label", "label"), ("rationale", "output")):
            pairs = [
                (tok.encode(PREFIX[task] + r["instruction"], bos=True), tok.encode(r[field], bos=False, eos=True))
                for r in records
            ]
            width = max(len(resp) for _, resp in pairs)
            logits = torch.stack([_window_logits(model, p, resp, width, tok.padding_id) for p, resp in pairs])
            real = torch.tensor([[t < len(resp) for t in range(width)] for _, resp in pairs])
            windows[task] = (logits, real)
        (label, label_real), (rationale, rationale_real) = windows["label"], windows["rationale"]
        assert not label_real.all() and not rationale_real.all()  # the batch has padding to pool over
        masks = (label_real, rationale_real) if mask_padding else ()
        ref = authors_reference(label, rationale, *masks).item() / len(records)
    assert logged["loss_mi"] == pytest.approx(ref, abs=1e-5)
    assert logged["loss"] == pytest.approx(
        0.3 * logged["loss_label"] + 0.7 * logged["loss_rationale"] + 0.1 * ref, abs=1e-5
    )


def test_mi_flags(root, dist1, tmp_path):
    base = {
        "objective": "step_by_step",
        "task": "ARITH",
        "train_file": str(root / "arith" / "train.json"),
        "ckpt_dir": str(root / "m1"),
        "save_dir": str(tmp_path / "s"),
        "max_steps": 1,
    }
    with pytest.raises(UserError) as e:
        train.main(**base, beta=0.1, mi_estimator="critic", mi_mask_padding=True)
    assert str(e.value) == (
        "--mi_mask_padding belongs to --mi_estimator authors (the only estimator that can pool over padding), "
        "not critic"
    )
    with pytest.raises(UserError, match="has no effect with --beta 0"):
        train.main(**base, beta=0.0, mi_estimator="authors")
    with pytest.raises(UserError, match="has no effect without --eval_rationale_task True"):
        train.main(**base, rationale_bleu="sentence_mean")
    with pytest.raises(UserError, match="--rationale_bleu 'nltk' is not one of corpus, sentence_mean"):
        train.main(**base, rationale_bleu="nltk", eval_rationale_task=True, label_file=base["train_file"])


# ----- calibration ----------------------------------------------------------------------------------
def authors_ece_equal_mass(allprobs, allpreds, alllabels):
    """xinchen9/cot_distillation_ACL2024 calib_metrics.py:34-78 (ece_equal_mass), verbatim but for the
    tab indentation and the commented-out lines."""
    probs_of_bins = {}
    preds_of_bins = {}
    labels_of_bins = {}

    for bin in range(100):  # noqa: A001 (their name, kept verbatim)
        probs_of_bins[bin] = []
        preds_of_bins[bin] = []
        labels_of_bins[bin] = []

    # Sort by prob
    data = zip(allprobs, allpreds, alllabels)
    data = sorted(data)
    allprobs, allpreds, alllabels = zip(*data)
    bin_num = 100
    num_samples_per_bin = math.ceil(len(alllabels) / bin_num)

    for i, (prob, pred, label) in enumerate(zip(allprobs, allpreds, alllabels)):
        bin = int(i / num_samples_per_bin)  # noqa: A001
        probs_of_bins[bin].append(prob)
        preds_of_bins[bin].append(pred)
        labels_of_bins[bin].append(label)

    ECE = 0

    for bin in range(100):  # noqa: A001 (their name, kept verbatim)
        probs = probs_of_bins[bin]
        preds = preds_of_bins[bin]
        labels = labels_of_bins[bin]

        avg_probs = sum(probs) / len(probs) if len(probs) != 0 else 0
        bin_correct = [int(pred == label) for pred, label in zip(preds, labels)]
        bin_acc = sum(bin_correct) / len(bin_correct) if len(bin_correct) != 0 else 0

        ECE += abs(bin_acc - avg_probs) * len(probs)

    return ECE / len(allprobs)


@pytest.mark.parametrize("n", [1221, 37])
def test_equal_mass_bins_are_their_ece_equal_mass(n):
    """Confidences on a grid of 0.01 (ties straddle the bin boundaries, which their sort of (prob,
    pred, label) tuples settles), token-id predictions and labels; equal-width bins give another ECE."""
    g = torch.Generator().manual_seed(n)
    conf = [round(x, 2) for x in torch.rand(n, generator=g).tolist()]
    preds = torch.randint(0, 4, (n,), generator=g).tolist()
    golds = torch.randint(0, 4, (n,), generator=g).tolist()
    correct = [p == y for p, y in zip(preds, golds)]
    got = calibration_bins(conf, correct, 100, "equal_mass", tiebreak=list(zip(preds, golds)))
    assert got["ece"] == pytest.approx(authors_ece_equal_mass(conf, preds, golds), abs=1e-12)
    per_bin = math.ceil(n / 100)
    full, rest = divmod(n, per_bin)
    assert [b["count"] for b in got["bins"]] == [per_bin] * full + [rest] * bool(rest) + [0] * (100 - full - bool(rest))
    assert sum(b["correct"] for b in got["bins"]) == sum(correct)
    width = calibration_bins(conf, correct, 100, "equal_width")["ece"]
    assert abs(width - got["ece"]) > 1e-3
    if n == 1221:  # 13 per bin: bins 0-92 full, 12 in bin 93, 94-99 empty
        assert [b["count"] for b in got["bins"]][92:95] == [13, 12, 0]


def _greedy(model, prompt, steps, eos):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt) :]


def _first_spelling(tok, ids):
    """The first token that is not a lone space ('▁' before digits): the tiny tokenizer, as LLaMA's,
    writes " 38" as '▁', '3', '8'."""
    return next(t for t in ids if tok.decode([t]).strip())


def test_calibration_confidence_and_token_correctness_by_hand(root, tiny_tokenizer, dist1, tmp_path):
    """infer.py calibration --correctness token --binning equal_mass on a tiny model, against the
    numbers computed here: the confidence is the model's probability of the answer token at the
    position that predicts it (for an answer at the start: the largest probability of the first
    step, the authors' intended confidence, uncertainty.py:48-52), correct means that token's id is
    the gold label's first token id (uncertainty.py:50-53 as meant), and the ECE is their
    ece_equal_mass of those numbers."""
    from safetensors.torch import load_file, save_file

    from engine.checkpoint import load_model
    from engine.text.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer)
    records = json.load(open(root / "arith" / "test.json"))
    # a model whose first answer token is the gold label's first token for some records: the random
    # model's favourite first token (a word-inner piece no label starts with) swapped in the head
    # with the first token of records[0]'s label; its head scaled up
    ckpt = tmp_path / "m"
    shutil.copytree(root / "m1", ckpt)
    weights = load_file(ckpt / "consolidated.00.safetensors")
    favourite = _greedy(load_model(str(root / "m1")), tok.encode(records[0]["instruction"], bos=True), 1, None)[0]
    wanted = _first_spelling(tok, tok.encode(records[0]["label"], bos=False))
    weights["output.weight"][[favourite, wanted]] = weights["output.weight"][[wanted, favourite]]
    weights["output.weight"] *= 30  # confident: probabilities far from uniform (the argmax unchanged)
    save_file(weights, ckpt / "consolidated.00.safetensors")
    model = load_model(str(ckpt))
    for r in records[::2]:
        r["label"] = records[0]["label"]
    data = tmp_path / "cal.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "cal.jsonl"
    infer.calibration(
        str(ckpt),
        str(data),
        str(out),
        task="ARITH",
        max_new_tokens=4,
        template="none",
        correctness="token",
        binning="equal_mass",
    )
    lines = [json.loads(x) for x in open(out)]
    summary = json.load(open(str(out) + ".summary.json"))
    confs, preds, golds = [], [], []
    with torch.no_grad():
        for r, line in zip(records, lines):
            prompt = tok.encode(r["instruction"], bos=True)
            tokens = _greedy(model, prompt, 4, tok.eos_id)
            k = line["answer_token_index"]
            probs = torch.softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
            at = probs[len(prompt) - 1 + k]  # the position that predicts answer token k
            assert line["confidence"] == pytest.approx(float(at[tokens[k]]), rel=1e-4)
            assert line["answer_token_id"] == tokens[k]
            gold = _first_spelling(tok, tok.encode(r["label"], bos=False))
            assert line["token_correct"] == (tokens[k] == gold) == line["correct"]
            if k == 0:  # the authors' confidence: the first step's largest probability
                assert line["confidence"] == pytest.approx(float(probs[len(prompt) - 1].max()), rel=1e-4)
            confs.append(float(at[tokens[k]]))
            preds.append(tokens[k])
            golds.append(gold)
    assert sum(line["answer_token_index"] == 0 for line in lines) >= len(lines) // 2
    assert 0 < sum(line["token_correct"] for line in lines) < len(lines)
    assert sum(line["answer_correct"] for line in lines) < sum(line["token_correct"] for line in lines)
    assert summary["binning"] == "equal_mass" and summary["num_bins"] == 100
    assert summary["ece"] == pytest.approx(authors_ece_equal_mass(confs, preds, golds), abs=1e-6)
    assert summary["accuracy"] == summary["token_accuracy"] == sum(p == y for p, y in zip(preds, golds)) / len(golds)


def test_calibration_flags_are_checked(root, tmp_path):
    with pytest.raises(UserError, match="--binning 'quantile' is not one of equal_width, equal_mass"):
        infer.calibration(str(root / "m1"), "x.json", str(tmp_path / "o.jsonl"), task="ARITH", binning="quantile")
    with pytest.raises(UserError, match="--correctness 'first' is not one of answer, token"):
        infer.calibration(str(root / "m1"), "x.json", str(tmp_path / "o.jsonl"), task="ARITH", correctness="first")


# ----- rationale BLEU -------------------------------------------------------------------------------
# HF evaluate (huggingface/evaluate @ a7dd338) metrics/bleu/tokenizer_13a.py:46-52, 80-100 (Tokenizer13a)
_REGEX_13A = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def _tokenizer_13a(line):
    line = line.replace("<skipped>", "")
    line = line.replace("-\n", "")
    line = line.replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"')
        line = line.replace("&amp;", "&")
        line = line.replace("&lt;", "<")
        line = line.replace("&gt;", ">")
    line = " {} ".format(line)
    for _re, repl in _REGEX_13A:
        line = _re.sub(repl, line)
    return line.split()


def _get_ngrams(segment, max_order):
    """tensorflow/nmt @ 263d6dc nmt/scripts/bleu.py _get_ngrams."""
    ngram_counts = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(0, len(segment) - order + 1):
            ngram = tuple(segment[i : i + order])
            ngram_counts[ngram] += 1
    return ngram_counts


def _compute_bleu(reference_corpus, translation_corpus, max_order=4, smooth=False):
    """tensorflow/nmt @ 263d6dc nmt/scripts/bleu.py compute_bleu, which evaluate's bleu.py:20 loads."""
    matches_by_order = [0] * max_order
    possible_matches_by_order = [0] * max_order
    reference_length = 0
    translation_length = 0
    for references, translation in zip(reference_corpus, translation_corpus):
        reference_length += min(len(r) for r in references)
        translation_length += len(translation)
        merged_ref_ngram_counts = collections.Counter()
        for reference in references:
            merged_ref_ngram_counts |= _get_ngrams(reference, max_order)
        translation_ngram_counts = _get_ngrams(translation, max_order)
        overlap = translation_ngram_counts & merged_ref_ngram_counts
        for ngram in overlap:
            matches_by_order[len(ngram) - 1] += overlap[ngram]
        for order in range(1, max_order + 1):
            possible_matches = len(translation) - order + 1
            if possible_matches > 0:
                possible_matches_by_order[order - 1] += possible_matches
    precisions = [0] * max_order
    for i in range(0, max_order):
        if smooth:
            precisions[i] = (matches_by_order[i] + 1.0) / (possible_matches_by_order[i] + 1.0)
        else:
            if possible_matches_by_order[i] > 0:
                precisions[i] = float(matches_by_order[i]) / possible_matches_by_order[i]
            else:
                precisions[i] = 0.0
    if min(precisions) > 0:
        p_log_sum = sum((1.0 / max_order) * math.log(p) for p in precisions)
        geo_mean = math.exp(p_log_sum)
    else:
        geo_mean = 0
    ratio = float(translation_length) / reference_length
    if ratio > 1.0:
        bp = 1.0
    else:
        bp = math.exp(1 - 1.0 / ratio)
    bleu = geo_mean * bp
    return (bleu, precisions, bp, ratio, translation_length, reference_length)


def authors_bleu(predictions, references):
    """cot_eval_metrics.py:13-14 `evaluate.load("bleu").compute(predictions, references)`: evaluate's
    metrics/bleu/bleu.py:115-133 (a list of strings becomes one-reference lists, 13a tokens)."""
    if isinstance(references[0], str):
        references = [[ref] for ref in references]
    references = [[_tokenizer_13a(r) for r in ref] for ref in references]
    predictions = [_tokenizer_13a(p) for p in predictions]
    return {"bleu": _compute_bleu(references, predictions, max_order=4, smooth=False)[0]}


def authors_mean_bleu(predictions, rationales):
    """explain_test.py:55-57 and :114: per record calculate_bleu_score([pred_labels], [rationale])['bleu'],
    then np.mean(all_bleu_scs)."""
    return sum(authors_bleu([p], [r])["bleu"] for p, r in zip(predictions, rationales)) / len(predictions)


def test_sentence_mean_bleu_is_their_evaluate_bleu(capsys, tmp_path):
    # the pairs: our corpus BLEU 37.5 (0-100) against their 0.204 (one pair has no 4-gram match)
    hyps = ["So 47 + 38 = 85 . So the answer is 85 .", "the cat is on the mat"]
    refs = ["So 7 + 8 = 15 , carry 1 . So the answer is 85 .", "there is a cat on the mat"]
    theirs = authors_mean_bleu(hyps, refs)
    assert theirs == pytest.approx(0.20413345749156683, abs=1e-12)
    assert mean_sentence_bleu(hyps, [[r] for r in refs])["bleu"] == pytest.approx(theirs, abs=1e-12)
    assert corpus_bleu(hyps, [[r] for r in refs])["bleu"] == pytest.approx(37.463506270939654, abs=1e-9)
    # a zero-match order: theirs is exactly 0, our corpus BLEU smooths it to a positive score
    ref = "The answer must be a place where people keep money. Of the above choices, only bank is such a place."
    assert authors_bleu(["money is such a bank where people keep"], [ref])["bleu"] == 0.0
    assert sentence_bleu("money is such a bank where people keep", [ref]) == 0.0
    assert corpus_bleu(["money is such a bank where people keep"], [[ref]])["bleu"] > 1
    # brevity against the SHORTEST reference (ours, corpus: the closest): two references of 5 and 10 tokens
    hyp, two = "a b c d e f g h", ["a b c d e", "a b c d e f g h x y"]
    assert sentence_bleu(hyp, two) == pytest.approx(authors_bleu([hyp], [two])["bleu"], abs=1e-12)
    assert sentence_bleu(hyp, two) == pytest.approx(1.0) and corpus_bleu([hyp], [two])["brevity_penalty"] < 1
    # a partial match with a brevity penalty, and a hypothesis shorter than 4 tokens
    for h in ("Of the above choices , only bank keeps money", "only bank"):
        assert sentence_bleu(h, [ref]) == pytest.approx(authors_bleu([h], [ref])["bleu"], abs=1e-12)
    assert 0 < sentence_bleu("Of the above choices , only bank keeps money", [ref]) < 1
    # an empty prediction: their compute_bleu divides by zero; ours scores it 0 and counts it
    with pytest.raises(ZeroDivisionError):
        authors_bleu([""], [ref])
    mixed = mean_sentence_bleu(["", ref], [[ref], [ref]])
    assert mixed == {"bleu": 0.5, "records": 2, "empty_predictions": 1}
    # infer.py bleu --bleu sentence_mean, from files
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"output": h}) + "\n" for h in hyps))
    (tmp_path / "r.json").write_text(json.dumps([{"output": r} for r in refs]))
    infer.bleu(str(tmp_path / "p.jsonl"), str(tmp_path / "r.json"), bleu="sentence_mean")
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "sentence_mean" and printed["bleu"] == pytest.approx(theirs, abs=1e-6)
    corpus = file_bleu(BleuArgs(predictions_file=str(tmp_path / "p.jsonl"), references_file=str(tmp_path / "r.json")))
    assert corpus["kind"] == "corpus" and corpus["bleu"] == pytest.approx(37.4635, abs=1e-4)
    with pytest.raises(UserError, match="--bleu 'nltk' is not one of corpus, sentence_mean"):
        infer.bleu(str(tmp_path / "p.jsonl"), str(tmp_path / "r.json"), bleu="nltk")


def test_training_evaluator_reports_the_authors_bleu(root, tiny_tokenizer, dist1):
    """--rationale_bleu sentence_mean: the evaluator's rationale_sentence_bleu is their mean of per-record
    BLEU over the decoded rationales (here fixed texts stand in for the decoded ones)."""
    from engine.checkpoint import load_model
    from engine.distill.step_by_step.evaluator import StepByStepEvaluator
    from engine.text.tokenizer import load_tokenizer
    from engine.train.evaluator import Decoding

    tok, model = load_tokenizer(tiny_tokenizer), load_model(str(root / "m1"))
    records = json.load(open(root / "arith" / "test.json"))[:3]
    texts = [records[0]["output"], records[1]["output"].split(".")[0] + " .", ""]
    results = {}
    for kind in ("sentence_mean", "corpus"):
        ev = StepByStepEvaluator(records, tok, dist1, Decoding("ARITH", 2, 4, "none"), True, kind)
        ev.rationale.texts = lambda model: texts
        results[kind] = ev(model)
    theirs = sum(authors_bleu([t], [r["output"]])["bleu"] if t else 0.0 for t, r in zip(texts, records)) / len(records)
    assert results["sentence_mean"]["rationale_sentence_bleu"] == pytest.approx(theirs, abs=1e-12)
    assert "rationale_bleu" not in results["sentence_mean"]
    assert results["corpus"]["rationale_bleu"] == pytest.approx(
        corpus_bleu(texts, [[r["output"]] for r in records])["bleu"], abs=1e-9
    )
