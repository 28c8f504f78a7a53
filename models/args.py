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
import math
from dataclasses import dataclass
from typing import Optional

from models.errors import UserError

DECODE_ATTENTION = ("auto", "dense", "ragged", "fused")  # how a decode step attends (Transformer.decode_attention)


class ConfigError(UserError):
    """A user-facing configuration problem; the message is one sentence naming the file or flag."""


class FieldError(ConfigError):
    """A ModelArgs field whose value cannot describe a model; readers of files name the file (and their
    own spelling of the key) around it."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key} {problem}")


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# the smallest value of each whole-number field (Optional ones may also be null)
_INT_FIELDS = {"dim": 1, "n_layers": 1, "n_heads": 1, "multiple_of": 1, "max_seq_len": 2, "n_experts": 0}
_OPTIONAL_INT_FIELDS = {"n_kv_heads": 1, "head_dim": 1, "hidden_dim": 1, "sliding_window": 1}
_POSITIVE_FLOAT_FIELDS = ("norm_eps", "rope_theta")
_ROPE_NUMBERS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _whole(key: str, value, low: int) -> int:
    """`value` as a whole number >= low (an integral float such as 64.0 is taken), else FieldError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(key, f"is {value!r} ({type(value).__name__}); it must be a whole number >= {low}")
    if value < low:
        raise FieldError(key, f"is {value}; it must be a whole number >= {low}")
    return value


def _positive(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FieldError(key, f"is {value!r}; it must be a finite number > 0")
    return float(value)


def _rope_scaling(value) -> Optional[dict]:
    """rope_scaling checked: None or an object naming a supported rope_type with its numbers."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError(
            "rope_scaling",
            f'is {value!r}; it must be null or an object such as {{"rope_type": "llama3", "factor": 8.0}}',
        )
    kind = value.get("rope_type", value.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise FieldError(
            "rope_scaling", f"type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    for name in _ROPE_NUMBERS.get(kind, ()):
        if name not in value:
            raise FieldError("rope_scaling", f"of type {kind} lacks {name!r}")
        _positive(f"rope_scaling.{name}", value[name])
    return value


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
        self._check_fields()
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
            self.rope_scaling = {**self.rope_scaling, "rope_type": kind}
            self.rope_scaling.pop("type", None)
            if kind == "default":
                self.rope_scaling = None

    def _check_fields(self) -> None:
        """Every field's type and range (the model is built from these; a file may hold anything)."""
        for key, low in _INT_FIELDS.items():
            setattr(self, key, _whole(key, getattr(self, key), low))
        for key, low in _OPTIONAL_INT_FIELDS.items():
            if getattr(self, key) is not None:
                setattr(self, key, _whole(key, getattr(self, key), low))
        if self.vocab_size != -1:  # -1: Meta's params.json, the weights tell
            self.vocab_size = _whole("vocab_size", self.vocab_size, 1)
        for key in _POSITIVE_FLOAT_FIELDS:
            setattr(self, key, _positive(key, getattr(self, key)))
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = _positive("ffn_dim_multiplier", self.ffn_dim_multiplier)
        for key in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise FieldError(key, f"is {getattr(self, key)!r}; it must be true or false")
        if not isinstance(self.family, str):
            raise FieldError("family", f"is {self.family!r}; it must be a name (a string)")
        self.rope_scaling = _rope_scaling(self.rope_scaling)
        if self.n_experts:
            self.n_experts_per_tok = _whole("n_experts_per_tok", self.n_experts_per_tok, 1)
            if self.n_experts_per_tok > self.n_experts:
                raise FieldError(
                    "n_experts_per_tok", f"is {self.n_experts_per_tok}, more than n_experts={self.n_experts}"
                )

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
        vocab = raw.get("vocab_size", 0)
        if isinstance(vocab, (int, float)) and not isinstance(vocab, bool) and vocab <= 0:
            raw["vocab_size"] = -1  # Meta's LLaMA-1/2 params.json: the weights tell
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**raw)
        except FieldError as e:
            raise ConfigError(f"{source}: {e.key} {e.problem}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
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
