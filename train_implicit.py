"""Implicit chain of thought (seed 003) in four stages, under torchrun, on any of our families:

  torchrun --nproc_per_node N train_implicit.py teacher   --ckpt_dir C --save_dir runs/teacher --train_file train.txt
  torchrun --nproc_per_node N train_implicit.py mind_read --ckpt_dir C --save_dir runs/student --train_file train.txt \
      --teacher_dir runs/teacher/best
  torchrun --nproc_per_node N train_implicit.py emulator  --ckpt_dir C --save_dir runs/emulator --train_file train.txt \
      --teacher_dir runs/teacher/best
  torchrun --nproc_per_node N train_implicit.py couple    --student_dir runs/student/best \
      --emulator_dir runs/emulator/best --save_dir runs/coupled --train_file train.txt
  torchrun --nproc_per_node N train_implicit.py evaluate  --data_file test.txt \
      --model_dirs runs/teacher/best,runs/coupled/best

Lines are `input||cot #### answer`. Every stage's flags, defaults and help: engine/distill/implicit/args.py;
the stages themselves: engine/distill/implicit/.
"""

from __future__ import annotations

from engine.distill.implicit.args import CoupleArgs, EmulatorArgs, MindReadArgs, TeacherArgs
from engine.runtime.cli import launcher, run_cli
from engine.runtime.outputs import writes


def run_stage(args) -> None:
    from engine.distill.implicit.stages import run_stage

    run_stage(args)


teacher = launcher(TeacherArgs, run=run_stage)
mind_read = launcher(MindReadArgs, run=run_stage)
emulator = launcher(EmulatorArgs, run=run_stage)
couple = launcher(CoupleArgs, run=run_stage)


@writes("output_file")
def evaluate(
    data_file: str,
    model_dirs: str,
    batch_size: int = 64,
    max_new_tokens: int = 128,
    max_examples: int = 0,
    output_file: str = None,
    use_float16: bool = False,
    use_bfloat16: bool = False,
    tp_size: int = None,
    device: str = None,
    overwrite: bool = False,
):
    """Accuracy and examples/s of saved stages on the same lines: the teacher decoding its CoT, the no-CoT baseline, the mind-reading student (states from the teacher on the gold CoT), the coupled student (states from its emulator); an emulator's state error.

    Args:
        data_file: `input||cot #### answer` lines (the CoT is read only by a mind-reading student's teacher).
        model_dirs: comma-separated model directories saved by train_implicit.py (a stage's save_dir means its best/).
        batch_size: lines decoded together (the same for every stage, so their examples/s compare).
        max_new_tokens: generation budget per line.
        max_examples: evaluate the first N lines only (0: all).
        output_file: also write the results as a JSON list here.
        use_float16: run in fp16.
        use_bfloat16: run in bf16.
        tp_size: tensor-parallel size (default: all processes).
        device: cpu or cuda (default: cuda when every process on this node has a GPU of its own).
        overwrite: replace an existing output_file.
    """
    from engine.distill.implicit.stages import run_evaluation
    from engine.runtime.errors import UserError
    from engine.runtime.precision import dtype_from_flags

    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if max_examples < 0:
        raise UserError(f"--max_examples must be >= 0, got {max_examples}")
    dirs = [d for d in (model_dirs.split(",") if isinstance(model_dirs, str) else list(model_dirs)) if d]
    if not dirs:
        raise UserError("--model_dirs names no directory")
    run_evaluation(
        data_file,
        dirs,
        batch_size,
        max_new_tokens,
        max_examples,
        output_file,
        dtype_from_flags(use_float16, use_bfloat16),
        tp_size,
        device,
    )


COMMANDS = {"teacher": teacher, "mind_read": mind_read, "emulator": emulator, "couple": couple, "evaluate": evaluate}

if __name__ == "__main__":
    run_cli(COMMANDS)
