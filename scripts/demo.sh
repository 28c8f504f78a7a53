#!/usr/bin/env bash
# The main job on the embedded default: a tokenizer and prompts generated here, a tiny LLaMA-style
# model initialised at random, split into 2 tensor-parallel shards, and run under torchrun (TP=2, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_out}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
python data/make_tokenizer.py --output "$OUT/tokenizer.model"
python checkpoint_split.py init --model_type small-llama --save_dir "$OUT/init" --n 1 \
    --tokenizer "$OUT/tokenizer.model" --seed 0 --overwrite True
python checkpoint_split.py split --ckpt_dir "$OUT/init" --save_dir "$OUT/tp2" --n 2 --overwrite True
python - "$OUT/prompts.json" <<'PY'
import json, random, sys
rng = random.Random(0)
records = [{"instruction": f"What is {a} + {b} ?", "label": str(a + b)}
           for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(16))]
json.dump(records, open(sys.argv[1], "w"), indent=1)
PY
torchrun --nproc_per_node 2 infer.py --ckpt_dir "$OUT/tp2" --data_file "$OUT/prompts.json" \
    --output_file "$OUT/predictions.jsonl" --task ARITH --batch_size 16 --max_new_tokens 16
echo "checkpoint: $OUT/tp2   predictions: $OUT/predictions.jsonl"
