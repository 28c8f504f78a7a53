"""model_type names -> ModelArgs. A `lora-` prefix selects the LoRA variant of the same model.

When a checkpoint directory carries its own params.json / config.json, that file wins over the
registry (engine/checkpoint/sources.py reads it); the registry then only names the family for the user.
"""
from __future__ import annotations

from typing import Tuple

from models.args import ConfigError, ModelArgs

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA3_ROPE, "factor": 32.0}


def _llama1(dim, n_layers, n_heads):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000, norm_eps=1e-6,
                multiple_of=256, max_seq_len=2048, family="llama")


def _llama2(dim, n_layers, n_heads, n_kv_heads=None, ffn_dim_multiplier=None, multiple_of=256):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=32000,
                norm_eps=1e-5, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
                max_seq_len=4096, family="llama")


def _llama3(dim, n_layers, n_heads, hidden_dim, rope_scaling=None, tie=False, max_seq_len=8192):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
                hidden_dim=hidden_dim, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling,
                tie_embeddings=tie, max_seq_len=max_seq_len, family="llama")


def _qwen1(dim, n_layers, n_heads, hidden_dim):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=151936, hidden_dim=hidden_dim,
                norm_eps=1e-6, qkv_bias=True, max_seq_len=8192, family="qwen")


def _qwen2(dim, n_layers, n_heads, n_kv_heads, hidden_dim, tie=False, theta=1000000.0, max_seq_len=32768,
           vocab_size=152064):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
                vocab_size=vocab_size, norm_eps=1e-6, rope_theta=theta, qkv_bias=True, tie_embeddings=tie,
                max_seq_len=max_seq_len, family="qwen2")


MODEL_TYPES = {
    # LLaMA-1 / LLaMA-2 (Meta reference shapes)
    "llama-1-7b": _llama1(4096, 32, 32),
    "llama-1-13b": _llama1(5120, 40, 40),
    "llama-1-33b": _llama1(6656, 60, 52),
    "llama-1-65b": _llama1(8192, 80, 64),
    "llama-2-7b": _llama2(4096, 32, 32),
    "llama-2-13b": _llama2(5120, 40, 40),
    "llama-2-70b": _llama2(8192, 80, 64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    # LLaMA-3 / 3.1 / 3.2
    "llama-3-8b": _llama3(4096, 32, 32, 14336),
    "llama-3-70b": _llama3(8192, 80, 64, 28672),
    "llama-3.1-8b": _llama3(4096, 32, 32, 14336, rope_scaling=_LLAMA3_ROPE, max_seq_len=131072),
    "llama-3.1-70b": _llama3(8192, 80, 64, 28672, rope_scaling=_LLAMA3_ROPE, max_seq_len=131072),
    "llama-3.2-1b": dict(_llama3(2048, 16, 32, 8192, rope_scaling=_LLAMA32_ROPE, tie=True, max_seq_len=131072)),
    "llama-3.2-3b": dict(_llama3(3072, 28, 24, 8192, rope_scaling=_LLAMA32_ROPE, tie=True, max_seq_len=131072)),
    # Mistral / Mixtral
    "mistral-7b-v0.1": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                            norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_seq_len=32768,
                            family="mistral"),
    "mistral-7b-instruct-v0.2": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                                     vocab_size=32000, norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768,
                                     family="mistral"),
    "mixtral-8x7b-instruct-v0.1": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                                       vocab_size=32000, norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768,
                                       n_experts=8, n_experts_per_tok=2, family="mixtral"),
    # Qwen-1
    "qwen-7b": _qwen1(4096, 32, 32, 11008),
    "qwen-14b": _qwen1(5120, 40, 40, 13696),
    "qwen-72b": _qwen1(8192, 80, 64, 24576),
    # Qwen2 / Qwen2.5
    "qwen2-0.5b": _qwen2(896, 24, 14, 2, 4864, tie=True, vocab_size=151936),
    "qwen2-1.5b": _qwen2(1536, 28, 12, 2, 8960, tie=True, vocab_size=151936),
    "qwen2-7b": _qwen2(3584, 28, 28, 4, 18944),
    "qwen2-72b": _qwen2(8192, 80, 64, 8, 29568),
    "qwen2.5-0.5b": _qwen2(896, 24, 14, 2, 4864, tie=True, vocab_size=151936),
    "qwen2.5-1.5b": _qwen2(1536, 28, 12, 2, 8960, tie=True, vocab_size=151936),
    "qwen2.5-3b": _qwen2(2048, 36, 16, 2, 11008, tie=True, vocab_size=151936),
    "qwen2.5-7b": _qwen2(3584, 28, 28, 4, 18944),
    "qwen2.5-14b": _qwen2(5120, 48, 40, 8, 13824, vocab_size=152064),
    "qwen2.5-32b": _qwen2(5120, 64, 40, 8, 27648, vocab_size=152064),
    "qwen2.5-72b": _qwen2(8192, 80, 64, 8, 29568),
    # tiny presets for tests and the demo (vocab_size is replaced by the tokenizer's at `init`)
    "tiny-llama": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=160, vocab_size=512,
                       norm_eps=1e-5, max_seq_len=512, family="llama"),
    "tiny-llama3": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=512,
                        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=512, family="llama",
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tiny-mistral": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=512,
                         norm_eps=1e-5, sliding_window=8, max_seq_len=512, family="mistral"),
    "tiny-mixtral": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=512,
                         norm_eps=1e-5, n_experts=4, n_experts_per_tok=2, max_seq_len=512, family="mixtral"),
    "tiny-qwen2": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=160, vocab_size=512,
                       norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True,
                       max_seq_len=512, family="qwen2"),
    "tiny-qwen": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=160, vocab_size=512, norm_eps=1e-6,
                      qkv_bias=True, max_seq_len=512, family="qwen"),
    # the demo's student: small enough to train on 2 CPU cores in minutes
    "small-llama": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=512,
                        norm_eps=1e-5, max_seq_len=512, family="llama"),
}


def parse_model_type(model_type: str) -> Tuple[str, bool]:
    """'lora-llama-2-7b' -> ('llama-2-7b', True). Raises ConfigError for unknown names."""
    use_lora = model_type.startswith("lora-")
    base = model_type[len("lora-"):] if use_lora else model_type
    if base not in MODEL_TYPES:
        raise ConfigError(f"--model_type {model_type!r} is unknown; known: "
                          + ", ".join(sorted(MODEL_TYPES)) + " (each also with a 'lora-' prefix)")
    return base, use_lora


def model_args_for(model_type: str, **overrides) -> ModelArgs:
    base, _ = parse_model_type(model_type)
    return ModelArgs(**{**MODEL_TYPES[base], **overrides})
