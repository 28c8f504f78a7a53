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
from bench import runs  # noqa: E402


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
    seeds, arms, env = runs.as_list(seeds, int), runs.as_list(arms), runs.experiment_env(out)
    start = time.time()
    # every two-digit question but the test ones; the teacher learns them all, the students see some
    data = runs.two_digit_questions(out, n_test, student_questions, env)
    tok = os.path.join(out, "tokenizer.model")
    runs.run_script(["data/make_tokenizer.py", "--output", tok], env)
    common = ["--task", "ARITH", "--template", "none", "--max_seq_len", "64", "--keep_checkpoints", "1"]
    test_file = os.path.join(data, "test.json")

    teacher_ckpt = runs.trained_teacher(out, data, tok, teacher_model, teacher_steps, 3e-3, common, env)
    teacher_eval = runs.held_out_accuracy(teacher_ckpt, test_file, os.path.join(out, "teacher-test.jsonl"), env,
                                     max_new_tokens)
    print(f"teacher held-out accuracy {teacher_eval['accuracy']:.3f} ({time.time() - start:.0f} s)", flush=True)

    train_file, sampled, sample_accuracy = runs.teacher_samples(out, data, teacher_ckpt, 1.0, max_new_tokens, env)
    print(f"teacher samples: {sample_accuracy:.3f} correct, {len(sampled)} kept ({time.time() - start:.0f} s)",
          flush=True)

    results, timings, splits = {}, {}, {}
    for seed in seeds:
        init = os.path.join(out, f"s-init-{seed}")
        runs.run_script(["checkpoint_split.py", "init", "--model_type", student_model, "--save_dir", init, "--tokenizer",
                    tok, "--seed", str(seed), "--overwrite", "True"], env)
        for arm in arms:
            save = os.path.join(out, f"{arm}-{seed}")
            shutil.rmtree(save, ignore_errors=True)
            args = ["train.py", "--ckpt_dir", init, "--save_dir", save, "--train_file", train_file, "--seed",
                    str(seed), "--max_steps", str(steps), "--max_batch_size", str(batch), "--lr", str(lr),
                    "--warmup_steps", "30", "--max_new_tokens", str(max_new_tokens), *common,
                    *_arm_flags(arm, teacher_ckpt, jsd_beta, gen_temperature, lmbda, divergence, kd_divergence)]
            t0 = time.time()
            runs.run_script(args, env)
            timings.setdefault(arm, []).append(time.time() - t0)
            splits.setdefault(arm, []).append(_time_split(save))
            final = runs.held_out_accuracy(os.path.join(save, f"checkpoint-{steps}"), test_file, save + "-test.jsonl", env,
                              max_new_tokens)
            results.setdefault(arm, {})[seed] = final["accuracy"]
            print(f"seed {seed} {arm:10s} accuracy {final['accuracy']:.3f} ({final['correct']}/{final['total']}) "
                  f"{timings[arm][-1]:.0f} s", flush=True)
    summary = {arm: dict(zip(("mean", "stdev"), runs.mean_and_spread(accs.values())), per_seed=accs,
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
