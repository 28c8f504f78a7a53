"""ModelArgs: every supported family is a set of field values of this one dataclass.

Three on-disk descriptions are understood:
- our native `params.json` (the fields below, written by `ModelArgs.save`),
- Meta's / Mistral's reference `params.json` (a subset of our field names, plus a few aliases),
- an HF `config.json` (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM,
  and Qwen-1's QWenLMHeadModel).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from models.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration problem; the message is one sentence naming the file or flag."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_heads
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # FFN width; None: Meta's formula from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    max_seq_len: int = 2048
    qkv_bias: bool = False  # Qwen: biases on the q/k/v projections
    tie_embeddings: bool = False  # output head shares the token-embedding matrix
    sliding_window: Optional[int] = None  # Mistral: attend to at most this many most recent positions
    n_experts: int = 0  # Mixtral: > 0 makes every FFN a top-k mixture of experts
    n_experts_per_tok: int = 2
    family: str = "llama"  # informational: which key map / HF architecture this model came from

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            self.rope_scaling = {**self.rope_scaling, "rope_type": kind}
            self.rope_scaling.pop("type", None)
            if kind == "default":
                self.rope_scaling = None

    # ----- tensor-parallel layout -------------------------------------------------------------
    def check_tp(self, tp: int, where: str = "--n") -> None:
        """Raise ConfigError unless a tensor-parallel size of `tp` can shard this model."""
        if tp < 1:
            raise ConfigError(f"{where}={tp} must be a shard count >= 1")
        problems = []
        if self.n_heads % tp:
            problems.append(f"n_heads={self.n_heads}")
        if self.n_kv_heads % tp and tp % self.n_kv_heads:
            problems.append(f"n_kv_heads={self.n_kv_heads} (nor is {tp} a multiple of it)")
        if self.vocab_size % tp:
            problems.append(f"vocab_size={self.vocab_size}")
        if self.hidden_dim % tp:
            problems.append(f"hidden_dim={self.hidden_dim}")
        if problems:
            raise ConfigError(f"{where}={tp} does not divide " + ", ".join(problems))

    def local_kv_heads(self, tp: int) -> int:
        """KV heads held per rank: a slice of them, or one replicated head when tp > n_kv_heads."""
        return max(self.n_kv_heads // tp, 1)

    # ----- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """params.json (written by engine/checkpoint/writers.py)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict, source: str = "params.json") -> "ModelArgs":
        """Native or Meta/Mistral reference params.json."""
        raw = dict(raw)
        # Meta / Mistral aliases and runtime-only keys
        if raw.pop("use_scaled_rope", False):  # LLaMA-3.1 Meta params.json
            raw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        moe = raw.pop("moe", None)  # Mistral reference Mixtral params.json
        if moe:
            raw["n_experts"] = moe["num_experts"]
            raw["n_experts_per_tok"] = moe["num_experts_per_tok"]
        for runtime_key in ("max_batch_size", "max_position_embeddings", "rope_scaling_factor", "model_type"):
            raw.pop(runtime_key, None)
        if raw.get("vocab_size", 0) is not None and raw.get("vocab_size", 0) <= 0:
            raw["vocab_size"] = -1  # Meta's LLaMA-1/2 params.json: the weights tell
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @staticmethod
    def read_json(path: str) -> dict:
        """The JSON object of a params.json or config.json; one sentence when it is not one."""
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not readable JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return raw

    @classmethod
    def load(cls, path: str) -> "ModelArgs":
        """Read a params.json (native or Meta); models/hf.py's load_model_args also reads HF config.json."""
        return cls.from_dict(cls.read_json(path), source=path)
