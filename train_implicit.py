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

from dataclasses import dataclass
from typing import ClassVar, Optional

from engine.distill.implicit.args import CoupleArgs, EmulatorArgs, MindReadArgs, TeacherArgs
from engine.runtime.cli import command, flag, launcher, run_cli
from engine.runtime.errors import UserError


def run_stage(args) -> None:
    from engine.distill.implicit.stages import run_stage

    run_stage(args)


teacher = launcher(TeacherArgs, run=run_stage)
mind_read = launcher(MindReadArgs, run=run_stage)
emulator = launcher(EmulatorArgs, run=run_stage)
couple = launcher(CoupleArgs, run=run_stage)


@dataclass(kw_only=True)
class EvaluateArgs:
    SUMMARY: ClassVar[str] = (
        "Accuracy and examples/s of saved stages on the same lines: the teacher decoding its CoT, the no-CoT "
        "baseline, the mind-reading student (states from the teacher on the gold CoT), the coupled student "
        "(states from its emulator); an emulator's state error."
    )

    data_file: str = flag("`input||cot #### answer` lines (the CoT is read only by a mind-reading student's teacher).")
    model_dirs: str = flag(
        "comma-separated model directories saved by train_implicit.py (a stage's save_dir means its best/)."
    )
    batch_size: int = flag("lines decoded together (the same for every stage, so their examples/s compare).", 64)
    max_new_tokens: int = flag("generation budget per line.", 128)
    max_examples: int = flag("evaluate the first N lines only (0: all).", 0)
    output_file: Optional[str] = flag("also write the results as a JSON list here.", None)
    use_float16: bool = flag("run in fp16.", False)
    use_bfloat16: bool = flag("run in bf16.", False)
    tp_size: Optional[int] = flag("tensor-parallel size (default: all processes).", None)
    device: Optional[str] = flag(
        "cpu or cuda (default: cuda when every process on this node has a GPU of its own).", None
    )
    overwrite: bool = flag("replace an existing output_file.", False)

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples < 0:
            raise UserError(f"--max_examples must be >= 0, got {self.max_examples}")
        dirs = self.model_dirs.split(",") if isinstance(self.model_dirs, str) else list(self.model_dirs)
        self.dirs = [d for d in dirs if d]
        if not self.dirs:
            raise UserError("--model_dirs names no directory")


def _evaluate(args: EvaluateArgs) -> None:
    from engine.distill.implicit.stages import run_evaluation
    from engine.runtime.outputs import Output, args_inputs, owned
    from engine.runtime.precision import dtype_from_flags

    with owned([Output("--output_file", args.output_file or "")], args_inputs(args), args.overwrite):
        run_evaluation(
            args.data_file,
            args.dirs,
            args.batch_size,
            args.max_new_tokens,
            args.max_examples,
            args.output_file,
            dtype_from_flags(args.use_float16, args.use_bfloat16),
            args.tp_size,
            args.device,
        )


evaluate = command(EvaluateArgs, run=_evaluate)


COMMANDS = {"teacher": teacher, "mind_read": mind_read, "emulator": emulator, "couple": couple, "evaluate": evaluate}

if __name__ == "__main__":
    run_cli(COMMANDS)
