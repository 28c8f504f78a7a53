"""Supervised distillation on teacher rationales (fire CLI), under torchrun:

  torchrun --nproc_per_node 8 train.py --task GSM8K --ckpt_dir C --save_dir S \
      --train_file data/GSM8K/train.json --label_file data/GSM8K/test.json \
      --model_type lora-llama-1-7b --max_batch_size 6 --lora_rank 128 --eval_batch_size 384 \
      --epochs 24 --use_float16 True
"""
from engine.cli import run_cli


def main(task: str, ckpt_dir: str, save_dir: str, train_file: str, label_file: str = None, model_type: str = None,
         max_batch_size: int = 4, lora_rank: int = -1, lora_alpha: float = None, lora_dropout: float = 0.0,
         lora_targets: str = "wq,wk,wv,wo,w1,w2,w3", eval_batch_size: int = 64, epochs: int = 1,
         use_float16: bool = False, use_bfloat16: bool = False, lr: float = 1e-5, weight_decay: float = 0.0,
         warmup_steps: int = 0, schedule: str = "cosine", min_lr_ratio: float = 0.0, max_grad_norm: float = 1.0,
         accumulation_steps: int = 1, max_seq_len: int = 1024, max_new_tokens: int = 256, template: str = "default",
         seed: int = 0, save_every: int = 0, keep_checkpoints: int = 2, eval_every: int = 0,
         eval_at_start: bool = False, max_eval_examples: int = 0, log_every: int = 1, resume: bool = False,
         checkpoint_activations: bool = False, deepspeed: str = None, tp_size: int = None, max_steps: int = 0,
         exit_after_steps: int = 0):
    """Train a student on teacher rationales (supervised; the loss covers the response tokens only).

    Args:
        task: GSM8K / SVAMP / ASDiv / CSQA / ARITH: how answers are read during evaluation.
        ckpt_dir: native checkpoint with one shard per tensor-parallel rank (or an HF directory).
        save_dir: where checkpoints, best/, metrics.jsonl and curves.png go.
        train_file: MCC-KD JSON: instruction, output (a rationale, or a list: one drawn per epoch), label.
        label_file: evaluation records (instruction, label) scored by greedy generation.
        model_type: registry name; a lora- prefix means LoRA (the checkpoint's own params.json wins for shapes).
        max_batch_size: sequences per micro-batch, summed over data-parallel replicas.
        lora_rank: LoRA rank (> 0 with a lora- model type); -1 for full fine-tuning.
        lora_alpha: LoRA alpha (scaling alpha / rank); default: the rank.
        lora_dropout: dropout on the LoRA input.
        lora_targets: comma-separated projections to adapt: wq,wk,wv,wo (attention), w1,w2,w3 (MLP).
        eval_batch_size: prompts per generation batch during evaluation.
        epochs: passes over the training data.
        use_float16: fp16 compute with dynamic loss scaling.
        use_bfloat16: bf16 compute.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay on matrices.
        warmup_steps: linear warm-up steps.
        schedule: cosine, linear or constant after warm-up.
        min_lr_ratio: final learning rate as a fraction of lr.
        max_grad_norm: clip the global gradient norm (0: off).
        accumulation_steps: micro-batches per optimizer step.
        max_seq_len: cut longer sequences (counted and reported).
        max_new_tokens: generation budget during evaluation.
        template: prompt template: default or none.
        seed: seed of initialisation, data order and dropout.
        save_every: also save a checkpoint every N steps (always at each epoch end).
        keep_checkpoints: how many checkpoint-N directories to keep (0: all).
        eval_every: also evaluate every N steps (always at each epoch end).
        eval_at_start: evaluate once before training.
        max_eval_examples: evaluate on the first N label_file records only (0: all).
        log_every: write a metrics line every N steps.
        resume: continue from the latest checkpoint in save_dir (weights, optimizer, schedule, RNG, data position).
        checkpoint_activations: recompute layer activations in backward to save memory.
        deepspeed: DeepSpeed config JSON: ZeRO stage 1/2 over the data-parallel group.
        tp_size: tensor-parallel size (default: all processes); world size / tp_size replicas train data-parallel.
        max_steps: total optimizer steps (> 0 overrides epochs).
        exit_after_steps: stop after N steps as if preempted, keeping the full schedule (for resume).
    """
    from engine import distributed
    from engine.data import SFTData, read_records
    from engine.evaluation import GenerationEvaluator, check_task
    from engine.launch import build_model, read_eval_records, report_data
    from engine.precision import dtype_from_flags
    from engine.tasks import SFTTask
    from engine.tokenizer import load_tokenizer
    from engine.trainer import TrainConfig, Trainer

    task = check_task(task)
    dtype = dtype_from_flags(use_float16, use_bfloat16)
    records = read_records(train_file)
    eval_records = read_eval_records(label_file, max_eval_examples)
    info = distributed.setup(tp_size)
    tok = load_tokenizer(ckpt_dir)
    model, lora_cfg = build_model(ckpt_dir, model_type, lora_rank, lora_alpha, lora_dropout, lora_targets,
                                  dtype, info, seed)
    data = SFTData(records, tok, min(max_seq_len, model.args.max_seq_len), template, seed, train_file)
    report_data(data, train_file, info)
    evaluator = None
    if eval_records:
        evaluator = GenerationEvaluator(eval_records, tok, task, info, eval_batch_size, max_new_tokens, template)
    cfg = TrainConfig(save_dir=save_dir, epochs=epochs, max_batch_size=max_batch_size,
                      accumulation_steps=accumulation_steps, lr=lr, min_lr_ratio=min_lr_ratio,
                      weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule,
                      max_grad_norm=max_grad_norm, max_steps=max_steps, exit_after_steps=exit_after_steps,
                      dtype=dtype, seed=seed, save_every=save_every, keep_checkpoints=keep_checkpoints,
                      eval_every=eval_every, eval_at_start=eval_at_start, log_every=log_every, resume=resume,
                      checkpoint_activations=checkpoint_activations)
    trainer = Trainer(model, SFTTask(data, info.device), cfg, info, tok, evaluator, lora_cfg, ckpt_dir, deepspeed,
                      run_meta={"launcher": "train.py", "task": task, "train_file": train_file,
                                "label_file": label_file})
    trainer.fit()
    distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
