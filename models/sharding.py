"""How every weight is split over the tensor-parallel ranks: the one place that knows.

Each weight of a model (and of a LoRA adapter on it) has a WeightSpec: its native key, its full
(unsharded) shape, the dimension split over the ranks (None: every rank holds all of it), and
whether it is a KV projection (whole heads per rank, copied on several ranks when the
tensor-parallel size exceeds n_kv_heads). From the specs follow the box of the full tensor each
rank holds (`shard_box`), how many ranks hold the same copy of a parameter (`tp_copies`, for
gradient norms and sums), the ranks that share a KV head, and which layers LoRA adapts.

The layout is Meta's reference LLaMA's: q/k/v, w1/w3 (gate/up), experts' w1/w3 and the output head
split their output rows (column-parallel); wo and w2 split their input columns (row-parallel); the
token embedding splits the vocabulary; norms and the MoE router are replicated. The layer classes
in models/transformer.py are built to match (loading checks every shape against these boxes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

Box = Tuple[Tuple[int, int], ...]


@dataclass(frozen=True)
class WeightSpec:
    key: str
    shape: Tuple[int, ...]
    shard_dim: Optional[int]  # None: replicated on every rank
    kv: bool = False  # KV projection: whole heads per rank, replicated when tp > n_kv_heads
    rope_heads: int = 0  # q/k projections: number of heads whose rows carry RoPE (for Meta permutation)


def weight_specs(args) -> List[WeightSpec]:
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    q_out, kv_out = args.n_heads * hd, args.n_kv_heads * hd
    specs = [WeightSpec("tok_embeddings.weight", (args.vocab_size, d), 0)]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        specs.append(WeightSpec(p + "attention.wq.weight", (q_out, d), 0, rope_heads=args.n_heads))
        if args.qkv_bias:
            specs.append(WeightSpec(p + "attention.wq.bias", (q_out,), 0, rope_heads=args.n_heads))
        for name in ("wk", "wv"):
            heads = args.n_kv_heads if name == "wk" else 0
            specs.append(WeightSpec(p + f"attention.{name}.weight", (kv_out, d), 0, kv=True, rope_heads=heads))
            if args.qkv_bias:
                specs.append(WeightSpec(p + f"attention.{name}.bias", (kv_out,), 0, kv=True, rope_heads=heads))
        specs.append(WeightSpec(p + "attention.wo.weight", (d, q_out), 1))
        ffns = [f"feed_forward.experts.{e}." for e in range(args.n_experts)] or ["feed_forward."]
        if args.n_experts:
            specs.append(WeightSpec(p + "feed_forward.gate.weight", (args.n_experts, d), None))
        for q in ffns:
            specs += [WeightSpec(p + q + "w1.weight", (f, d), 0), WeightSpec(p + q + "w2.weight", (d, f), 1),
                      WeightSpec(p + q + "w3.weight", (f, d), 0)]
        specs += [WeightSpec(p + "attention_norm.weight", (d,), None), WeightSpec(p + "ffn_norm.weight", (d,), None)]
    specs.append(WeightSpec("norm.weight", (d,), None))
    if not args.tie_embeddings:
        specs.append(WeightSpec("output.weight", (args.vocab_size, d), 0))
    return specs


def shard_box(spec: WeightSpec, rank: int, n: int, args, shard_dim: Optional[int] = -1) -> Box:
    """The part of `spec`'s full tensor that rank `rank` of `n` holds. shard_dim overrides the
    native split dimension (Meta's layout splits the embedding on dim 1)."""
    dim = spec.shard_dim if shard_dim == -1 else shard_dim
    box = [(0, s) for s in spec.shape]
    if dim is None or n == 1:
        return tuple(box)
    size = spec.shape[dim]
    if spec.kv and n > args.n_kv_heads:  # one whole head, shared by n / n_kv_heads ranks
        head = rank * args.n_kv_heads // n
        box[dim] = (head * args.head_dim, (head + 1) * args.head_dim)
    else:
        box[dim] = (rank * size // n, (rank + 1) * size // n)
    return tuple(box)


def box_shape(box: Box) -> Tuple[int, ...]:
    return tuple(e - s for s, e in box)


def full_box(spec: WeightSpec) -> Box:
    return tuple((0, s) for s in spec.shape)


def copies(spec: WeightSpec, tp: int, args) -> int:
    """How many tensor-parallel ranks hold an identical copy of this weight (1: it is split)."""
    if spec.shard_dim is None:
        return tp
    if spec.kv and tp > args.n_kv_heads:
        return tp // args.n_kv_heads
    return 1


def kv_replica_groups(args, tp: int) -> List[List[int]]:
    """Tensor-parallel ranks holding the same KV head, e.g. tp=4, n_kv=2 -> [[0, 1], [2, 3]];
    empty when every rank has heads of its own."""
    if tp <= args.n_kv_heads:
        return []
    per_head = tp // args.n_kv_heads
    return [list(range(s, s + per_head)) for s in range(0, tp, per_head)]


# ----------------------------------------------------------------------------------------------
# LoRA: which layers an adapter may sit on, and its tensors' specs
# ----------------------------------------------------------------------------------------------
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the default: every projection of every layer
KNOWN_TARGETS = ALL_TARGETS + ("output",)  # the output head too, as the MCC-KD authors' LoRA does


def lora_layers(args, targets: Sequence[str]) -> Dict[str, Tuple[bool, int, int]]:
    """Module name -> (column-parallel?, in_features, out_features) of every layer LoRA adapts.
    MoE experts stay frozen (their w1/w2/w3 are skipped); a tied head cannot carry an adapter."""
    hd = args.head_dim
    shapes = {"wq": (True, args.dim, args.n_heads * hd), "wk": (True, args.dim, args.n_kv_heads * hd),
              "wv": (True, args.dim, args.n_kv_heads * hd), "wo": (False, args.n_heads * hd, args.dim),
              "w1": (True, args.dim, args.hidden_dim), "w3": (True, args.dim, args.hidden_dim),
              "w2": (False, args.hidden_dim, args.dim)}
    out = {}
    for i in range(args.n_layers):
        for t in targets:
            if t == "output" or (args.n_experts and t in ("w1", "w2", "w3")):
                continue
            out[f"layers.{i}.{'attention' if t in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{t}"] = shapes[t]
    if "output" in targets and not args.tie_embeddings:
        out["output"] = (True, args.dim, args.vocab_size)
    return out


def lora_specs(args, rank: int, targets: Sequence[str]) -> List[WeightSpec]:
    """Specs of every LoRA tensor in full coordinates. Column layer: A [r, in] replicated, B [out, r]
    split on its rows like the base (KV heads: as the base). Row layer: A [r, in] split on its
    columns like the base input, B [out, r] replicated."""
    specs = []
    for name, (column, n_in, n_out) in lora_layers(args, targets).items():
        kv = name.endswith((".wk", ".wv"))
        specs += [WeightSpec(name + ".lora_A", (rank, n_in), None if column else 1),
                  WeightSpec(name + ".lora_B", (n_out, rank), 0 if column else None, kv=kv)]
    return specs


def tp_copies(named_params: Iterable, args, tp: int, specs: Sequence[WeightSpec]) -> Dict[str, int]:
    """Parameter name -> how many ranks hold the same copy, from the specs (names without a spec,
    e.g. a small head an objective adds, are replicated)."""
    by_key = {sp.key: sp for sp in specs}
    return {name: copies(by_key[name], tp, args) if name in by_key else tp for name, _ in named_params}
