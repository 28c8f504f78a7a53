#!/usr/bin/env bash
# The main job on the embedded default: a generated arithmetic data set with step-by-step
# rationales, a tokenizer trained here, a tiny LLaMA-style model initialised at random and split
# into 2 tensor-parallel shards, supervised distillation under torchrun (TP=2, CPU), then
# evaluation of the trained student with infer.py on the held-out split.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_out}
STEPS=${STEPS:-1250}
export OMP_NUM_THREADS=1
start=$(date +%s)
mkdir -p "$OUT"
python data/arithmetic.py --out_dir "$OUT/data" --n_train 4000 --n_test 200 --min_value 10 --style fixed
python data/make_tokenizer.py --output "$OUT/tokenizer.model"
python checkpoint_split.py init --model_type tiny-llama --save_dir "$OUT/init" --n 2 \
    --tokenizer "$OUT/tokenizer.model" --seed 0 --overwrite True
rm -rf "$OUT/run"
torchrun --nproc_per_node 2 train.py --task ARITH --ckpt_dir "$OUT/init" --save_dir "$OUT/run" \
    --train_file "$OUT/data/train.json" --label_file "$OUT/data/test.json" --max_batch_size 32 \
    --max_steps "$STEPS" --lr 5e-3 --warmup_steps 50 --template none --max_seq_len 64 --max_new_tokens 40 \
    --eval_batch_size 200 --eval_at_start True --log_every 25
torchrun --nproc_per_node 2 infer.py --ckpt_dir "$OUT/run/best" --data_file "$OUT/data/test.json" \
    --output_file "$OUT/predictions.jsonl" --task ARITH --template none --batch_size 200 --max_new_tokens 40 \
    | tee "$OUT/infer_summary.json"
echo "demo finished in $(( $(date +%s) - start )) s"
echo "checkpoint: $OUT/run/best  predictions: $OUT/predictions.jsonl  metrics: $OUT/run/metrics.jsonl  plot: $OUT/run/curves.png"
