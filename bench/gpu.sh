#!/usr/bin/env bash
# The long GPU tables of BENCHMARKS.md, one part per device call (each part fits a 10-minute call; run
# bench/gpu_check.py first). A bare GPU machine has torch and transformers (+ peft) but not fairscale or
# fire: they come from the wheels in .device-wheels/ (copied there from ../shared/device-wheels and
# carried with the call, see BENCHMARKS.md; ../shared itself does not travel), installed into the
# default environment so that the benches' subprocesses see them too. The real training lengths come
# from .device-data/ (or ../shared/data), else from a generated distribution (said in one line).
#
#   Usage: bash bench/gpu.sh PART 2>&1 | tee $OUT/PART.log
#   PART: check | generate | e2e | samples | train-full | train-lora | train-mcc | train-fixed | lora7b | onpolicy | all
# onpolicy compares with TRL's GKDTrainer when TRL_PATH names a folder holding bench/requirements-trl.txt's
# packages (pip install --target); without it, ours alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:?"which part: check, generate, e2e, samples, train-full, train-lora, train-mcc, train-fixed, lora7b, onpolicy or all"}
WHEELS=${WHEELS:-$( [ -d .device-wheels ] && echo .device-wheels || echo ../shared/device-wheels )}
python3 -c "import fairscale, fire" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
export PYTHONUNBUFFERED=1
MODEL="--dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8"
run() {
  case "$1" in
    check)  # the short check, about 8 minutes (its own budget)
      python3 bench/gpu_check.py --budget_s 480 --out_dir "${OUT:-gpu_check_out}" ;;
    generate)  # tokens/s of both engines at each batch size, tokens compared, batch-1 bandwidth fraction
      python3 bench/generate.py $MODEL --dtype bf16 --new_tokens 128 --batches 1,16,64,384 --device cuda ;;
    e2e)  # infer.py end to end at batch 384 (768 records) against the same job written with HF
      python3 bench/generate.py $MODEL --dtype bf16 --new_tokens 128 --batches 1 --device cuda --e2e True ;;
    samples)  # --num_samples 10 of few-shot GSM8K prompts: the shared prompt segment vs a copy per row; sampling's sort
      python3 bench/generate.py $MODEL --dtype bf16 --samples 10 --batches 64 --few_shot True --max_prompt 2500 \
          --new_tokens 256 --device cuda
      python3 bench/sampling.py --device cuda ;;
    train-full|train-lora|train-mcc)  # real SVAMP lengths, 32 rows a step (about 5,800 tokens), ours vs HF
      python3 bench/train_step.py --modes "${1#train-}" $MODEL --seq_len 2048 --batch 32 --dtype bf16 --device cuda ;;
    train-fixed)  # the fixed shape of the earlier tables: 4 x 2048, every position labelled
      python3 bench/train_step.py --modes full $MODEL --lengths fixed --seq_len 2048 --batch 4 --dtype bf16 \
          --device cuda ;;
    lora7b)  # a 7B-shaped model with LoRA at batch 4 x 1024: does it fit one 80 GB GPU (ours only)
      python3 bench/train_step.py --modes lora --dim 4096 --n_layers 32 --n_heads 32 --n_kv_heads 32 --lengths fixed \
          --seq_len 1024 --batch 4 --dtype bf16 --device cuda --steps 3 --sides ours ;;
    onpolicy)  # a full on-policy step against TRL's GKDTrainer; goal: >= 5x TRL at batch 64
      python3 bench/on_policy.py --trl_path "${TRL_PATH:-}" $MODEL --teacher_dim 2048 --teacher_layers 24 --batch 64 \
          --prompt 128 --new_tokens 128 --dtype bf16 --device cuda ;;
    *) echo "unknown part $1" >&2; exit 2 ;;
  esac
}
if [ "$PART" = all ]; then  # only where one call may take an hour
  for p in check generate e2e samples train-full train-lora train-mcc train-fixed lora7b onpolicy; do run "$p"; done
else
  run "$PART"
fi
