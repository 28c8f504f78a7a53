"""On-policy distillation against the supervised kinds, tiny models from scratch on CPU, same optimizer
steps, several seeds (train.py --objective on_policy; Agarwal et al. 2024).

  1. A teacher (small-llama: 4 layers, width 128) learns two-digit addition with step-by-step
     rationales from scratch ("7 + 8 + 0 = 15 . 4 + 3 + 1 = 08 . Therefore, the answer is 85 ."), on the
     gold rationales of every question but the held-out ones.
  2. It SAMPLES one rationale (temperature 1) for each of the students' training questions.
  3. Students (tiny-llama: 2 layers, width 64, the teacher's tokenizer), for each seed, same steps /
     batch / lr, on those questions:
       sft        train.py --objective sft: cross-entropy on the teacher's samples
       kd         train.py --objective on_policy --lmbda 0 --divergence forward_kl: the teacher's full
                  next-token distributions on its samples (supervised KD, = teacher_kl --kl_weight 1)
       on_policy  --lmbda 1 --divergence jsd --jsd_beta 0.5: the student samples its own responses
                  (temperature 1) and learns the teacher's distributions on them (GKD)
  Accuracy: exact-match answers on the held-out questions, greedy decoding (infer.py).

  python bench/on_policy_experiment.py [--seeds 0,1,2] [--steps 600] [--arms sft,kd,on_policy] [--lmbda 1] [--divergence jsd] [--out runs/on_policy]
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


def _accuracy(ckpt, test_file, output, env, max_new_tokens):
    """Greedy exact-match accuracy of a checkpoint on the held-out questions."""
    if os.path.exists(output):
        os.remove(output)
    run_script(["infer.py", "--ckpt_dir", ckpt, "--data_file", test_file, "--output_file", output, "--task", "ARITH",
                "--max_new_tokens", str(max_new_tokens), "--batch_size", "200", "--template", "none", "--progress",
                "False"], env)
    return json.load(open(output + ".meta.json"))["summary"]


def _arm_flags(arm: str, teacher: str, jsd_beta: float, gen_temperature: float, lmbda: float = 1.0,
               divergence: str = "jsd", kd_divergence: str = "forward_kl") -> list:
    if arm == "sft":
        return []
    if arm == "kd":
        return ["--objective", "on_policy", "--teacher_ckpt_dir", teacher, "--lmbda", "0", "--divergence", kd_divergence,
                "--jsd_beta", str(jsd_beta)]
    return ["--objective", "on_policy", "--teacher_ckpt_dir", teacher, "--lmbda", str(lmbda), "--divergence",
            divergence, "--jsd_beta", str(jsd_beta), "--gen_temperature", str(gen_temperature)]


def _time_split(save: str) -> dict:
    """Mean seconds per step spent in generation, the teacher and the student step, from metrics.jsonl."""
    lines = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl")) if '"eval"' not in line]
    keys = ("time_generation_s", "time_teacher_s", "time_student_s", "response_length")
    return {k: statistics.mean(line[k] for line in lines) for k in keys if k in lines[0]}


def main(seeds="0,1,2", steps: int = 600, batch: int = 32, lr: float = 5e-3, teacher_steps: int = 1000,
         student_questions: int = 2000, n_test: int = 200, jsd_beta: float = 0.5, gen_temperature: float = 1.0,
         max_new_tokens: int = 48, lmbda: float = 1.0, divergence: str = "jsd", kd_divergence: str = "forward_kl",
         arms: str = "sft,kd,on_policy", teacher_model: str = "small-llama",
         student_model: str = "tiny-llama", out: str = "runs/on_policy"):
    """Train the teacher once, then every arm for every seed; print and save the held-out accuracies.

    Args:
        seeds: comma-separated student seeds (initialisation, data order, samples).
        steps: optimizer steps of every student run.
        batch: questions per step (students).
        lr: peak learning rate (students).
        teacher_steps: optimizer steps of the teacher (batch 32, gold rationales of every non-test question).
        student_questions: questions the teacher answers by sampling: the students' training set.
        n_test: held-out questions every model is evaluated on (never seen by teacher or students).
        jsd_beta: the on_policy arm's generalised JSD beta.
        gen_temperature: the on_policy arm's sampling temperature.
        max_new_tokens: the sampling budget (teacher samples, on-policy samples, evaluation).
        lmbda: the on_policy arm's fraction of student-sampled micro-batches (1: all; the others the teacher's samples).
        divergence: the on_policy arm's divergence (jsd, forward_kl or reverse_kl; jsd_beta for jsd).
        kd_divergence: the kd arm's divergence (forward_kl, reverse_kl or jsd).
        arms: comma-separated subset of sft, kd, on_policy.
        teacher_model: registry preset of the teacher.
        student_model: registry preset of the students (the teacher's vocabulary).
        out: output directory (data, checkpoints, runs, results.json).
    """
    seeds = as_list(seeds, int)
    arms = as_list(arms)
    env = experiment_env(out)
    start = time.time()
    data = os.path.join(out, "data")
    run_script(["data/arithmetic.py", "--out_dir", data, "--n_train", str(90 * 90 - n_test), "--n_test", str(n_test),
                "--min_value", "10", "--style", "fixed", "--seed", "0"], env)
    pool = json.load(open(os.path.join(data, "train.json")))
    json.dump(pool[:student_questions], open(os.path.join(data, "questions.json"), "w"))
    tok = os.path.join(out, "tokenizer.model")
    run_script(["data/make_tokenizer.py", "--output", tok], env)
    common = ["--task", "ARITH", "--template", "none", "--max_seq_len", "64", "--keep_checkpoints", "1"]
    test_file = os.path.join(data, "test.json")

    teacher = os.path.join(out, "teacher")
    teacher_ckpt = os.path.join(teacher, f"checkpoint-{teacher_steps}")
    if not os.path.exists(teacher_ckpt):  # reused by a rerun with other student settings
        shutil.rmtree(teacher, ignore_errors=True)
        run_script(["checkpoint_split.py", "init", "--model_type", teacher_model, "--save_dir",
                    os.path.join(out, "t-init"), "--tokenizer", tok, "--seed", "0", "--overwrite", "True"], env)
        run_script(["train.py", "--ckpt_dir", os.path.join(out, "t-init"), "--save_dir", teacher, "--train_file",
                    os.path.join(data, "train.json"), "--max_steps", str(teacher_steps), "--max_batch_size", "32",
                    "--lr", "3e-3", "--warmup_steps", "50", *common], env)
    teacher_eval = _accuracy(teacher_ckpt, test_file, os.path.join(out, "teacher-test.jsonl"), env, max_new_tokens)
    print(f"teacher held-out accuracy {teacher_eval['accuracy']:.3f} ({time.time() - start:.0f} s)", flush=True)

    samples = os.path.join(out, "samples.jsonl")
    if os.path.exists(samples):
        os.remove(samples)
    run_script(["infer.py", "--ckpt_dir", teacher_ckpt, "--data_file", os.path.join(data, "questions.json"),
                "--output_file", samples, "--task", "ARITH", "--temperature", "1.0", "--max_new_tokens",
                str(max_new_tokens), "--batch_size", "100", "--template", "none", "--progress", "False"], env)
    sampled = [json.loads(line) for line in open(samples)]
    sample_accuracy = sum(bool(s["correct"]) for s in sampled) / len(sampled)
    sampled = [s for s in sampled if s["output"].strip()]  # a sample that is only EOS teaches no text
    train_file = os.path.join(data, "sampled.json")
    json.dump([{"instruction": s["instruction"], "output": s["output"], "label": s["label"]} for s in sampled],
              open(train_file, "w"))
    print(f"teacher samples: {sample_accuracy:.3f} correct, {len(sampled)} kept ({time.time() - start:.0f} s)",
          flush=True)

    results, timings, splits = {}, {}, {}
    for seed in seeds:
        init = os.path.join(out, f"s-init-{seed}")
        run_script(["checkpoint_split.py", "init", "--model_type", student_model, "--save_dir", init, "--tokenizer",
                    tok, "--seed", str(seed), "--overwrite", "True"], env)
        for arm in arms:
            save = os.path.join(out, f"{arm}-{seed}")
            shutil.rmtree(save, ignore_errors=True)
            args = ["train.py", "--ckpt_dir", init, "--save_dir", save, "--train_file", train_file, "--seed",
                    str(seed), "--max_steps", str(steps), "--max_batch_size", str(batch), "--lr", str(lr),
                    "--warmup_steps", "30", "--max_new_tokens", str(max_new_tokens), *common,
                    *_arm_flags(arm, teacher_ckpt, jsd_beta, gen_temperature, lmbda, divergence, kd_divergence)]
            t0 = time.time()
            run_script(args, env)
            timings.setdefault(arm, []).append(time.time() - t0)
            splits.setdefault(arm, []).append(_time_split(save))
            final = _accuracy(os.path.join(save, f"checkpoint-{steps}"), test_file, save + "-test.jsonl", env,
                              max_new_tokens)
            results.setdefault(arm, {})[seed] = final["accuracy"]
            print(f"seed {seed} {arm:10s} accuracy {final['accuracy']:.3f} ({final['correct']}/{final['total']}) "
                  f"{timings[arm][-1]:.0f} s", flush=True)
    summary = {arm: dict(zip(("mean", "stdev"), mean_and_spread(accs.values())), per_seed=accs,
                         seconds_per_run=statistics.mean(timings[arm]),
                         time_split_per_step={k: statistics.mean(s[k] for s in splits[arm]) for k in splits[arm][0]})
               for arm, accs in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": {"teacher_model": teacher_model, "student_model": student_model, "steps": steps,
                                "batch": batch, "lr": lr, "teacher_steps": teacher_steps,
                                "student_questions": student_questions, "n_test": n_test, "jsd_beta": jsd_beta,
                                "gen_temperature": gen_temperature, "max_new_tokens": max_new_tokens,
                                "lmbda": lmbda, "divergence": divergence, "kd_divergence": kd_divergence},
                   "teacher_accuracy": teacher_eval["accuracy"], "teacher_sample_accuracy": sample_accuracy,
                   "results": summary}, f, indent=2)
    for arm, s in summary.items():
        print(f"{arm:10s} mean {s['mean']:.3f} +- {s['stdev']:.3f}  " +
              " ".join(f"{v:.3f}" for v in s["per_seed"].values()) + f"  {s['seconds_per_run']:.0f} s/run")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
