"""The MCC-KD authors' computations, written out from their code (homzer/MCC-KD), for the tests to
compare ours against. Two versions exist: DEC23 (b7b780d2e97bffe1ddd60fd235313e504434a3dc, 2023-12,
the first public code and the one that runs: train_mcc.py calls DistributedTrainer.train_mcc) and
HEAD (86d263ecb66b0970362c9fb6a4272cfc1fb9e94a, 2024-03, a rewrite whose MCC trainer cannot run:
its CE line passes [B, T] tokens as the target of a [B, T, V] CrossEntropyLoss). The loss here is
DEC23's; the accuracy denominator HEAD's (DEC23 keeps unanswered items, as ours does).

Their layout: tokens = BOS + encode(instruction) + encode(output) + EOS, right-padded; labels are
the next tokens (DEC23 src/trainer.py:59-73, `labels[i, instr_len - 1 : instr_len - 1 + output_len]
= output_ids`), the same as ours; indices [s, e) count over those tokens, as our whole-sequence spans
do (MultiRationaleData.example)."""

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def dec23_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DEC23 src/utils.py:137-165 (cross_entropy, as src/trainer.py:163-164 calls it with
    label_mask): the mean over the batch of each sequence's mean over its labelled tokens."""
    logits = logits.float()
    weights = (labels != IGNORE).float()  # their label_mask = labels != pad_id (:70-71)
    log_probs = F.log_softmax(logits, dim=-1)  # utils.py:156
    nll = -log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # :158-159, one-hot sum
    nrt = torch.sum(weights * nll, dim=-1)  # :162
    dnm = torch.sum(weights, dim=-1) + 1e-8  # :163
    return torch.mean(nrt / dnm, dim=0)  # :164


def dec23_kl_div_loss(p: torch.Tensor, q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """DEC23 src/utils.py:168-187 (kl_div, kl_div_loss)."""

    def kl_div(source, target):  # :168-171
        return torch.sum(source * torch.log(source) - source * torch.log(target), dim=-1)

    p_loss, q_loss = kl_div(p, q), kl_div(q, p)  # :176-177
    weights = weights.float()
    p_loss = (p_loss * weights).sum(dim=-1) / (weights.sum(dim=-1) + 1e-12)  # :180-183
    q_loss = (q_loss * weights).sum(dim=-1) / (weights.sum(dim=-1) + 1e-12)
    return (p_loss.mean() + q_loss.mean()) / 2  # :184-186


def dec23_span_kl(logits1, logits2, indices1, indices2, temperature: float, max_seq_len: int) -> torch.Tensor:
    """DEC23 src/trainer.py:167-195: the logits AT the span positions [s, e) of each row, zero-padded
    to the longest span; rows whose end is >= max_seq_len dropped; the mask from P; softmax(. / T)
    on BOTH sides; kl_div_loss. indices: [B, 2] (their `indices1[0]` stacked and transposed, :168-170)."""
    indices1, indices2 = torch.as_tensor(indices1), torch.as_tensor(indices2)
    bzs, vocab_size = indices1.shape[0], logits1.shape[-1]
    max_len1 = int(max(indices1[:, 1] - indices1[:, 0]))  # :173
    max_len2 = int(max(indices2[:, 1] - indices2[:, 0]))  # :174
    assert max_len1 == max_len2  # :175
    P = torch.zeros(bzs, max_len1, vocab_size)  # :176
    Q = torch.zeros(bzs, max_len2, vocab_size)  # :177
    kept = []
    for i in range(bzs):
        if indices1[i, 1] >= max_seq_len or indices2[i, 1] >= max_seq_len:  # :180
            continue
        P[i, : indices1[i, 1] - indices1[i, 0], :] = logits1[i, indices1[i, 0] : indices1[i, 1], :]  # :184
        Q[i, : indices2[i, 1] - indices2[i, 0], :] = logits2[i, indices2[i, 0] : indices2[i, 1], :]  # :185
        kept.append(i)
    if not kept:
        return torch.tensor(0.0)  # :195
    P, Q = P[kept], Q[kept]  # :188-189
    M = torch.sum(P, dim=-1) != 0  # :190
    P = torch.softmax(P / temperature, dim=-1)  # :191
    Q = torch.softmax(Q / temperature, dim=-1)  # :192
    return dec23_kl_div_loss(P, Q, weights=M)  # :193


def dec23_loss(logits1, labels1, logits2, labels2, indices1, indices2, alpha, temperature, max_seq_len) -> dict:
    """DEC23 src/trainer.py:163-197: ce = (ce1 + ce2) * 0.5; loss = ce + alpha * kl."""
    ce = (dec23_cross_entropy(logits1, labels1) + dec23_cross_entropy(logits2, labels2)) * 0.5  # :163-165
    kl = dec23_span_kl(logits1, logits2, indices1, indices2, temperature, max_seq_len)  # :167-195
    return {"loss": ce + alpha * kl, "ce": ce, "kl": kl}  # :197


def ours_reference(logits1, labels1, logits2, labels2, indices1, indices2, alpha, temperature, **variant) -> dict:
    """What each of our settings computes, from the same inputs: span_logits ours compares the
    predictions OF the span tokens (the slice [s - 1, e - 1)), authors the slice [s, e) as DEC23;
    ce_reduction token is the token mean over both rationales' labelled tokens, sequence DEC23's
    mean of per-sequence means. The KL's reduction is DEC23's in both (per pair, then the mean)."""
    shift = 0 if variant.get("span_logits", "ours") == "authors" else 1
    idx1 = torch.as_tensor(indices1) - shift
    idx2 = torch.as_tensor(indices2) - shift
    kl = dec23_span_kl(logits1, logits2, idx1, idx2, temperature, max_seq_len=10**9)
    if variant.get("ce_reduction", "token") == "sequence":
        ce = (dec23_cross_entropy(logits1, labels1) + dec23_cross_entropy(logits2, labels2)) * 0.5
    else:
        logits, labels = torch.cat([logits1, logits2]), torch.cat([labels1, labels2])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
    return {"loss": ce + alpha * kl, "ce": ce, "kl": kl}


def head_accuracy(predictions: Sequence[Optional[str]], correct: Sequence[bool]) -> dict:
    """HEAD src/evaluator.py:189-197 (GSM8KEvaluator.forward; :320-326 the same for choices): an
    output without an answer counts in `miss` and is never fed to the meter; the others feed it 1 or
    0; accuracy = meter.avg (:109-113; src/entities.py:102-111 AverageMeter) = correct / answered."""
    miss, meter = 0, []
    for pred, ok in zip(predictions, correct):
        if pred is None or len(pred) == 0:  # :189-190
            miss += 1
        else:
            meter.append(1 if ok else 0)  # :192-197
    return {"accuracy": sum(meter) / len(meter) if meter else 0.0, "miss": miss, "answered": len(meter)}


def dec23_extract_predict(output: str, task: str) -> list:
    """DEC23 src/evaluator.py:44-59 (extract_predict): the last line of output.strip(); numeric
    tasks every (-?\\d+)(,?\\d+)?(\\.\\d+)? match joined (commas kept), choice tasks every A-G."""
    _output = output.strip()  # :45
    endline = _output.split("\n")[-1]  # :47
    if task == "CSQA":  # ANSWER_TYPE_CHOICE
        matches = re.findall(r"[A-G]", endline)  # :51
    else:  # ANSWER_TYPE_NUMERIC
        matches = re.findall(r"(-?\d+)(,?\d+)?(\.\d+)?", endline)  # :49
    return ["".join(match) for match in matches]  # :56-58


def dec23_hit(output: str, label: str, task: str) -> bool:
    """DEC23 src/evaluator.py:61-67: a hit when the label is the last prediction."""
    return label in dec23_extract_predict(output, task)[-1:]  # :65
