"""What FranxYao/FlanT5-CoT-Specialization (Fu et al. 2023) computes, written out from the authors'
code at commit a8ffd51afa4f88b9a8fe160c093fb891af5a1cc7, independently of engine/ (numpy/torch only):
the reference the tests of the authors' variants (--kl_formats, --loss_reduction micro_batch_mean,
--teacher_probs raw, --eos_target one_hot, --alignment authors, make_formats --style authors) compare
against. "nb-dtw" is notebooks/dev_align_codex_to_flan_t5_dtw.ipynb (line numbers of the .ipynb
JSON). Their student is Flan-T5 (encoder-decoder); here the same computations are placed on a
decoder-only batch: logits [B, T, V] whose row t predicts labels[:, t], -100 where no loss is taken
(their decoder attention mask `answer_mask`, answer tokens and the final EOS, is labels != -100)."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
SP = "\u2581"  # sentencepiece's word-start marker


# ----- point 8: the loss -------------------------------------------------------------------------
def kl_divergence(p0, p1, eps=1e-10):
    """src/utils.py:632-640: kld = p0 * torch.log(p0 / (p1 + eps) + eps); kld.sum(dim=-1).
    p0 the teacher's dense target (not renormalised), p1 the student's softmax probabilities."""
    return (p0 * torch.log(p0 / (p1 + eps) + eps)).sum(dim=-1)


def loss_match_dist(logits, target_dist, labels):
    """train_distill_simple.py:30-38: (kld * mask).sum() / mask.sum(), the micro-batch's token mean."""
    mask = (labels != IGNORE).to(logits.dtype)
    kld = kl_divergence(target_dist.to(logits.dtype), F.softmax(logits, dim=-1))
    return (kld * mask).sum() / mask.sum()


def loss_nll(logits, labels):
    """train_distill_simple.py:50-55: per-token cross-entropy, masked, / mask.sum() (answer_label is 1
    throughout the released pipeline, src/data_utils.py:496,516,538,560, so :54 never negates)."""
    mask = (labels != IGNORE).to(logits.dtype)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum()


def micro_batch_loss(logits, labels, batch_type, loss_type, target_dist=None, grad_accum_steps=1):
    """train_distill_simple.py:84-94, 104: match_sample = NLL on every batch; match_distribution = KL
    alone when 'chain_of_thought' is in the batch's type (one type per micro-batch,
    src/data_utils.py:316,335-336), NLL otherwise; then / grad_accum_steps. The optimizer step sums
    grad_accum_steps of these (:105-115): the mean of the micro-batches' token means."""
    if loss_type == "match_sample":
        loss = loss_nll(logits, labels)
    elif loss_type == "match_distribution":
        loss = (loss_match_dist(logits, target_dist, labels) if "chain_of_thought" in batch_type
                else loss_nll(logits, labels))
    else:
        raise NotImplementedError(loss_type)
    return loss / grad_accum_steps


# ----- point 9: the targets ----------------------------------------------------------------------
def copied_distribution(entries, vocab: Callable[[str], bool]) -> "OrderedDict[str, float]":
    """nb-dtw:1434-1439: the (text, prob) entries of a teacher position (the sampled token first, then
    the API's top 5: scripts/codex_decode_gsm8k.py:141-147), carried into the student vocabulary by
    text (' ' -> '\u2581'), texts it lacks dropped, the first occurrence kept, NOT renormalised."""
    probs: "OrderedDict[str, float]" = OrderedDict()
    for t, p in entries:
        flan_t = t.replace(" ", SP)
        if vocab(flan_t) and flan_t not in probs:
            probs[flan_t] = p
    return probs


def targets_from_topk(own_ids, own_logprobs, topk_ids, topk_logprobs, copy, student_ids, teacher_to_student=None):
    """The authors' per-position targets ({student id: prob}) from a top-k teacher: at a copied
    position the teacher's own token with its own probability first, then its top k, each
    exp(logprob), mapped by id (teacher_to_student: teacher id -> student id or -1, dropped),
    duplicates keep the first (nb-dtw:1434-1439); elsewhere one-hot {student token: 1.0}
    (nb-dtw:1441,1444). Rows are indexed per student position."""
    out = []
    for i, sid in enumerate(student_ids):
        if not copy[i]:
            out.append({int(sid): 1.0})
            continue
        d: Dict[int, float] = {}
        for tid, lp in [(own_ids[i], own_logprobs[i])] + list(zip(topk_ids[i], topk_logprobs[i])):
            s = int(tid) if teacher_to_student is None else int(teacher_to_student[int(tid)])
            if s >= 0 and s not in d:
                d[s] = float(np.exp(lp))
        out.append(d)
    return out


def target_dist_decoder(per_step_ids, labels, vocab_size, eos_id):
    """src/data_utils.py:312-325 on a decoder-only batch: the k-th labelled position of sequence b gets
    per_step_ids[b][k], the last labelled position (the EOS) one-hot EOS (:324-325), zeros elsewhere."""
    target = torch.zeros(labels.shape[0], labels.shape[1], vocab_size, dtype=torch.float64)
    for b in range(labels.shape[0]):
        pos = (labels[b] != IGNORE).nonzero().flatten().tolist()
        steps = per_step_ids[b]
        assert len(pos) == len(steps) + 1, "one labelled position per answer token, then the EOS"
        for t, step_p in zip(pos, steps):
            for i, p in step_p.items():
                target[b, t, i] = p
        target[b, pos[-1], eos_id] = 1.0
    return target


# ----- point 10: the alignment -------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """editdistance.eval (src/utils.py:4): unit-cost Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def dist_fn(codex_a: str, flan_b: str) -> int:
    """nb-dtw:504-508: editdistance of codex_a.replace(' ', '') and flan_b.replace('\u2581', '')."""
    return levenshtein(codex_a.replace(" ", ""), flan_b.replace(SP, ""))


def dtw(series_1, series_2, norm_func):
    """src/utils.py:649-692 line for line (a modified talcs/simpledtw): inf border, M[0,0] = 0,
    M[i+1,j+1] = cost + min(up, left, diag); backtrack from the end recording (i, j), moving to
    np.argmin([diag, up, left]) (the first minimum: ties diagonal, then series_1, then series_2);
    (0, 0) last. Returns (matches, cost, mappings_series_1, mappings_series_2, matrix)."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    matches = []
    mappings_series_1 = [list() for _ in range(matrix.shape[0])]
    mappings_series_2 = [list() for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        matches.append((i, j))
        mappings_series_1[i].append(j)
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i -= 1
            j -= 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    matches.append((0, 0))
    mappings_series_1[0].append(0)
    mappings_series_2[0].append(0)
    matches.reverse()
    for mp in mappings_series_1 + mappings_series_2:
        mp.reverse()
    return matches, matrix[-1, -1], mappings_series_1, mappings_series_2, matrix


def alignment(codex_tokens: Sequence[str], flan_tokens: Sequence[str]):
    """nb-dtw:1424-1445: dtw(codex_tokens, flan_tokens, norm_func=dist_fn) (the teacher is series_1);
    student token i copies teacher token j iff flan2codex[i] == [j] and
    flan_tokens[i] == codex_tokens[j].replace(' ', '\u2581') (the teacher side is not checked).
    Returns (match per student token, -1: one-hot; flan2codex)."""
    _, _, _, flan2codex, _ = dtw(codex_tokens, flan_tokens, norm_func=dist_fn)
    match = [m[0] if len(m) == 1 and flan_tokens[i] == codex_tokens[m[0]].replace(" ", SP) else -1
             for i, m in enumerate(flan2codex)]
    return match, flan2codex


def transform_step_probs(per_step_prob, flan_tokens, vocab):
    """nb-dtw:1404-1446 (transform_step_probs): the sample's filters (' step', '\\n' first; newline(s),
    '\\n' last; else rejected), alignment of per_step_prob[2:-2], and per flan token the copied
    distribution or one-hot {token: 1.0}."""
    if per_step_prob[0][0][0] != " step" or per_step_prob[1][0][0] != "\n":
        return -1, None
    if per_step_prob[-2][0][0] not in ["\n", "\n\n"] or per_step_prob[-1][0][0] != "\n":
        return -1, None
    body = per_step_prob[2:-2]
    match, _ = alignment([s[0][0] for s in body], flan_tokens)
    return 1, [copied_distribution(body[j], vocab) if j >= 0 else {flan_tokens[i]: 1.0} for i, j in enumerate(match)]


def alignment_decoded(teacher_texts, student_texts) -> List[int]:
    """The same rule on decoded texts (a sentencepiece student's '\u2581' read as ' '): the cost strips ' '
    on both sides, a copy needs the decoded texts equal. Identical to alignment() on sentencepiece."""
    _, _, _, s2t, _ = dtw(teacher_texts, student_texts,
                          norm_func=lambda a, b: levenshtein(a.replace(" ", ""), b.replace(" ", "")))
    return [m[0] if len(m) == 1 and student_texts[i] == teacher_texts[m[0]] else -1 for i, m in enumerate(s2t)]


# ----- point 11: the formats ---------------------------------------------------------------------
def get_question_or_cot(q: str) -> str:
    """src/data_utils.py:235-236."""
    return "".join(q.split(": ")[1:]).strip()


def get_answer_only(a: str):
    """src/data_utils.py:238-245."""
    a = a.split(": ")[1].strip()
    return "The answer is" + a.split("The answer is")[1] if "The answer is" in a else None


def sample_in_context_example(gsm8k_train, num, is_cot, rng) -> str:
    """src/data_utils.py:247-266: num GSM8K gold train examples drawn without replacement (:248),
    '<<...>>' removed (:256-257), each demo ending with a blank line."""
    prompt = ""
    for idx in rng.choice(len(gsm8k_train), num, replace=False):
        ex = gsm8k_train[int(idx)]
        if is_cot:
            ans = re.sub("<<.*?>>", "", ex["answer"].split("####")[0])
            ans += "The answer is " + ex["answer"].split("####")[1].strip()
            prompt += "Q: " + ex["question"] + "\nLet's think step by step\n" + ans + "\n\n"
        else:
            prompt += "Q: " + ex["question"] + "\nA: The answer is " + ex["answer"].split("####")[1].strip() + "\n\n"
    return prompt


def build_formats(question, predictions, labels, gold, gsm8k_train, num_in_context_sample, rng) -> dict:
    """src/data_utils.py:481-563 (process_data_format) for one question ('Question N: ...'), its
    samples ('Model output i: \\n...') and their labels (1 correct): zero-shot / in-context answer-only
    ONE per question from the first correct sample get_answer_only can read (break, :500, :542);
    zero-shot / in-context CoT one per correct sample (:509, :552); prompts at :489, :510, :531, :554."""
    q = get_question_or_cot(question)
    out = {k: [] for k in ("zero_shot_answer_only", "zero_shot_chain_of_thought", "in_context_answer_only",
                           "in_context_chain_of_thought")}
    for ai, li in zip(predictions, labels):
        if li == 1 and get_answer_only(ai) is not None:
            out["zero_shot_answer_only"].append({"question": "Q: " + q + " A:", "answer": get_answer_only(ai)})
            break
    for ai, li in zip(predictions, labels):
        if li == 1:
            out["zero_shot_chain_of_thought"].append({"question": "Q: " + q + "\nLet's think step by step",
                                                      "answer": get_question_or_cot(ai)})
    for ai, li in zip(predictions, labels):
        if li == 1:
            prompt = sample_in_context_example(gsm8k_train, num_in_context_sample, False, rng)
            if get_answer_only(ai) is not None:
                out["in_context_answer_only"].append({"question": prompt + "Q: " + q + "\nA:",
                                                      "answer": get_answer_only(ai)})
                break
    for ai, li in zip(predictions, labels):
        if li == 1:
            prompt = sample_in_context_example(gsm8k_train, num_in_context_sample, True, rng)
            out["in_context_chain_of_thought"].append({"question": prompt + "Q: " + q + "\nLet's think step by step",
                                                       "answer": get_question_or_cot(ai)})
    return out
