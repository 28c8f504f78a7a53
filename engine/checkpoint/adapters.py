"""LoRA adapters on disk: `lora.NN.safetensors` per tensor-parallel rank + `lora_config.json` (which
names the base checkpoint it was trained on), merged views of base + adapter, peft export, and
the model for inference (base + adapter merged)."""
from __future__ import annotations

import glob
import json
import os
from typing import Any, NamedTuple, Optional, Tuple

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from engine.checkpoint.files import NATIVE_FORMAT, CheckpointError, read_json, shard_files
from engine.checkpoint.loading import load_model, load_state_into
from engine.checkpoint.sources import ShardedSource, open_checkpoint
from engine.checkpoint.writers import check_save_dir
from engine.runtime.fileio import SafetensorsWriter, atomic_write_text, staged_directory
from engine.text.prompts import TEMPLATE_FILE
from engine.text.tokenizer import check_tokenizer_fits, load_tokenizer
from models.args import ModelArgs
from models.hf import HF_TARGET_NAMES, args_from_hf_config, hf_key_map, hf_table
from models.lora import LoRAConfig, apply_lora, lora_modules, lora_state_dict, merge_lora
from models.sharding import full_box, lora_layers, lora_specs

LORA_CONFIG = "lora_config.json"


def is_adapter(directory: Optional[str]) -> bool:
    return bool(directory) and os.path.exists(os.path.join(directory, LORA_CONFIG))


def adapter_and_base(ckpt_dir: Optional[str], lora_dir: Optional[str]) -> Tuple[str, Optional[str]]:
    """(base checkpoint, adapter or None) for a --ckpt_dir / --lora_dir pair: ckpt_dir may itself be
    an adapter written by training, whose lora_config.json names its base; an explicit base wins."""
    if lora_dir is None and is_adapter(ckpt_dir):
        ckpt_dir, lora_dir = None, ckpt_dir
    if lora_dir is None:
        return ckpt_dir, None
    base = ckpt_dir or read_lora_config(lora_dir)[1]
    if not base:
        raise CheckpointError(f"{lora_dir}: the adapter names no base checkpoint; pass --ckpt_dir BASE "
                              f"--lora_dir {lora_dir}")
    return base, lora_dir


def save_lora(model, cfg: LoRAConfig, directory: str, base_ckpt: Optional[str] = None) -> None:
    """Each rank writes its own shard; rank 0 writes lora_config.json and params.json."""
    tp, rank = get_model_parallel_world_size(), get_model_parallel_rank()
    sd = lora_state_dict(model)
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    w = SafetensorsWriter(os.path.join(directory, f"lora.{rank:02d}.safetensors"), layout,
                          {"format": NATIVE_FORMAT, "rank": str(rank), "world_size": str(tp)})
    for k, v in sd.items():
        w.write(k, v.float())
    w.close()
    if rank == 0:
        meta = {**cfg.to_dict(), "base_ckpt": os.path.abspath(base_ckpt) if base_ckpt else None}
        atomic_write_text(os.path.join(directory, LORA_CONFIG), json.dumps(meta, indent=2) + "\n")
        atomic_write_text(os.path.join(directory, "params.json"), model.args.to_json())


def read_lora_config(directory: str) -> Tuple[LoRAConfig, Optional[str]]:
    path = os.path.join(directory, LORA_CONFIG)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist (not a LoRA adapter directory)")
    raw = read_json(path)
    try:
        base = raw.pop("base_ckpt", None)
        return LoRAConfig(**raw), base
    except TypeError as e:
        raise CheckpointError(f"{path} is not a valid LoRA config ({e})") from None


def open_lora(directory: str, args: Optional[ModelArgs] = None):
    """(a ShardedSource over a LoRA adapter directory of any shard count, its LoRAConfig, its base)."""
    cfg, base = read_lora_config(directory)
    files = sorted(glob.glob(os.path.join(directory, "lora.*.safetensors")))
    if not files:
        raise CheckpointError(f"{directory} holds no lora.NN.safetensors files")
    if args is None:
        args = ModelArgs.load(os.path.join(directory, "params.json"))
    template = [p for p in [os.path.join(directory, TEMPLATE_FILE)] if os.path.exists(p)]  # travels on merges
    return ShardedSource(files, args, directory, template, specs=lora_specs(args, cfg.rank, cfg.targets)), cfg, base


def check_adapter_fits(directory: str, args: ModelArgs, base: str) -> None:
    """Refuse an adapter trained on another model than `args` (its params.json records the base's)."""
    path = os.path.join(directory, "params.json")
    if not os.path.exists(path):
        return
    saved = ModelArgs.load(path).to_dict()
    differ = [k for k, v in args.to_dict().items() if saved.get(k) != v]
    if differ:
        k = differ[0]
        raise CheckpointError(
            f"{directory} was trained on a different model than {base} ({k} {saved.get(k)!r} there, "
            f"{args.to_dict()[k]!r} here); pass the base it was trained on"
        )


def load_lora_into(model, directory: str, base: str = "the base model") -> LoRAConfig:
    """Add LoRA layers to `model` (as saved) and load this rank's part of the adapter."""
    check_adapter_fits(directory, model.args, base)
    src, cfg, _ = open_lora(directory, model.args)
    if not lora_modules(model):
        apply_lora(model, cfg)
    load_state_into(model, src, get_model_parallel_rank(), get_model_parallel_world_size(), only_specs=True)
    return cfg


class MergedSource:
    """A base checkpoint source with a LoRA adapter folded into its weights: W + scaling * B @ A,
    computed box by box so merging never holds more than one weight."""

    def __init__(self, base, lora_src, cfg: LoRAConfig):
        self.base, self.lora, self.cfg = base, lora_src, cfg
        self.args, self.description = base.args, f"{base.description} + LoRA"
        self.tokenizer_files = base.tokenizer_files + lora_src.tokenizer_files  # the adapter's prompt template
        self._lora = {sp.key: sp for sp in lora_src.specs()}

    def specs(self):
        return self.base.specs()

    def dtype(self, spec):
        return self.base.dtype(spec)

    def read(self, spec, box):
        w = self.base.read(spec, box)
        stem = spec.key[: -len(".weight")]
        a, b = self._lora.get(stem + ".lora_A"), self._lora.get(stem + ".lora_B")
        if a is None:
            return w
        (r0, r1), (c0, c1) = box
        A = self.lora.read(a, ((0, self.cfg.rank), (c0, c1))).float()
        B = self.lora.read(b, ((r0, r1), (0, self.cfg.rank))).float()
        return (w.float() + (B @ A) * self.cfg.scaling).to(w.dtype)


def open_with_adapter(ckpt_dir: Optional[str], lora_dir: Optional[str] = None):
    """The checkpoint as a source, with the adapter folded in when there is one (see adapter_and_base)."""
    base, lora_dir = adapter_and_base(ckpt_dir, lora_dir)
    if lora_dir is None:
        return open_checkpoint(base)
    lora_src, cfg, _ = open_lora(lora_dir)
    base_src = open_checkpoint(base)
    if base_src.args.to_dict() != lora_src.args.to_dict():
        raise CheckpointError(f"{lora_dir} was trained on a different model than {base}")
    return MergedSource(base_src, lora_src, cfg)


def peft_base_name(hf_base: Optional[str], native_base: Optional[str], args: ModelArgs) -> Optional[str]:
    """What adapter_config.json names as base_model_name_or_path, which AutoPeftModelForCausalLM loads:
    `hf_base` (a local HF directory, checked to hold this adapter's model, or a hub name), else the base
    checkpoint the adapter was trained on when that is an HF directory, else None (a native base is
    no model transformers can load)."""
    if hf_base is None:
        is_hf = native_base and os.path.isfile(os.path.join(native_base, "config.json")) and not shard_files(native_base)
        return os.path.abspath(native_base) if is_hf else None
    if not os.path.isdir(hf_base):
        if hf_base.startswith((".", "/", "~")) or os.path.exists(hf_base):
            raise CheckpointError(f"--hf_base {hf_base} is not a directory")
        return hf_base  # a model hub name
    config = os.path.join(hf_base, "config.json")
    if not os.path.isfile(config):
        raise CheckpointError(f"--hf_base {hf_base} holds no config.json (not an HF model directory)")
    theirs = args_from_hf_config(read_json(config), source=config)
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "n_experts")
    if any(getattr(theirs, k) != getattr(args, k) for k in shape):
        raise CheckpointError(f"--hf_base {hf_base} is a different model than the adapter's base ("
                              + ", ".join(f"{k} {getattr(theirs, k)} vs {getattr(args, k)}" for k in shape
                                          if getattr(theirs, k) != getattr(args, k)) + ")")
    return os.path.abspath(hf_base)


def export_peft(lora_dir: str, save_dir: str, overwrite: bool = False, hf_base: Optional[str] = None) -> None:
    """Write an HF peft adapter (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(hf_model, save_dir)` loads onto the HF model of the base, and
    `AutoPeftModelForCausalLM.from_pretrained(save_dir)` alone when it names an HF base (peft_base_name)."""
    src, cfg, base = open_lora(lora_dir)
    args = src.args
    base_name = peft_base_name(hf_base, base, args)
    names = hf_key_map(args, hf_table(args, for_export=True))
    check_save_dir(save_dir, overwrite)
    specs = src.specs()
    layout, keys = [], []
    for sp in specs:
        stem, part = sp.key.rsplit(".", 1)
        hf = names[stem + ".weight"][0][: -len(".weight")]
        keys.append(f"base_model.model.{hf}.{part}.weight")
        layout.append((keys[-1], torch.float32, sp.shape))
    targets = sorted({HF_TARGET_NAMES[name.rsplit(".", 1)[-1]] for name in lora_layers(args, cfg.targets)})
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
                      "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
                      "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_name,
                      "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    with staged_directory(save_dir, overwrite) as stage:
        w = SafetensorsWriter(os.path.join(stage, "adapter_model.safetensors"), layout, {"format": "pt"})
        for key, sp in zip(keys, specs):
            w.write(key, src.read(sp, full_box(sp)).float())
        w.close()
        atomic_write_text(os.path.join(stage, "adapter_config.json"), json.dumps(adapter_config, indent=2) + "\n")
    if base_name is None:
        print(f"note: {save_dir}/adapter_config.json names no HF base ({base} is a native checkpoint): pass "
              f"--hf_base (e.g. the output of `checkpoint_split.py to_hf --ckpt_dir {base}`) for "
              f"AutoPeftModelForCausalLM, or load it with PeftModel.from_pretrained(hf_model, {save_dir})", flush=True)


def check_finite_weights(model, where: str) -> None:
    """Refuse weights holding NaN or Inf (their outputs would be garbage), on any rank."""
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    flag = torch.tensor(0.0 if bad is None else 1.0, device=next(model.parameters()).device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        raise CheckpointError(
            f"{where} holds NaN or Inf weights ({bad or 'on another tensor-parallel rank'}); its outputs would be "
            f"meaningless: use a checkpoint saved before the run diverged"
        )


class InferenceModel(NamedTuple):
    """What load_for_inference returns: the model, its tokenizer (checked to fit its vocabulary; None
    when not asked for) and the base checkpoint directory they were read from."""

    model: Any
    tokenizer: Any
    base_dir: str


def load_for_inference(ckpt_dir: str, lora_dir: Optional[str], dtype, device, *, tokenizer: bool = True):
    """The model for generation/scoring: the base checkpoint with the adapter (if any) merged into its
    weights and q/k/v, gate/up fused, and the base's tokenizer, refused when its ids reach past the
    model's vocabulary. tokenizer=False: the model alone (a synthetic checkpoint without a tokenizer)."""
    base, lora_dir = adapter_and_base(ckpt_dir, lora_dir)
    model = load_model(base, dtype=dtype, device=device)
    if lora_dir:
        load_lora_into(model, lora_dir, base)
        merge_lora(model)
    check_finite_weights(model, base + (f" with the adapter {lora_dir}" if lora_dir else ""))
    model.fuse_projections()
    tok = None
    if tokenizer:
        tok = load_tokenizer(base)
        check_tokenizer_fits(tok, model.args.vocab_size, base)
    return InferenceModel(model, tok, base)
