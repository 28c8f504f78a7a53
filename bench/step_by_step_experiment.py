"""SFT on labels only vs distilling step-by-step vs step-by-step + the MI term (both estimators), on a
generated task with teacher rationales; a tiny LLaMA from scratch, same budget, several seeds.

The task: sums of three numbers 0-9 ("What is 4 + 7 + 9 ?", 1,000 possible questions), few training
questions; the "teacher" writes a rationale ("4 + 7 = 11 . 11 + 9 = 20 . Therefore, the answer is
20 .") as raw text running on into its next few-shot question, which data/prepare_step_by_step.py
parses into the step-by-step layout, twice: our split (--parse ours: the rationale keeps its answer
sentence) and the authors' (--parse authors: the rationale without it). Arms (same optimizer steps,
same questions per step):
  sft_labels            train.py --objective sft on question -> label (no rationales; the authors'
                        --model_type standard, = --objective step_by_step --standard True)
  step_by_step          --objective step_by_step --alpha A, on our split
  step_by_step_authors  the same on the authors' split
  mi_pooled_ce          step_by_step plus --beta B --mi_estimator pooled_distribution_ce (ours; formerly pooled_ce)
  mi_authors            step_by_step plus --beta B --mi_estimator authors (Chen et al.'s term, padding included)
  mi_authors_masked     the same with --mi_mask_padding True (not run by default)
  mi_critic             step_by_step plus --beta B --mi_estimator critic (ours)
Each run is scored on the held-out questions by greedy decoding of the label (the label task for
the step-by-step arms), and `infer.py calibration` gives the ECE of the first answer token's
probability (10 equal-width bins). The step-by-step arms do twice the forward work per step
(both tasks), which is the method's cost, not a larger budget of questions.

  python bench/step_by_step_experiment.py [--seeds 0,1,2] [--steps 300] [--out runs/sbs_experiment]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script too
from bench.runs import as_list, experiment_env, mean_and_spread, run_script  # noqa: E402


def main(seeds="0,1,2", steps: int = 300, questions_per_step: int = 32, lr: float = 3e-3, alpha: float = 0.5,
         beta: float = 0.1, n_train: int = 300, n_test: int = 200, model_type: str = "tiny-llama",
         arms: str = "sft_labels,step_by_step,step_by_step_authors,mi_pooled_ce,mi_authors,mi_critic",
         out: str = "runs/sbs_experiment"):
    """Run every arm for every seed; print held-out label accuracy and ECE (mean +- sd over seeds).

    Args:
        seeds: comma-separated seeds (model initialisation and data order).
        steps: optimizer steps per run (the same for every arm).
        questions_per_step: questions per optimizer step (every arm).
        lr: peak learning rate.
        alpha: the label task's weight in the step-by-step arms.
        beta: the MI term's weight in the mi_* arms.
        n_train, n_test: questions in the generated splits.
        model_type: registry preset of the student.
        arms: comma-separated subset of sft_labels, step_by_step, step_by_step_authors, mi_pooled_ce, mi_authors, mi_authors_masked, mi_critic.
        out: output directory (data, runs, results.json, results.md).
    """
    seeds = as_list(seeds, int)
    arms = as_list(arms)
    env = experiment_env(out)
    data = os.path.join(out, "data")
    run_script(["data/arithmetic.py", "--overwrite", "True", "--out_dir", data, "--kind", "sum3", "--max_value", "9", "--n_train", str(n_train),
          "--n_test", str(n_test), "--seed", "0"], env)
    train = json.load(open(os.path.join(data, "train.json")))
    # one teacher rationale per question, its raw text running on into the next few-shot question
    raw = [{"question": r["instruction"], "label": r["label"], "llm_output": r["output"][0] + "\n\nQ: What is 1 + 1 ?"}
           for r in train]
    with open(os.path.join(data, "teacher_raw.json"), "w") as f:
        json.dump(raw, f)
    sbs_file, labels_file = os.path.join(data, "step_by_step.json"), os.path.join(data, "labels_only.json")
    authors_file = os.path.join(data, "step_by_step_authors.json")
    for parse, path in (("ours", sbs_file), ("authors", authors_file)):
        run_script(["data/prepare_step_by_step.py", "--input_file", os.path.join(data, "teacher_raw.json"),
                    "--output_file", path, "--task", "ARITH", "--parse", parse, "--overwrite", "True"], env)
    with open(labels_file, "w") as f:
        json.dump([{"instruction": r["instruction"], "output": r["label"]} for r in json.load(open(sbs_file))], f)
    tok = os.path.join(out, "tokenizer.model")
    run_script(["data/make_tokenizer.py", "--output", tok, "--overwrite", "True"], env)
    test = os.path.join(data, "test.json")
    common = ["--task", "ARITH", "--label_file", test, "--max_steps", str(steps), "--lr", str(lr), "--warmup_steps",
              "30", "--template", "none", "--max_seq_len", "96", "--max_new_tokens", "8", "--eval_batch_size", "200",
              "--max_batch_size", str(questions_per_step), "--keep_checkpoints", "1"]
    sbs = ["--objective", "step_by_step", "--train_file", sbs_file, "--alpha", str(alpha)]
    authors = ["--objective", "step_by_step", "--train_file", authors_file, "--alpha", str(alpha)]
    arm_flags = {
        "sft_labels": ["--train_file", labels_file],
        "step_by_step": sbs,
        "step_by_step_authors": authors,
        "mi_pooled_ce": sbs + ["--beta", str(beta), "--mi_estimator", "pooled_distribution_ce"],
        "mi_authors": sbs + ["--beta", str(beta), "--mi_estimator", "authors"],
        "mi_authors_masked": sbs + ["--beta", str(beta), "--mi_estimator", "authors", "--mi_mask_padding", "True"],
        "mi_critic": sbs + ["--beta", str(beta), "--mi_estimator", "critic"],
    }
    results = {}
    for seed in seeds:
        init = os.path.join(out, f"init-{seed}")
        run_script(["checkpoint_split.py", "init", "--model_type", model_type, "--save_dir", init, "--tokenizer", tok,
              "--seed", str(seed), "--overwrite", "True"], env)
        for arm in arms:
            save = os.path.join(out, f"{arm}-{seed}")
            shutil.rmtree(save, ignore_errors=True)
            start = time.time()
            run_script(["train.py", "--ckpt_dir", init, "--save_dir", save, "--seed", str(seed), *common, *arm_flags[arm]],
                 env)
            train_s = time.time() - start
            evals = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl")) if '"eval"' in line]
            cal_out = os.path.join(save, "calibration.jsonl")
            run_script(["infer.py", "calibration", "--ckpt_dir", os.path.join(save, f"checkpoint-{steps}"), "--data_file",
                  test, "--output_file", cal_out, "--task", "ARITH", "--max_new_tokens", "8", "--batch_size", "200"],
                 env)
            cal = json.load(open(cal_out + ".summary.json"))
            results.setdefault(arm, {})[seed] = {"accuracy": evals[-1]["accuracy"], "ece": cal["ece"],
                                                 "mean_confidence": cal["mean_confidence"],
                                                 "calibration_accuracy": cal["accuracy"], "train_s": round(train_s, 1)}
            print(f"seed {seed} {arm:20s} accuracy {evals[-1]['accuracy']:.3f} ({evals[-1]['correct']}/"
                  f"{evals[-1]['total']}) ECE {cal['ece']:.3f} mean confidence {cal['mean_confidence']:.3f} "
                  f"({train_s:.0f} s)", flush=True)
    summary = {}
    for arm, per_seed in results.items():
        acc, ece = (mean_and_spread([v[k] for v in per_seed.values()]) for k in ("accuracy", "ece"))
        summary[arm] = {"accuracy_mean": acc[0], "accuracy_sd": acc[1], "ece_mean": ece[0], "ece_sd": ece[1],
                        "per_seed": per_seed}
    settings = {"steps": steps, "questions_per_step": questions_per_step, "lr": lr, "alpha": alpha, "beta": beta,
                "n_train": n_train, "n_test": n_test, "model_type": model_type, "seeds": seeds}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": settings, "results": summary}, f, indent=2)
    rows = ["| arm | label accuracy (mean ± sd) | per seed | ECE (mean ± sd) | per seed | train s / run |",
            "|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        seeds_acc = ", ".join(f"{v['accuracy']:.3f}" for v in s["per_seed"].values())
        seeds_ece = ", ".join(f"{v['ece']:.3f}" for v in s["per_seed"].values())
        secs = statistics.mean(v["train_s"] for v in s["per_seed"].values())
        rows.append(f"| {arm} | {s['accuracy_mean']:.3f} ± {s['accuracy_sd']:.3f} | {seeds_acc} | "
                    f"{s['ece_mean']:.3f} ± {s['ece_sd']:.3f} | {seeds_ece} | {secs:.0f} |")
    table = "\n".join(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import fire

    fire.Fire(main)
