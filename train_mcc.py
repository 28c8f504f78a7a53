"""MCC-KD: multi-rationale consistent distillation (fire CLI), under torchrun:

  torchrun --nproc_per_node 8 train_mcc.py --task GSM8K --ckpt_dir C --save_dir S \
      --train_file data/GSM8K/train-multi-cots-preview.json --label_file data/GSM8K/test.json \
      --model_type lora-llama-1-7b --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 \
      --epochs 24 --use_float16 True [--alpha 0.01] [--temperature 1.0] [--num_rationales 2]
      [--span_logits ours|authors] [--ce_reduction token|sequence]

Loss per question: mean cross-entropy of its rationales + alpha x mean over pairs of the symmetric
KL between the temperature-softened predictions of their answer-span tokens (--span_logits authors
--ce_reduction sequence: as the MCC-KD authors' code computes it). Every flag, its default and its
help: engine/distill/mcc/args.py (MCCArgs).
"""
from engine.distill.mcc.args import MCCArgs
from engine.runtime.cli import launcher, run_cli


def train(args) -> None:
    from engine.train.launch import run_training

    run_training(args)


main = launcher(MCCArgs, run=train)

if __name__ == "__main__":
    run_cli(main)
