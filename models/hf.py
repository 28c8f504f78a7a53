"""HF transformers checkpoints as data: config.json in and out, and the HF names of native weights (one table
per family, and the one choice of table)."""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

from models.args import ConfigError, FieldError, ModelArgs
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
            raise ConfigError(f"no HF name for {sp.key} in the {args.family} key map")
    return out


# ----- config.json -------------------------------------------------------------------------
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "QWenLMHeadModel": "qwen",
}


# the config.json key behind each ModelArgs field, for sentences about an HF file
HF_CONFIG_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "max_seq_len": "max_position_embeddings",
    "sliding_window": "sliding_window",
    "n_experts": "num_local_experts",
    "n_experts_per_tok": "num_experts_per_tok",
}


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from an HF config.json (LLaMA, Mistral, Mixtral, Qwen2, Qwen-1); a key that is missing
    or holds a value no model can have is one sentence naming the file and the key."""
    try:
        return _args_from_hf_config(cfg, source)
    except FieldError as e:
        key = e.key.split(".")[0]
        raise ConfigError(f"{source}: {HF_CONFIG_KEYS.get(key, key)} {e.problem}") from None
    except KeyError as e:
        raise ConfigError(f"{source} lacks the key {e.args[0]!r}") from None
    except ConfigError as e:  # a relation between keys (heads and KV heads ...)
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{source} holds a value no model can have ({e})") from None


def _args_from_hf_config(cfg: dict, source: str) -> ModelArgs:
    arch = (cfg.get("architectures") or [None])[0]
    family = HF_ARCHITECTURES.get(arch)
    if family is None:
        raise ConfigError(f"{source}: architecture {arch!r} is not supported "
                          f"(supported: {', '.join(sorted(HF_ARCHITECTURES))})")
    if family == "qwen":
        return _from_qwen1_config(cfg, source)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias") or (family != "qwen2" and cfg.get("attention_bias")):
        raise ConfigError(f"{source}: attention_bias / mlp_bias on LLaMA-style models is not supported")
    rope_params = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
    rope_theta = rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_scaling = cfg.get("rope_scaling") or (rope_params or None)
    sliding = cfg.get("sliding_window") if family in ("mistral", "mixtral") else None
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: Qwen2 use_sliding_window=true is not supported")
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or None,  # None: hidden_size // num_attention_heads, checked there
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        n_experts=cfg.get("num_local_experts", 0) if family == "mixtral" else 0,
        n_experts_per_tok=cfg.get("num_experts_per_tok", 2),
        family=family,
    )


def _from_qwen1_config(cfg: dict, source: str) -> ModelArgs:
    if cfg.get("rotary_pct", 1.0) != 1.0:
        raise ConfigError(f"{source}: Qwen-1 rotary_pct != 1 is not supported")
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // n_heads,
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"] // 2,  # Qwen-1 stores twice the per-branch width
        norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_theta=cfg.get("rotary_emb_base", 10000.0),
        max_seq_len=cfg.get("seq_length", cfg.get("max_position_embeddings", 8192)),
        qkv_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        family="qwen",
    )


def hf_config(self: ModelArgs, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, dtype: str = "float32") -> dict:
    """An HF config.json that `AutoModelForCausalLM.from_pretrained` loads (v4 and v5 key names)."""
    if self.n_experts:
        arch, model_type = "MixtralForCausalLM", "mixtral"
    elif self.qkv_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    elif self.sliding_window is not None:
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": self.dim,
        "intermediate_size": self.hidden_dim,
        "num_hidden_layers": self.n_layers,
        "num_attention_heads": self.n_heads,
        "num_key_value_heads": self.n_kv_heads,
        "head_dim": self.head_dim,
        "vocab_size": self.vocab_size,
        "rms_norm_eps": self.norm_eps,
        "rope_theta": self.rope_theta,
        "max_position_embeddings": self.max_seq_len,
        "tie_word_embeddings": self.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if self.rope_scaling:
        cfg["rope_scaling"] = dict(self.rope_scaling)
    if model_type in ("mistral", "mixtral"):
        cfg["sliding_window"] = self.sliding_window
    if model_type == "mixtral":
        cfg["num_local_experts"] = self.n_experts
        cfg["num_experts_per_tok"] = self.n_experts_per_tok
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def load_model_args(path: str) -> ModelArgs:
    """Read a params.json (native or Meta) or an HF config.json."""
    raw = ModelArgs.read_json(path)
    if "architectures" in raw or "hidden_size" in raw:
        return args_from_hf_config(raw, source=path)
    return ModelArgs.from_dict(raw, source=path)
