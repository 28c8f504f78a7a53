"""Checkpoint I/O: native tensor-parallel shards, Meta's reference layout, HF directories, LoRA adapters.

Every format is a *source* that can read any box (a per-dimension range) of any weight, named by
its native key and expressed in the full, unsharded tensor's coordinates. Split, merge, reshard,
HF import/export, LoRA merging and loading a model at any tensor-parallel rank are all "read the
box this output needs, write it": one tensor at a time, so no conversion needs the whole model in
memory. How each weight is split over the ranks lives in models/sharding.py.

Native format: a directory with `params.json` (ModelArgs), the tokenizer file, and
`consolidated.NN.safetensors`, one per tensor-parallel rank, RoPE in the rotate-half convention.
Meta's reference layout (`consolidated.NN.pth`, also Mistral's `consolidated.safetensors`) uses the
same key names, interleaved RoPE rows and an embedding split on the hidden dimension.

  files.py     lazy tensor files, the files travelling with the weights, errors
  hf_names.py  HF names per family
  sources.py   native / Meta / HF / single-file / random sources, open_checkpoint
  writers.py   write_native, write_meta, write_hf, and a live model's shard
  loading.py   load_state_into, load_model
  adapters.py  LoRA adapters on disk, merged sources, peft export, the model for inference
"""
from engine.checkpoint.adapters import (  # noqa: F401
    LORA_CONFIG,
    InferenceModel,
    MergedSource,
    adapter_and_base,
    export_peft,
    is_adapter,
    load_for_inference,
    load_lora_into,
    open_lora,
    open_with_adapter,
    read_lora_config,
    save_lora,
)
from engine.checkpoint.files import (  # noqa: F401
    DTYPES,
    NATIVE_FORMAT,
    TOKENIZER_FILES,
    CheckpointError,
    tokenizer_files_for,
)
from engine.checkpoint.loading import load_model, load_state_into  # noqa: F401
from engine.checkpoint.sources import HFSource, RandomSource, ShardedSource, Source, open_checkpoint  # noqa: F401
from engine.checkpoint.writers import meta_params, write_hf, write_meta, write_model_shard, write_native  # noqa: F401
from models.hf import HF_DENSE, HF_MIXTRAL, HF_QWEN1, hf_key_map, hf_table  # noqa: F401
from models.sharding import WeightSpec, box_shape, shard_box, weight_specs  # noqa: F401
