"""Supervised distillation on teacher rationales (fire CLI), under torchrun:

  torchrun --nproc_per_node 8 train.py --task GSM8K --ckpt_dir C --save_dir S \
      --train_file data/GSM8K/train.json --label_file data/GSM8K/test.json \
      --model_type lora-llama-1-7b --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 \
      --epochs 24 --use_float16 True

  torchrun --nproc_per_node 8 train.py --objective step_by_step --alpha 0.5 [--label_type gt|llm] \
      [--beta 0.1 --mi_estimator authors|pooled_distribution_ce|critic] ...   # distilling step-by-step (+ the MI term)

  torchrun --nproc_per_node 8 train.py --objective teacher_kl --teacher_file teacher.topk.jsonl ...
      (or --teacher_ckpt_dir T: the teacher's next-token distributions, see README)

  torchrun --nproc_per_node 8 train.py --objective on_policy --teacher_ckpt_dir T --lmbda 1 \
      --divergence jsd --jsd_beta 0.5 ...      # on-policy distillation (GKD): the student samples, T scores

Every flag, its default and its help: engine/train/args.py (TrainArgs, the flags every objective shares)
and each objective's package in engine/distill/ (sft, step_by_step, teacher_kl, on_policy).
"""
from engine.distill.on_policy.args import OnPolicyArgs
from engine.distill.sft import SFTArgs
from engine.distill.step_by_step.args import StepByStepArgs
from engine.distill.teacher_kl.args import TeacherKLArgs
from engine.runtime.cli import launcher, run_cli


def train(args) -> None:
    from engine.train.launch import run_training

    run_training(args)


main = launcher(SFTArgs, StepByStepArgs, TeacherKLArgs, OnPolicyArgs, run=train)

if __name__ == "__main__":
    run_cli(main)
