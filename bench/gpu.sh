#!/usr/bin/env bash
# Every GPU number of BENCHMARKS.md, on a bare GPU machine that has torch and transformers (+ peft)
# but not fairscale / fire / deepspeed: those come from the wheels of ../shared/device-wheels (or a
# copy of them in .device-wheels/), installed into the default environment so that subprocesses
# see them too.   Usage: bash bench/gpu.sh [generate|train|onpolicy|all] 2>&1 | tee gpu.log
# onpolicy compares with TRL's GKDTrainer when TRL_PATH names a folder holding bench/requirements-trl.txt's
# packages (pip install --target); without it, ours alone.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
WHEELS=${WHEELS:-$( [ -d .device-wheels ] && echo .device-wheels || echo ../shared/device-wheels )}
python3 -c "import fairscale, fire" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
export PYTHONUNBUFFERED=1
if [ "$WHAT" = generate ] || [ "$WHAT" = all ]; then
  python3 bench/generate.py --dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8 --dtype bf16 --new_tokens 128 \
      --batches 1,16,64,384 --device cuda --e2e True
fi
if [ "$WHAT" = train ] || [ "$WHAT" = all ]; then
  python3 bench/train_step.py --dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8 --seq_len 2048 --batch 4 \
      --dtype bf16 --device cuda
  # a 7B-shaped model with LoRA at batch 4 x 1024: does it fit one 80 GB GPU (ours only)
  python3 bench/train_step.py --modes lora --dim 4096 --n_layers 32 --n_heads 32 --n_kv_heads 32 --seq_len 1024 \
      --batch 4 --dtype bf16 --device cuda --steps 3 --sides ours
fi
if [ "$WHAT" = onpolicy ] || [ "$WHAT" = all ]; then
  # goal: >= 5x TRL at batch 64 (our captured decode on the live weights against HF generate)
  python3 bench/on_policy.py --trl_path "${TRL_PATH:-}" --dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8 \
      --teacher_dim 2048 --teacher_layers 24 --batch 64 --prompt 128 --new_tokens 128 --dtype bf16 --device cuda
fi
