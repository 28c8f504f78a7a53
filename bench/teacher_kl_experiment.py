"""Distilling a teacher's sampled CoT text vs its next-token distributions (Fu et al. 2023, section 4 of
METHODS.md), tiny models from scratch on CPU, same budget, several seeds.

  1. A teacher (tiny-llama, 1250 steps) learns two-digit addition with step-by-step rationales from scratch
     (fixed-width steps: "7 + 8 + 0 = 15 . 4 + 3 + 1 = 08 . Therefore, the answer is 85 ."), on the
     gold rationales of every question but the held-out ones.
  2. It SAMPLES one rationale (temperature --sample_temperature) for each of the students' training
     questions: the students' training file, mistakes included.
  3. `infer.py score --top_k 5` writes the teacher's top-5 next-token distributions over that file.
  4. Students (tiny-llama, the teacher's size, half its steps, the teacher's samples for 3,000 of its
     questions instead of its gold rationales), for each seed, same steps / batch / lr:
       text        train.py --objective sft: token cross-entropy on the sampled text only
       dist        train.py --objective teacher_kl --kl_weight W: (1 - W) CE + W KL(teacher top-5 || student)
       text_other  as text, student with another tokenizer (numbers are not split into digits)
       dist_other  as dist, that student: DTW-aligned to the teacher's tokens
       dist_authors        the authors' loss and targets (FranxYao/FlanT5-CoT-Specialization): KL alone on
                           these chain-of-thought samples (--kl_formats zs_cot, every record tagged zs_cot),
                           each micro-batch its own token mean, the teacher's own token + top 5 not
                           renormalised, EOS one-hot, no temperature
       dist_authors_other  as dist_authors, the other-tokenizer student, with the authors' DTW rule
  Accuracy: exact-match answers on held-out questions, greedy decoding.

  python bench/teacher_kl_experiment.py [--seeds 0,1,2] [--steps 300] [--kl_weight 0.5] [--out runs/teacher_kl]
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


def main(seeds="0,1,2", steps: int = 600, kl_weight: float = 0.5, kl_temperature: float = 1.0, batch: int = 32,
         lr: float = 5e-3, teacher_steps: int = 1250, student_questions: int = 3000, n_test: int = 200,
         sample_temperature: float = 1.0, arms: str = "text,dist,text_other,dist_other,dist_authors,dist_authors_other",
         teacher_model: str = "tiny-llama",
         student_model: str = "tiny-llama", out: str = "runs/teacher_kl"):
    """Train the teacher once, then every arm for every seed; print and save the held-out accuracies.

    Args:
        seeds: comma-separated student seeds (initialisation and data order).
        steps: optimizer steps of every student run.
        kl_weight: weight of the KL term in the dist arms (the cross-entropy gets 1 - kl_weight).
        kl_temperature: temperature of the KL term.
        batch: sequences per step (students).
        lr: peak learning rate (students).
        teacher_steps: optimizer steps of the teacher (batch 32, gold rationales of every non-test question).
        student_questions: questions the teacher answers by sampling: the students' training set.
        n_test: held-out questions every model is evaluated on (never seen by teacher or students).
        sample_temperature: the teacher's sampling temperature for the students' rationales.
        arms: comma-separated subset of text, dist, text_other, dist_other, dist_authors, dist_authors_other.
        teacher_model: registry preset of the teacher.
        student_model: registry preset of the students.
        out: output directory (data, checkpoints, runs, results.json).
    """
    seeds, arms, env = runs.as_list(seeds, int), runs.as_list(arms), runs.experiment_env(out)
    start = time.time()
    # every two-digit question but the test ones: the teacher learns them all (with gold rationales);
    # the students get the teacher's samples for some of them
    data = runs.two_digit_questions(out, n_test, student_questions, env)
    tok, other_tok = os.path.join(out, "tokenizer.model"), os.path.join(out, "other.model")
    runs.run_script(["data/make_tokenizer.py", "--output", tok, "--overwrite", "True"], env)
    runs.run_script(["data/make_tokenizer.py", "--output", other_tok, "--seed", "1", "--vocab_size", "400",
          "--split_digits", "False", "--overwrite", "True"], env)
    common = ["--task", "ARITH", "--template", "none", "--max_seq_len", "64", "--keep_checkpoints", "1"]
    test_file = os.path.join(data, "test.json")

    teacher_ckpt = runs.trained_teacher(out, data, tok, teacher_model, teacher_steps, 5e-3, common, env)
    teacher_eval = runs.held_out_accuracy(teacher_ckpt, test_file, os.path.join(out, "teacher-test.jsonl"), env)
    print(f"teacher held-out accuracy {teacher_eval['accuracy']:.3f} ({time.time() - start:.0f} s)", flush=True)

    train_file, sampled, sample_accuracy = runs.teacher_samples(out, data, teacher_ckpt, sample_temperature, 64, env)
    tagged = os.path.join(data, "sampled_zs_cot.json")  # the same records, tagged as the CoT format they are
    json.dump([{"instruction": s["instruction"], "output": s["output"], "label": s["label"], "format": "zs_cot"}
               for s in sampled], open(tagged, "w"))
    topk = os.path.join(out, "teacher.topk.jsonl")
    runs.run_script(["infer.py", "score", "--ckpt_dir", teacher_ckpt, "--data_file", train_file,
          "--output_file", topk, "--top_k", "5", "--template", "none"], env)
    print(f"teacher samples: {sample_accuracy:.3f} correct, {len(sampled)} non-empty kept ({time.time() - start:.0f} s)",
          flush=True)

    results, timings = {}, {}
    for seed in seeds:
        for which, tokenizer in (("", tok), ("_other", other_tok)):
            if not any(a.endswith(which) if which else not a.endswith("_other") for a in arms):
                continue
            runs.run_script(["checkpoint_split.py", "init", "--model_type", student_model, "--save_dir",
                  os.path.join(out, f"s-init{which}-{seed}"), "--tokenizer", tokenizer, "--seed", str(seed),
                  "--overwrite", "True"], env)
        for arm in arms:
            which = "_other" if arm.endswith("_other") else ""
            save = os.path.join(out, f"{arm}-{seed}")
            shutil.rmtree(save, ignore_errors=True)
            args = ["train.py", "--ckpt_dir", os.path.join(out, f"s-init{which}-{seed}"), "--save_dir", save,
                    "--train_file", train_file, "--seed", str(seed),
                    "--max_steps", str(steps), "--max_batch_size", str(batch), "--lr", str(lr), "--warmup_steps", "30",
                    *common]
            if arm.startswith("dist_authors"):
                args[args.index("--train_file") + 1] = tagged
                args += ["--objective", "teacher_kl", "--teacher_file", topk, "--kl_formats", "zs_cot",
                         "--loss_reduction", "micro_batch_mean", "--teacher_probs", "raw", "--eos_target", "one_hot",
                         "--kl_temperature", "1"] + (["--alignment", "authors"] if which else [])
            elif arm.startswith("dist"):
                args += ["--objective", "teacher_kl", "--teacher_file", topk, "--kl_weight", str(kl_weight),
                         "--kl_temperature", str(kl_temperature)]
            t0 = time.time()
            runs.run_script(args, env)
            timings.setdefault(arm, []).append(time.time() - t0)
            final = runs.held_out_accuracy(os.path.join(save, f"checkpoint-{steps}"), test_file, save + "-test.jsonl", env)
            results.setdefault(arm, {})[seed] = final["accuracy"]
            print(f"seed {seed} {arm:10s} accuracy {final['accuracy']:.3f} ({final['correct']}/{final['total']}) "
                  f"{timings[arm][-1]:.0f} s", flush=True)
    summary = {arm: dict(zip(("mean", "stdev"), runs.mean_and_spread(accs.values())), per_seed=accs,
                         seconds_per_run=statistics.mean(timings[arm]))
               for arm, accs in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": {"teacher_model": teacher_model, "student_model": student_model, "steps": steps,
                                "kl_weight": kl_weight, "kl_temperature": kl_temperature, "batch": batch, "lr": lr,
                                "teacher_steps": teacher_steps, "student_questions": student_questions,
                                "n_test": n_test, "sample_temperature": sample_temperature},
                   "teacher_accuracy": teacher_eval["accuracy"], "teacher_sample_accuracy": sample_accuracy,
                   "results": summary}, f, indent=2)
    for arm, s in summary.items():
        print(f"{arm:10s} mean {s['mean']:.3f} +- {s['stdev']:.3f}  " +
              " ".join(f"{v:.3f}" for v in s["per_seed"].values()))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import fire

    fire.Fire(main)
