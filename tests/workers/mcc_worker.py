"""torchrun worker: the MCC-KD task's loss (train_mcc.py's own code path: MultiRationaleData, MCCTask,
vocabulary-parallel CE, span gathering) at the launch's tensor-parallel size, for each setting of
--span_logits / --ce_reduction, beside the authors' computation (tests/mcc_authors.py) on the full
logits of the same model; rank 0 saves the results.  Usage: mcc_worker.py CKPT_DIR OUT.pt"""

import os
import sys

import torch

from tests.workers import run

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

ALPHA, TEMPERATURE, HEAD_SCALE = 0.7, 1.3, 25.0
VARIANTS = [
    {"span_logits": "ours", "ce_reduction": "token"},
    {"span_logits": "authors", "ce_reduction": "token"},
    {"span_logits": "ours", "ce_reduction": "sequence"},
    {"span_logits": "authors", "ce_reduction": "sequence"},
]


def records():
    """Three questions, two rationales each: rationales of different lengths (so a token mean and a
    mean of sequence means differ) and answers of 1, 2 and 3 digit tokens (so a mean over pairs and
    a mean over span tokens differ)."""
    return [
        {
            "instruction": "What is 3 + 4 ?",
            "label": "7",
            "output": [
                "3 + 4 = 7 . Therefore, the answer is 7 .",
                "4 + 3 = 7 . 7 is the sum . Therefore, the answer is 7 .",
            ],
        },
        {
            "instruction": "What is 100 + 25 ?",
            "label": "125",
            "output": [
                "100 + 25 = 125 . Therefore, the answer is 125 .",
                "25 + 100 = 125 . Therefore, the answer is 125 .",
            ],
        },
        {
            "instruction": "What is 30 + 6 ?",
            "label": "36",
            "output": [
                "30 + 6 = 36 . 6 + 30 = 36 too . Therefore, the answer is 36 .",
                "Therefore, the answer is 36 .",
            ],
        },
    ]


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def mcc_task_losses(ckpt_dir: str, head_scale: float = HEAD_SCALE) -> dict:
    """Per variant: our normalised loss parts (ce, kl, loss, as the trainer forms them), the
    authors' DEC23 loss and our settings' reference from the full logits, and the largest gradient
    difference between our loss and that reference (this rank's shard of every weight)."""
    from engine.checkpoint import load_model
    from engine.distill.mcc.data import MultiRationaleData
    from engine.distill.mcc.task import MCCTask
    from engine.text.tokenizer import load_tokenizer
    from tests.mcc_authors import dec23_loss, ours_reference

    tok = load_tokenizer(ckpt_dir)
    model = load_model(ckpt_dir, dtype=torch.float32, device="cpu")
    model.train()
    with torch.no_grad():  # a random model predicts nearly uniformly: sharpen it, so the KL term counts
        model.head_weight.mul_(head_scale)
    data = MultiRationaleData(records(), tok, 128, template="none", num_rationales=2, task="ARITH")
    assert len(data) == 3, data.describe()
    out = {}
    for v in VARIANTS:
        task = MCCTask(data, "cpu", ALPHA, TEMPERATURE, **v)
        batch = task.micro_batch(list(range(len(data))), 0)
        model.zero_grad()
        sums = task.loss_sums(model, batch)
        parts = {k: sums[k] / max(batch.counts[k], 1) for k in sums}  # as the trainer normalises
        loss = parts["ce"] + ALPHA * parts["kl"]
        loss.backward()
        ours_grads = _grads(model)
        model.zero_grad()
        logits = model(batch.inputs)  # full vocabulary, differentiable through the gather
        spans = [data.example(q, j)[2] for q in data.keep for j in data.choose(q, 0)]
        args = (logits[0::2], batch.labels[0::2], logits[1::2], batch.labels[1::2], spans[0::2], spans[1::2])
        ref = ours_reference(*args, ALPHA, TEMPERATURE, **v)
        ref["loss"].backward()
        diff = max((a - b).abs().max().item() for a, b in zip(ours_grads, _grads(model)))
        dec23 = dec23_loss(*args, ALPHA, TEMPERATURE, max_seq_len=128)
        key = f"{v['span_logits']}/{v['ce_reduction']}"
        out[key] = {
            "ours": {k: x.item() for k, x in {**parts, "loss": loss.detach()}.items()},
            "reference": {k: x.item() for k, x in ref.items()},
            "dec23": {k: x.item() for k, x in dec23.items()},
            "grad_diff": diff,
            "grad_scale": max(g.abs().max().item() for g in ours_grads),
        }
    return out


def records_file(path: str) -> str:
    import json

    with open(path, "w") as f:
        json.dump(records(), f)
    return path


def main(ckpt_dir, out):
    from engine.runtime import distributed

    info = distributed.setup(device="cpu")
    result = mcc_task_losses(ckpt_dir)
    if info.is_main:
        torch.save(result, out)
    distributed.barrier()


if __name__ == "__main__":
    run(main)
