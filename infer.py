"""Offline generation, scoring and evaluation (fire CLI).

  torchrun --nproc_per_node N infer.py --ckpt_dir C --data_file F --output_file O.jsonl [--task GSM8K]
      [--batch_size 384] [--max_new_tokens 256] [--temperature 0] [--top_p 1] [--num_samples 1]
      [--template default|none] [--lora_dir L]
  python infer.py evaluate --task T --predictions_file O.jsonl [--label_file F] [--field output]
      [--scoring ours|exact|mcc] [--report ours|authors]
  torchrun --nproc_per_node N infer.py score --ckpt_dir C --data_file F --output_file O.jsonl [--top_k 5]
  torchrun --nproc_per_node N infer.py calibration --ckpt_dir C --data_file F --output_file O.jsonl --task T
  python infer.py bleu --predictions_file O.jsonl --references_file F
(--task_prefix label|rationale picks the task of a model trained with --objective step_by_step.)

The flags and their checks are engine/infer/args.py's, the jobs engine/infer/'s. The jobs are
imported inside the commands so that --help and a mistyped flag answer at once.
"""
from __future__ import annotations

import json
import sys

from engine.infer.args import BleuArgs, CalibrationArgs, EvaluateArgs, GenerateArgs, ScoreArgs
from engine.runtime.cli import command, run_cli


def _generate(args: GenerateArgs) -> None:
    from engine.infer.jobs import GenerationJob, run_generation

    run_generation(GenerationJob.of(args))


def _score(args: ScoreArgs) -> None:
    from engine.infer.jobs import ScoringJob, run_scoring

    run_scoring(ScoringJob.of(args))


def _calibration(args: CalibrationArgs) -> None:
    from engine.infer.calibration import calibration_job, run_calibration

    run_calibration(calibration_job(args))


def _evaluate(args: EvaluateArgs) -> None:
    from engine.infer.metrics import file_accuracy

    print(json.dumps(file_accuracy(args)))


def _bleu(args: BleuArgs) -> None:
    from engine.infer.metrics import file_bleu

    print(json.dumps(file_bleu(args)))


generate = command(GenerateArgs, run=_generate)
score = command(ScoreArgs, run=_score)
calibration = command(CalibrationArgs, run=_calibration)
evaluate = command(EvaluateArgs, run=_evaluate)
bleu = command(BleuArgs, run=_bleu)

COMMANDS = {"generate": generate, "evaluate": evaluate, "score": score, "calibration": calibration, "bleu": bleu}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        run_cli(COMMANDS)
    else:
        run_cli(generate)
