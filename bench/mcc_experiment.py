"""SFT vs MCC-KD on a generated task whose questions have several valid rationales (sums of three
numbers added in different orders), tiny LLaMA from scratch, same budget, several seeds.

Arms (same optimizer steps and the same number of training sequences per step):
  sft       train.py, each question contributes one of its rationales per step (drawn per epoch)
  mcc_a0    train_mcc.py with alpha = 0: K rationales of each question, cross-entropy only
  mcc       train_mcc.py with alpha > 0: the same plus the answer-span consistency term
  mcc_authors  the same as the MCC-KD authors' code computes it: --span_logits authors (the logits AT
            the span positions) --ce_reduction sequence (the mean of per-rationale token means)

Every run also reports the MCC-KD authors' accuracy (--report authors: correct / answered).

  python bench/mcc_experiment.py [--seeds 0,1,2] [--steps 600] [--alpha 0.1] [--out runs/mcc_experiment]
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script too
from bench.runs import as_list, experiment_env, mean_and_spread, run_script  # noqa: E402


def _commit() -> str:
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip()


def _final_accuracy(save_dir):
    evals = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl")) if '"eval"' in line]
    return evals[-1]


def main(seeds="0,1,2", steps: int = 600, alpha: float = 0.1, temperature: float = 1.0, k: int = 3,
         questions_per_step: int = 16, lr: float = 5e-3, max_value: int = 9, n_train: int = 600, n_test: int = 200,
         model_type: str = "tiny-llama", out: str = "runs/mcc_experiment", arms: str = "sft,mcc_a0,mcc,mcc_authors"):
    """Run every arm for every seed and print the held-out accuracies.

    Args:
        seeds: comma-separated seeds (model initialisation and data order).
        steps: optimizer steps per run (the same for every arm).
        alpha: consistency weight of the mcc arm.
        temperature: softening temperature of the consistency term.
        k: rationales per question per step in the MCC arms (SFT sees k times more questions per step instead).
        questions_per_step: questions per step in the MCC arms.
        lr: peak learning rate.
        max_value: operands are drawn from 0..max_value.
        n_train, n_test: questions in the generated splits.
        model_type: registry preset of the student.
        out: output directory (data, runs, results.json).
        arms: comma-separated arms to run (sft, mcc_a0, mcc, mcc_authors).
    """
    wanted = [a for a in (arms.split(",") if isinstance(arms, str) else arms) if a]
    seeds = as_list(seeds, int)
    env = experiment_env(out, "2")
    data = os.path.join(out, "data")
    run_script(["data/arithmetic.py", "--overwrite", "True", "--out_dir", data, "--kind", "sum3", "--n_train", str(n_train), "--n_test",
          str(n_test), "--max_value", str(max_value), "--seed", "0"], env)
    tok = os.path.join(out, "tokenizer.model")
    run_script(["data/make_tokenizer.py", "--output", tok, "--overwrite", "True"], env)
    common = [
        "--task",
        "ARITH",
        "--train_file",
        os.path.join(data, "train.json"),
        "--label_file",
        os.path.join(data, "test.json"),
        "--max_steps",
        str(steps),
        "--lr",
        str(lr),
        "--warmup_steps",
        "30",
        "--template",
        "none",
        "--max_seq_len",
        "64",
        "--max_new_tokens",
        "32",
        "--eval_batch_size",
        "200",
        "--keep_checkpoints",
        "1",
        "--report",
        "authors",
    ]
    results, answered = {}, {}
    for seed in seeds:
        init = os.path.join(out, f"init-{seed}")
        run_script(["checkpoint_split.py", "init", "--model_type", model_type, "--save_dir", init, "--tokenizer", tok,
              "--seed", str(seed), "--overwrite", "True"], env)
        arms = {
            "sft": ["train.py", "--max_batch_size", str(questions_per_step * k)],
            "mcc_a0": ["train_mcc.py", "--max_batch_size", str(questions_per_step), "--alpha", "0",
                       "--num_rationales", str(k)],
            "mcc": ["train_mcc.py", "--max_batch_size", str(questions_per_step), "--alpha", str(alpha),
                    "--temperature", str(temperature), "--num_rationales", str(k)],
        }
        arms["mcc_authors"] = [*arms["mcc"], "--span_logits", "authors", "--ce_reduction", "sequence"]
        arms = {a: v for a, v in arms.items() if a in wanted}
        for arm, args in arms.items():
            save = os.path.join(out, f"{arm}-{seed}")
            if os.path.exists(os.path.join(save, "metrics.jsonl")):
                import shutil

                shutil.rmtree(save)
            start = time.time()
            run_script([args[0], "--ckpt_dir", init, "--save_dir", save, "--seed", str(seed), *common, *args[1:]], env)
            final = _final_accuracy(save)
            results.setdefault(arm, {})[seed] = final["accuracy"]
            answered.setdefault(arm, {})[seed] = final["accuracy_answered"]
            print(
                f"seed {seed} {arm:11s} accuracy {final['accuracy']:.3f} ({final['correct']}/{final['total']}), "
                f"authors' {final['accuracy_answered']:.3f} ({final['answered']} answered), "
                f"{time.time() - start:.0f} s",
                flush=True,
            )
    summary = {
        arm: {
            **dict(zip(("mean", "stdev"), mean_and_spread(accs.values()))),
            "per_seed": accs,
            "accuracy_answered": dict(zip(("mean", "stdev"), mean_and_spread(answered[arm].values()))),
            "accuracy_answered_per_seed": answered[arm],
        }
        for arm, accs in results.items()
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "settings": {
                    "steps": steps,
                    "alpha": alpha,
                    "temperature": temperature,
                    "k": k,
                    "questions_per_step": questions_per_step,
                    "lr": lr,
                    "max_value": max_value,
                    "n_train": n_train,
                    "n_test": n_test,
                    "model_type": model_type,
                    "commit": _commit(),
                },
                "results": summary,
            },
            f,
            indent=2,
        )
    for arm, s in summary.items():
        a = s["accuracy_answered"]
        print(
            f"{arm:11s} mean {s['mean']:.3f} +- {s['stdev']:.3f}  "
            + " ".join(f"{v:.3f}" for v in s["per_seed"].values())
            + f"  | authors' (answered only) {a['mean']:.3f} +- {a['stdev']:.3f}  "
            + " ".join(f"{v:.3f}" for v in s["accuracy_answered_per_seed"].values())
        )


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import fire

    fire.Fire(main)
