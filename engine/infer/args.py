"""The flags of infer.py's sub-commands, once: name, type, default, one line of help and checks.

One dataclass per sub-command (GenerateArgs, ScoreArgs, CalibrationArgs, EvaluateArgs, BleuArgs), the
flags several share as mixins: ModelSource (which model answers, in which precision, where) and
GenerationFlags (how it decodes). `command(cls, run=...)` (engine/runtime/cli.py) turns a class
into its fire entry point: signature, --help, the unknown-flag check and the README flag test all
read these fields. A class's FLAGS name its flags in --help order; a field it leaves out is a
setting the command fixes (CalibrationArgs decodes greedily, one answer per record).

Every check of a flag's value is in __post_init__; what needs the files (the records, the template
and task prefixes recorded with the model) is read when the job is built (engine/infer/jobs.py).
Nothing here imports torch at module level, so `infer.py --help` answers at once.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from engine.runtime.cli import check_seed, flag
from engine.runtime.errors import UserError
from engine.text.answers import check_task
from models.args import DECODE_ATTENTION

_CPU_OR_CUDA = "cpu or cuda (default: cuda when every process on this node has a GPU of its own)."
_TASK_PREFIX = "a step-by-step model's task: label (the default for such a model) or rationale."
_TASKS = "GSM8K / SVAMP / ASDiv / CSQA / ARITH"
_SCORING = (
    "ours (the answer the output states, compared by exact value), exact (the whole output must equal the "
    "label string; SVAMP / ASDiv: Python arithmetic values compared with ==, as distilling step-by-step "
    "scores) or mcc (the last number of the last line, as written, equal to the label: MCC-KD's code)."
)
_REPORT = (
    "ours (accuracy = correct / all) or authors (also accuracy_answered = correct / answered and answered: "
    "the MCC-KD authors' accuracy, unanswered outputs left out of the denominator)."
)


def _check_scoring_and_report(args) -> None:
    from engine.infer.metrics import check_report
    from engine.text.answers import check_scoring

    check_scoring(args.scoring)
    check_report(args.report)


_OVERWRITE = "replace an existing output_file (and the files beside it) instead of refusing it."


@dataclass(kw_only=True)
class CommandArgs:
    """The base of a sub-command's flags: its one-line SUMMARY (the --help description) and FLAGS,
    the flags it takes in --help order (empty: every flag field, in declaration order)."""

    SUMMARY: ClassVar[str] = ""
    FLAGS: ClassVar[Tuple[str, ...]] = ()


def _check_output_file(output_file: str) -> None:
    if os.path.isdir(output_file):
        raise UserError(f"--output_file {output_file} is a directory")


@dataclass(kw_only=True)
class ModelSource(CommandArgs):
    """Which model answers (a checkpoint, an adapter), with which prompts, in which precision, where."""

    ckpt_dir: str = flag("native checkpoint, HF directory, or LoRA adapter directory.")
    lora_dir: Optional[str] = flag("a LoRA adapter merged into the weights.", None)
    template: Optional[str] = flag("prompt template: default or none; default: the one recorded with the "
                                   "checkpoint.", None)
    task_prefix: Optional[str] = flag(_TASK_PREFIX, None)
    use_float16: bool = flag("run in fp16.", False)
    use_bfloat16: bool = flag("run in bf16.", False)
    device: Optional[str] = flag(_CPU_OR_CUDA, None)
    overwrite: bool = flag(_OVERWRITE, False)

    def check_precision(self) -> None:
        """Sets `dtype` (the torch dtype the flags ask for)."""
        from engine.runtime.precision import dtype_from_flags

        self.dtype = dtype_from_flags(self.use_float16, self.use_bfloat16)


@dataclass(kw_only=True)
class GenerationFlags(CommandArgs):
    """How responses are decoded: batch, budget, sampling, stops, long prompts, the decode path."""

    batch_size: int = flag("sequences decoded together (continuous batching refills finished slots).", 32)
    max_new_tokens: int = flag("generation budget per response.", 256)
    temperature: float = flag("0 for greedy decoding, > 0 to sample.", 0.0)
    top_p: float = flag("nucleus sampling mass in (0, 1].", 1.0)
    top_k: int = flag("sample from the k most likely tokens only (0: off).", 0)
    top_p_bound: int = flag("with --top_p (no --top_k): take the nucleus among this many most likely tokens "
                            "(torch.topk) instead of sorting the vocabulary each step: the same draws wherever they "
                            "hold top_p of the mass, elsewhere the nucleus is cut to them (the summary counts those "
                            "draws as top_p_cut_draws). 0: sort the vocabulary, exact.", 0)
    num_samples: int = flag("responses per record, sampled independently (seeded by --seed and the record).", 1)
    seed: int = flag("sampling seed.", 0)
    stop: Optional[str] = flag("stop string(s), comma separated, besides EOS; the output is cut before them.", None)
    long_prompts: str = flag("prompts leaving < max_new_tokens of room: skip (written with an error, counted wrong) "
                             "or truncate (left).", "skip")
    prefill_tokens: int = flag("token budget of one prefill pass.", 16384)
    share_prompts: bool = flag("a prompt several requests hold (--num_samples K) is prefilled once and its keys and "
                               "values kept once, in a shared prompt segment of the KV cache (False: a copy per "
                               "row).", True)
    progress: bool = flag("show a progress bar.", True)
    output_tokens: bool = flag("also write the generated token ids ('tokens') of each response.", False)
    compile: bool = flag("on a GPU, decode with CUDA graphs of a compiled step (False: eager; CPU is always eager).",
                         True)
    decode_attention: str = flag("auto (fused on a GPU where the Triton kernel passes a check against its torch twin, "
                                 "else dense), dense (every row reads the cache up to the batch's longest, batched "
                                 "matmuls), ragged (each row its own live keys only; eager steps: CPU, or --compile "
                                 "False) or fused (RoPE, the cache write and each row's live keys in one Triton "
                                 "kernel on a GPU, CUDA graphs included; its torch twin on the CPU).", "auto")
    tp_size: Optional[int] = flag("tensor-parallel size (default: all processes); world size / tp_size replicas each "
                                  "generate a share of the records into the one output file.", None)

    def check_generation(self) -> None:
        """Sets `stops` (the stop strings as a tuple)."""
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if self.top_p_bound < 0:
            raise UserError(f"--top_p_bound must be >= 0 (0: the whole vocabulary), got {self.top_p_bound}")
        if self.tp_size is not None and self.tp_size < 1:
            raise UserError(f"--tp_size must be >= 1 (default: all processes), got {self.tp_size}")
        for name in ("num_samples", "batch_size", "max_new_tokens", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise UserError(f"--decode_attention must be {', '.join(DECODE_ATTENTION[:-1])} or {DECODE_ATTENTION[-1]}, "
                            f"got {self.decode_attention!r}")
        if self.long_prompts not in ("skip", "truncate"):
            raise UserError(f"--long_prompts must be skip or truncate, got {self.long_prompts!r}")
        check_seed(self.seed)
        if self.temperature == 0:  # greedy: the sampling flags would be silently ignored
            if self.num_samples > 1:
                raise UserError(
                    f"--num_samples {self.num_samples} with --temperature 0 gives {self.num_samples} identical "
                    f"greedy answers; pass --temperature > 0 to sample them"
                )
            for name, off in (("top_p", 1.0), ("top_k", 0), ("top_p_bound", 0)):
                if getattr(self, name) != off:
                    raise UserError(
                        f"--{name} {getattr(self, name)} has no effect with --temperature 0 (greedy decoding); "
                        f"pass --temperature > 0 to sample, or leave --{name} out"
                    )
        elif self.top_p_bound and (self.top_p >= 1 or self.top_k):
            raise UserError(
                f"--top_p_bound {self.top_p_bound} has no effect " + (
                    f"with --top_k {self.top_k} (top-k already samples among the k most likely tokens)" if self.top_k
                    else "without --top_p below 1 (nothing to bound)") + "; leave --top_p_bound out")
        stop = self.stop
        self.stops = tuple(s for s in (stop.split(",") if isinstance(stop, str) else list(stop or [])) if s)

    @property
    def compiled(self) -> Optional[bool]:
        """The decode path asked for: None (the fastest the device allows) or False (eager)."""
        return None if self.compile else False


@dataclass(kw_only=True)
class GenerateArgs(ModelSource, GenerationFlags):
    SUMMARY: ClassVar[str] = ("Generate responses for every record of data_file; one JSON line per record in "
                              "output_file.")
    FLAGS: ClassVar[Tuple[str, ...]] = (
        "ckpt_dir",
        "data_file",
        "output_file",
        "task",
        "scoring",
        "report",
        "batch_size",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "top_p_bound",
        "num_samples",
        "template",
        "seed",
        "use_float16",
        "use_bfloat16",
        "lora_dir",
        "stop",
        "long_prompts",
        "prefill_tokens",
        "share_prompts",
        "progress",
        "output_tokens",
        "compile",
        "decode_attention",
        "tp_size",
        "device",
        "task_prefix",
        "overwrite",
        "prompt_file",
    )

    ckpt_dir: str = flag("native checkpoint (any shard count: resharded on load), an HF directory, or a LoRA adapter "
                         "directory.")
    data_file: str = flag("MCC-KD JSON list or JSON lines with 'instruction' (and optional 'label', 'id').")
    output_file: str = flag(
        "JSON lines; rerunning with the same file resumes (finished records are kept; --overwrite True starts afresh)."
    )
    task: Optional[str] = flag(f"{_TASKS}: extract the answers and score them against 'label'.", None)
    scoring: str = flag(f"with --task: {_SCORING}", "ours")
    report: str = flag(f"with --task, the summary's accuracy: {_REPORT}", "ours")
    template: Optional[str] = flag(
        "prompt template: default (instruction / response) or none (verbatim after BOS); default: the checkpoint's.",
        None,
    )
    lora_dir: Optional[str] = flag("a LoRA adapter from training, merged into the weights.", None)
    prompt_file: Optional[str] = flag(
        "few-shot demonstrations before each question (e.g. shared/data/prompts/gsm8k_complex_cot.txt): the file, a "
        "blank line, then 'Question: {instruction}' and the cue line all its demonstrations share; a file holding "
        "{instruction} is filled in instead. Implies --template none and stops at the next 'Question:'.", None)

    def __post_init__(self):
        self.check_generation()
        if self.prompt_file:
            from engine.text.prompts import few_shot_parts, read_prompt_file

            demos = read_prompt_file(self.prompt_file)
            marker = "Question:" if "{instruction}" in demos else few_shot_parts(demos, self.prompt_file)[0]
            self.stops = tuple(dict.fromkeys(self.stops + ("\n" + marker,)))
        _check_output_file(self.output_file)
        self.check_precision()
        self.task = check_task(self.task) if self.task else None
        _check_scoring_and_report(self)


@dataclass(kw_only=True)
class CalibrationArgs(ModelSource, GenerationFlags):
    """Greedy decoding, one answer per record (the generation settings left out of FLAGS keep their
    defaults), long prompts cut from the left, no progress bar."""

    SUMMARY: ClassVar[str] = ("Calibration error (ECE) of the first answer token's probability vs correctness, "
                              "with a reliability diagram.")
    FLAGS: ClassVar[Tuple[str, ...]] = (
        "ckpt_dir",
        "data_file",
        "output_file",
        "task",
        "batch_size",
        "max_new_tokens",
        "binning",
        "num_bins",
        "correctness",
        "plot_file",
        "template",
        "task_prefix",
        "lora_dir",
        "use_float16",
        "use_bfloat16",
        "device",
        "overwrite",
    )

    data_file: str = flag("records with 'instruction' and 'label'.")
    output_file: str = flag("JSON lines per record (output, prediction, correct, confidence); the summary goes to "
                            "OUTPUT.summary.json.")
    task: str = flag(f"{_TASKS}: how answers are read and scored.")
    batch_size: int = flag("sequences decoded (and scored) together.", 32)
    max_new_tokens: int = flag("generation budget per answer.", 256)
    binning: str = flag(
        "confidence bins of the calibration error: equal_width (ours) or equal_mass (Chen et al.'s: sorted, "
        "ceil(N / num_bins) records per bin).",
        "equal_width",
    )
    num_bins: Optional[int] = flag("bins of the calibration error; default 10 (equal_width) or 100 (equal_mass).", None)
    correctness: str = flag(
        "what counts as right: answer (ours: the whole stated answer vs 'label') or token (Chen et al.'s: the "
        "answer's first token id == the first token id of 'label' encoded as a response).",
        "answer",
    )
    plot_file: Optional[str] = flag(
        "the reliability diagram (PNG); default: OUTPUT without its extension + .reliability.png.", None
    )
    long_prompts: str = dataclasses.field(default="truncate", init=False)
    progress: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        from engine.infer.metrics import BINNINGS, DEFAULT_BINS

        if self.binning not in BINNINGS:
            raise UserError(f"--binning {self.binning!r} is not one of {', '.join(BINNINGS)}")
        if self.correctness not in ("answer", "token"):
            raise UserError(f"--correctness {self.correctness!r} is not one of answer, token")
        if self.num_bins is None:
            self.num_bins = DEFAULT_BINS[self.binning]
        if self.num_bins < 1:
            raise UserError(f"--num_bins must be >= 1, got {self.num_bins}")
        self.check_generation()
        _check_output_file(self.output_file)
        self.check_precision()
        self.task = check_task(self.task)

    @property
    def plot_path(self) -> str:
        return self.plot_file or os.path.splitext(self.output_file)[0] + ".reliability.png"


@dataclass(kw_only=True)
class ScoreArgs(ModelSource):
    SUMMARY: ClassVar[str] = ("Per-record log-likelihood of `output` given `instruction`: sum and mean over the "
                              "output tokens.")
    FLAGS: ClassVar[Tuple[str, ...]] = (
        "ckpt_dir", "data_file", "output_file", "batch_size", "template", "lora_dir", "use_float16", "use_bfloat16",
        "include_eos", "device", "task_prefix", "top_k", "tp_size", "overwrite")

    data_file: str = flag("records with 'instruction' and 'output' (a string, or a list: one score each).")
    output_file: str = flag("JSON lines in input order: id, index, sum_logprob, mean_logprob, n_tokens (lists for "
                            "list outputs).")
    batch_size: int = flag("sequences per forward pass.", 16)
    include_eos: bool = flag("score the EOS that ends each output too.", True)
    top_k: int = flag("also write each output token's k most likely tokens and log-probabilities (tokens, topk_ids, "
                      "topk_logprobs; OUTPUT.meta.json): a teacher file for train.py --objective teacher_kl (e.g. 5).",
                      0)
    tp_size: Optional[int] = flag("tensor-parallel size (default: all processes); world size / tp_size replicas each "
                                  "score a share of the sequences into the one output file.", None)

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.tp_size is not None and self.tp_size < 1:
            raise UserError(f"--tp_size must be >= 1 (default: all processes), got {self.tp_size}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0: no top-k), got {self.top_k}")
        _check_output_file(self.output_file)
        self.check_precision()


@dataclass(kw_only=True)
class EvaluateArgs(CommandArgs):
    SUMMARY: ClassVar[str] = ("Accuracy of a predictions file (or of any text field, e.g. the gold rationales of a "
                              "data file).")

    task: str = flag(f"{_TASKS}.")
    predictions_file: str = flag("JSON list or JSON lines holding `field` (and 'label' unless label_file is given).")
    label_file: Optional[str] = flag("records whose 'label' is the gold answer, in the same order as the "
                                     "predictions.", None)
    field: str = flag("the text field to score; a list (several samples) scores each of its items.", "output")
    scoring: str = flag(_SCORING, "ours")
    report: str = flag(_REPORT, "ours")
    output_file: Optional[str] = flag("also write each record's prediction(s) and correctness here (JSON lines; a "
                                      "list field adds majority, majority_votes, majority_correct and pass).", None)

    def __post_init__(self):
        self.task = check_task(self.task)
        _check_scoring_and_report(self)
        if self.output_file:
            _check_output_file(self.output_file)
            for name in ("predictions_file", "label_file"):
                if getattr(self, name) and os.path.abspath(getattr(self, name)) == os.path.abspath(self.output_file):
                    raise UserError(f"--output_file {self.output_file} is the --{name}: choose another file")


@dataclass(kw_only=True)
class BleuArgs(CommandArgs):
    SUMMARY: ClassVar[str] = (
        "BLEU (13a tokens, 4-grams) of generated rationales against the teacher's: corpus (sacreBLEU's default) "
        "or the authors' sentence_mean."
    )

    predictions_file: str = flag("JSON list or JSON lines holding `field` (one generated text per record).")
    references_file: str = flag("records in the same order whose `reference_field` holds the teacher rationale (or a "
                                "list: several references).")
    field: str = flag("the generated text field.", "output")
    reference_field: str = flag("the reference text field.", "output")
    bleu: str = flag(
        "corpus (ours: sacreBLEU's corpus BLEU, exp smoothing, 0-100) or sentence_mean (Chen et al.'s: HF "
        "evaluate's unsmoothed BLEU of each record, 0-1, averaged; an empty prediction scores 0).",
        "corpus",
    )

    def __post_init__(self):
        from engine.infer.metrics import BLEU_KINDS

        if self.bleu not in BLEU_KINDS:
            raise UserError(f"--bleu {self.bleu!r} is not one of {', '.join(BLEU_KINDS)}")
