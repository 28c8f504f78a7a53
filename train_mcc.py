"""MCC-KD: multi-rationale consistent distillation (fire CLI), under torchrun:

  torchrun --nproc_per_node 8 train_mcc.py --task GSM8K --ckpt_dir C --save_dir S \
      --train_file data/GSM8K/train-multi-cots-preview.json --label_file data/GSM8K/test.json \
      --model_type lora-llama-1-7b --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 \
      --epochs 24 --use_float16 True [--alpha 0.01] [--temperature 1.0] [--num_rationales 2]

Loss per question: mean cross-entropy of its rationales + alpha x mean over pairs of the symmetric
KL between the temperature-softened predictions of their answer-span tokens.
"""
from engine.cli import run_cli
from engine.launch import document, run_training


def main(task: str, ckpt_dir: str, save_dir: str, train_file: str, label_file: str = None, model_type: str = None,
         max_batch_size: int = 4, lora_rank: int = -1, lora_alpha: float = None, lora_dropout: float = 0.0,
         lora_targets: str = "wq,wk,wv,wo,w1,w2,w3", eval_batch_size: int = 64, epochs: int = 1,
         use_float16: bool = False, use_bfloat16: bool = False, lr: float = 1e-5, weight_decay: float = 0.0,
         warmup_steps: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.0, max_grad_norm: float = 1.0,
         accumulation_steps: int = 1, max_seq_len: int = 1024, max_new_tokens: int = 256, template: str = "default",
         seed: int = 0, save_every: int = 0, keep_checkpoints: int = 2, eval_every: int = 0,
         eval_at_start: bool = False, max_eval_examples: int = 0, log_every: int = 1, resume: bool = False,
         checkpoint_activations=False, deepspeed: str = None, tp_size: int = None, max_steps: int = 0,
         exit_after_steps: int = 0, compile: bool = None, checkpoint_fraction: float = 1.0, alpha: float = 0.01,
         temperature: float = 1.0, num_rationales: int = 2, recompute_spans: bool = False,
         keep_wrong_rationales: bool = False):
    run_training("mcc", **locals())


document(main, "Train a student with MCC-KD: cross-entropy on several rationales per question plus the "
               "consistency of their answer-span predictions.")

if __name__ == "__main__":
    run_cli(main)
