"""Supervised distillation on teacher rationales (fire CLI), under torchrun:

  torchrun --nproc_per_node 8 train.py --task GSM8K --ckpt_dir C --save_dir S \
      --train_file data/GSM8K/train.json --label_file data/GSM8K/test.json \
      --model_type lora-llama-1-7b --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 \
      --epochs 24 --use_float16 True

Every flag, its default and its help: engine/args.py (TrainArgs).
"""
from engine.args import TrainArgs, launcher
from engine.cli import run_cli

main = launcher(TrainArgs)

if __name__ == "__main__":
    run_cli(main)
