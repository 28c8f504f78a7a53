"""Implicit chain of thought (seed 003) in four stages, under torchrun, on any of our families:

  torchrun --nproc_per_node N train_implicit.py teacher   --ckpt_dir C --save_dir runs/teacher --train_file train.txt
  torchrun --nproc_per_node N train_implicit.py mind_read --ckpt_dir C --save_dir runs/student --train_file train.txt \
      --teacher_dir runs/teacher/best
  torchrun --nproc_per_node N train_implicit.py emulator  --ckpt_dir C --save_dir runs/emulator --train_file train.txt \
      --teacher_dir runs/teacher/best
  torchrun --nproc_per_node N train_implicit.py couple    --student_dir runs/student/best \
      --emulator_dir runs/emulator/best --save_dir runs/coupled --train_file train.txt
  torchrun --nproc_per_node N train_implicit.py evaluate  --data_file test.txt \
      --model_dirs runs/teacher/best,runs/coupled/best [--output_file outputs.jsonl] [--results_file results.json]

Lines are `input||cot #### answer`. Every stage's flags, defaults and help: engine/distill/implicit/args.py;
the stages themselves: engine/distill/implicit/.
"""
from __future__ import annotations

from engine.distill.implicit.args import CoupleArgs, EmulatorArgs, EvaluateArgs, MindReadArgs, TeacherArgs
from engine.runtime.cli import launcher, run_cli


def run_stage(args) -> None:
    from engine.distill.implicit.stages import run_stage

    run_stage(args)


teacher = launcher(TeacherArgs, run=run_stage)
mind_read = launcher(MindReadArgs, run=run_stage)
emulator = launcher(EmulatorArgs, run=run_stage)
couple = launcher(CoupleArgs, run=run_stage)


def run_evaluate(args) -> None:
    from engine.distill.implicit.stages import run_evaluation
    from engine.runtime.outputs import Output, args_inputs, owned
    from engine.runtime.precision import dtype_from_flags

    outputs = [Output("--output_file", args.output_file or ""), Output("--results_file", args.results_file or "")]
    with owned(outputs, args_inputs(args), args.overwrite):
        run_evaluation(args.data_file, args.model_dirs.split(","), args.batch_size, args.max_new_tokens,
                       args.max_examples, (args.output_file, args.results_file),
                       dtype_from_flags(args.use_float16, args.use_bfloat16), args.tp_size, args.device)


evaluate = launcher(EvaluateArgs, run=run_evaluate)


COMMANDS = {"teacher": teacher, "mind_read": mind_read, "emulator": emulator, "couple": couple, "evaluate": evaluate}

if __name__ == "__main__":
    run_cli(COMMANDS)
