"""HF transformers names of native weights: one table per family, and the one choice of table."""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

from engine.checkpoint.files import CheckpointError
from models.args import ModelArgs
from models.sharding import weight_specs

# HF name tables: one per family; {i} = layer, {e} = expert
_HF_COMMON = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wq.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attention.wk.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attention.wv.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
HF_DENSE = {
    **_HF_COMMON,
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}
HF_MIXTRAL = {
    **_HF_COMMON,
    "layers.{i}.feed_forward.gate.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.feed_forward.experts.{e}.w1.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{i}.feed_forward.experts.{e}.w2.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "layers.{i}.feed_forward.experts.{e}.w3.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}
HF_QWEN1 = {  # QWenLMHeadModel: fused c_attn (q, k, v), and its w2 is the SiLU-gated branch
    "tok_embeddings.weight": "transformer.wte.weight",
    "norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": ("transformer.h.{i}.attn.c_attn.weight", 0),
    "layers.{i}.attention.wk.weight": ("transformer.h.{i}.attn.c_attn.weight", 1),
    "layers.{i}.attention.wv.weight": ("transformer.h.{i}.attn.c_attn.weight", 2),
    "layers.{i}.attention.wq.bias": ("transformer.h.{i}.attn.c_attn.bias", 0),
    "layers.{i}.attention.wk.bias": ("transformer.h.{i}.attn.c_attn.bias", 1),
    "layers.{i}.attention.wv.bias": ("transformer.h.{i}.attn.c_attn.bias", 2),
    "layers.{i}.attention.wo.weight": "transformer.h.{i}.attn.c_proj.weight",
    "layers.{i}.attention_norm.weight": "transformer.h.{i}.ln_1.weight",
    "layers.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "layers.{i}.feed_forward.w1.weight": "transformer.h.{i}.mlp.w2.weight",
    "layers.{i}.feed_forward.w2.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "transformer.h.{i}.mlp.w1.weight",
}


def hf_table(args: ModelArgs, for_export: bool = False) -> dict:
    """The name table of this family: Qwen-1 reads with its own names and is written under Qwen2's
    (the same architecture with HF's built-in names); Mixtral has its MoE names; the rest are dense."""
    if args.family == "qwen" and not for_export:
        return HF_QWEN1
    return HF_MIXTRAL if args.n_experts else HF_DENSE


# LoRA target -> the module name peft adapts in the HF model
HF_TARGET_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                   "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}


def hf_key_map(args: ModelArgs, table: Optional[dict] = None) -> Dict[str, Tuple[str, Optional[int]]]:
    """native key -> (HF key, part of a fused q/k/v tensor or None)."""
    table = table or hf_table(args)
    patterns = []
    for native, hf in table.items():
        hf, part = hf if isinstance(hf, tuple) else (hf, None)
        rx = re.escape(native).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        patterns.append((re.compile(rx + "$"), hf, part))
    out = {}
    for sp in weight_specs(args):
        for rx, hf, part in patterns:
            m = rx.match(sp.key)
            if m:
                out[sp.key] = (hf.format(**m.groupdict()), part)
                break
        else:
            raise CheckpointError(f"no HF name for {sp.key} in the {args.family} key map")
    return out


