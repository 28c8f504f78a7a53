"""One conversion tool for checkpoints (fire CLI): every format in, every format out, one tensor at a
time. Its name is the seed's; its commands:

  python checkpoint_split.py --ckpt_file F --save_path D --n 8          # the seed's form: split one file
  python checkpoint_split.py split|merge|reshard --ckpt_dir IN --save_dir OUT [--n N]   # N shards -> M
  python checkpoint_split.py from_hf --hf_dir IN --save_dir OUT [--n N]                  # HF -> native
  python checkpoint_split.py to_hf --ckpt_dir IN --save_dir OUT [--lora_dir L] [--merge_lora True]
  python checkpoint_split.py to_meta --ckpt_dir IN --save_dir OUT [--n N]                # Meta's layout
  python checkpoint_split.py merge_lora --lora_dir L --save_dir OUT [--ckpt_dir BASE]    # adapter -> weights
  python checkpoint_split.py export_peft --lora_dir L --save_dir OUT [--hf_base HF]       # adapter -> peft
  python checkpoint_split.py init --model_type NAME --save_dir OUT --n N --tokenizer PATH [--seed S]
  python checkpoint_split.py info --ckpt_dir IN
"""
import math
import sys

from engine import checkpoint as ck
from engine.runtime.cli import run_cli
from engine.runtime.outputs import writes

# Every command that writes is guarded (engine/runtime/outputs.py): its output is never its input (nor
# inside or around it, the base an adapter names included), an existing one is replaced only with
# --overwrite True, it is locked (OUTPUT.lock beside it) while written, and OS errors are one sentence.
_save_dir = writes("save_dir", dirs=("save_dir",), inputs=("tokenizer",), more_inputs=lambda v: _adapter_base(v))


def _adapter_base(values) -> list:
    """The base checkpoint an adapter (--lora_dir, or a --ckpt_dir that is one) names: an input too."""
    ckpt, lora = values.get("ckpt_dir"), values.get("lora_dir")
    if not (lora or ck.is_adapter(ckpt)):
        return []
    try:
        base, _ = ck.adapter_and_base(ckpt, lora)
    except ck.CheckpointError:
        return []  # the conversion itself says what is wrong
    return [("--ckpt_dir (the adapter's base)", base)] if base else []


def _dtype(dtype):
    if dtype is None:
        return None
    if dtype not in ck.DTYPES:
        raise ck.CheckpointError(f"--dtype {dtype!r} is not one of {', '.join(ck.DTYPES)}")
    return ck.DTYPES[dtype]


@writes("save_path", dirs=("save_path",))
def split_file(
    ckpt_file: str, save_path: str, n: int = 8, model_type: str = None, dtype: str = None, overwrite: bool = False
):
    """Split one state-dict file (.pth / .bin / .safetensors; native, Meta or HF names) into n native shards.

    Args:
        ckpt_file: the checkpoint file; params.json or config.json must sit beside it, or pass --model_type.
        save_path: output directory (refused if it holds files, unless --overwrite True).
        n: number of tensor-parallel shards.
        model_type: registry name used when no params.json / config.json is beside the file.
        dtype: convert weights to fp32 / bf16 / fp16 (default: keep).
        overwrite: replace a non-empty save_path.
    """
    ck.write_native(ck.open_checkpoint(ckpt_file, model_type), save_path, n, _dtype(dtype), overwrite)
    print(f"wrote {n} shard(s) to {save_path}")


@_save_dir
def reshard(ckpt_dir: str, save_dir: str, n: int, dtype: str = None, overwrite: bool = False, model_type: str = None):
    """Rewrite a native / Meta / HF checkpoint as n native tensor-parallel shards.

    Args:
        ckpt_dir: input checkpoint directory (any shard count) or file.
        save_dir: output directory.
        n: number of shards to write.
        dtype: convert weights to fp32 / bf16 / fp16 (default: keep).
        overwrite: replace a non-empty save_dir.
        model_type: registry name used when the input carries no params.json.
    """
    ck.write_native(ck.open_checkpoint(ckpt_dir, model_type), save_dir, n, _dtype(dtype), overwrite)
    print(f"wrote {n} shard(s) to {save_dir}")


split = reshard  # "split 1 -> N" is a reshard; kept as its own command name for the seed's users


@_save_dir
def merge(ckpt_dir: str, save_dir: str, dtype: str = None, overwrite: bool = False, model_type: str = None):
    """Merge a sharded checkpoint into one native shard (reshard with n=1).

    Args:
        ckpt_dir: input checkpoint directory (any shard count).
        save_dir: output directory.
        dtype: convert weights to fp32 / bf16 / fp16 (default: keep).
        overwrite: replace a non-empty save_dir.
        model_type: registry name used when the input carries no params.json.
    """
    reshard.__wrapped__(ckpt_dir, save_dir, 1, dtype, overwrite, model_type)  # guarded here already


@_save_dir
def from_hf(hf_dir: str, save_dir: str, n: int = 1, dtype: str = None, overwrite: bool = False):
    """Convert an HF directory (Llama, Mistral, Mixtral, Qwen2, Qwen-1) into n native shards.

    Args:
        hf_dir: HF model directory with config.json and (sharded) safetensors or pytorch_model*.bin.
        save_dir: output directory.
        n: number of tensor-parallel shards.
        dtype: convert weights to fp32 / bf16 / fp16 (default: keep).
        overwrite: replace a non-empty save_dir.
    """
    src = ck.open_checkpoint(hf_dir)
    if not isinstance(src, ck.HFSource):
        raise ck.CheckpointError(f"{hf_dir} is not an HF model directory (it holds consolidated.* shards)")
    ck.write_native(src, save_dir, n, _dtype(dtype), overwrite)
    print(f"wrote {n} shard(s) to {save_dir}")


@_save_dir
def to_hf(
    ckpt_dir: str,
    save_dir: str,
    dtype: str = None,
    overwrite: bool = False,
    lora_dir: str = None,
    merge_lora: bool = False,
):
    """Write a checkpoint as an HF directory that AutoModelForCausalLM.from_pretrained loads.

    Args:
        ckpt_dir: native / Meta checkpoint directory (any shard count), or a LoRA adapter directory from training.
        save_dir: output directory.
        dtype: convert weights to fp32 / bf16 / fp16 (default: keep).
        overwrite: replace a non-empty save_dir.
        lora_dir: a LoRA adapter (lora.NN.safetensors + lora_config.json) to use with ckpt_dir as its base.
        merge_lora: fold the adapter into the weights; otherwise write the base plus a peft adapter in save_dir/adapter.
    """
    import os

    src = ck.open_with_adapter(ckpt_dir, lora_dir)
    adapter = ck.adapter_and_base(ckpt_dir, lora_dir)[1]
    if adapter and not merge_lora:
        src = src.base
    ck.write_hf(src, save_dir, _dtype(dtype), overwrite)
    if adapter and not merge_lora:
        ck.export_peft(adapter, os.path.join(save_dir, "adapter"), hf_base=save_dir)
        print(f"wrote an HF model to {save_dir} and its peft adapter to {save_dir}/adapter")
    else:
        print(f"wrote an HF model to {save_dir}" + (" (LoRA merged)" if adapter else ""))


@_save_dir
def merge_lora(
    lora_dir: str, save_dir: str, ckpt_dir: str = None, n: int = None, dtype: str = None, overwrite: bool = False
):
    """Fold a LoRA adapter into its base weights and write native shards.

    Args:
        lora_dir: adapter directory written by training (lora.NN.safetensors + lora_config.json).
        save_dir: output directory.
        ckpt_dir: the base checkpoint (default: the one recorded in lora_config.json).
        n: number of shards (default: as many as the adapter has).
        dtype: convert weights to fp32 / bf16 / fp16 (default: keep the base's).
        overwrite: replace a non-empty save_dir.
    """
    src = ck.open_with_adapter(ckpt_dir, lora_dir)
    n = n or src.lora.n
    ck.write_native(src, save_dir, n, _dtype(dtype), overwrite)
    print(f"wrote the merged model ({n} shard(s)) to {save_dir}")


@_save_dir
def export_peft(lora_dir: str, save_dir: str, overwrite: bool = False, hf_base: str = None):
    """Write an HF peft adapter (adapter_config.json + adapter_model.safetensors) from a LoRA adapter.

    Args:
        lora_dir: adapter directory written by training.
        save_dir: output directory; load it with peft.PeftModel.from_pretrained(hf_model, save_dir).
        overwrite: replace a non-empty save_dir.
        hf_base: the HF model the adapter applies to (an HF directory, e.g. to_hf's output of the base, or a hub name), recorded as base_model_name_or_path for AutoPeftModelForCausalLM (default: the base when it is an HF directory).
    """
    ck.export_peft(lora_dir, save_dir, overwrite, hf_base)
    print(f"wrote a peft adapter to {save_dir}")


@_save_dir
def to_meta(ckpt_dir: str, save_dir: str, n: int = 1, overwrite: bool = False):
    """Write Meta's reference layout (consolidated.NN.pth, interleaved RoPE, Meta params.json).

    Args:
        ckpt_dir: input checkpoint directory.
        save_dir: output directory.
        n: number of Meta shards.
        overwrite: replace a non-empty save_dir.
    """
    ck.write_meta(ck.open_checkpoint(ckpt_dir), save_dir, n, overwrite)
    print(f"wrote {n} Meta shard(s) to {save_dir}")


@_save_dir
def init(
    model_type: str,
    save_dir: str,
    n: int = 1,
    tokenizer: str = None,
    seed: int = 0,
    dtype: str = "fp32",
    overwrite: bool = False,
):
    """Write a randomly initialised checkpoint (training from scratch, tests, the demo).

    Args:
        model_type: registry name (e.g. tiny-llama, small-llama, llama-2-7b; a lora- prefix is ignored here).
        save_dir: output directory.
        n: number of tensor-parallel shards.
        tokenizer: tokenizer.model / tokenizer.json copied into the checkpoint; tiny presets take its vocabulary size.
        seed: random seed; the weights depend only on it, not on n.
        dtype: fp32 / bf16 / fp16.
        overwrite: replace a non-empty save_dir.
    """
    from engine.text.tokenizer import load_tokenizer
    from models.registry import model_args_for, parse_model_type

    base, _ = parse_model_type(model_type)
    args = model_args_for(base)
    files = []
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        files = ck.tokenizer_files_for(tok.path)
        if base.startswith(("tiny-", "small-")):
            args.vocab_size = -(-tok.vocab_size // 64) * 64
        elif tok.vocab_size > args.vocab_size:
            raise ck.CheckpointError(f"--tokenizer {tokenizer} has {tok.vocab_size} tokens, more than "
                                     f"{model_type}'s vocabulary of {args.vocab_size}")
    ck.write_native(ck.RandomSource(args, seed, tokenizer_files=files), save_dir, n, _dtype(dtype), overwrite)
    print(f"wrote a random {base} ({n} shard(s)) to {save_dir}")


def info(ckpt_dir: str):
    """Print a checkpoint's model arguments and layout.

    Args:
        ckpt_dir: a native, Meta or HF checkpoint directory (or file).
    """
    src = ck.open_checkpoint(ckpt_dir)
    kind = type(src).__name__
    shards = getattr(src, "n", 1)
    n_params = sum(math.prod(sp.shape) for sp in src.specs())
    print(f"{ckpt_dir}: {kind}, {shards} shard(s), {n_params / 1e6:.2f}M parameters")
    for k, v in src.args.to_dict().items():
        print(f"  {k}: {v}")


COMMANDS = {"split": split, "merge": merge, "reshard": reshard, "from_hf": from_hf, "to_hf": to_hf,
            "to_meta": to_meta, "init": init, "info": info, "merge_lora": merge_lora, "export_peft": export_peft}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS or "--ckpt_file" not in " ".join(sys.argv[1:]):
        run_cli(COMMANDS)
    else:
        run_cli(split_file)
