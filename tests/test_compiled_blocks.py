"""Regional torch.compile of the training blocks on real data, whose sequence lengths vary from batch
to batch (issue 22, defect 1): every block stays one compiled graph (no graph break), compiled a
bounded number of times (one static shape, then one dynamic graph for every later length, shared by
all layers), with and without activation checkpointing, and trains like the eager blocks.

Inductor on the CPU, a tiny model; compiled code is kept between runs in a cache of these tests
(inductor's caches are keyed by content, so a stale entry is never used)."""
import pytest

LENGTHS = (13, 21, 34)  # more than two lengths: a third one must not compile again


def _loss_and_grads(model, batches):
    for x in batches:
        model.zero_grad(set_to_none=True)
        loss = model.forward_hidden(x).float().pow(2).mean()
        loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.processes  # inductor starts compile workers
@pytest.mark.parametrize("policy", ["none", "full", "selective"])
def test_compiled_blocks_do_not_break_or_recompile_over_lengths(policy, dist1, inductor_cache):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from models.registry import model_args_for
    from models.transformer import Transformer

    args = model_args_for("tiny-llama3")
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (2, n), generator=g) for n in LENGTHS]

    torch._dynamo.reset()
    counters.clear()
    model.configure_layers(policy, 1.0, True)  # (checkpoint policy, fraction of layers, compile)
    compiled = _loss_and_grads(model, batches)
    breaks = dict(counters["graph_break"])
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not breaks, f"graph breaks in the compiled blocks: {list(breaks)}"
    # one frame per compile: the first length static, every later one dynamic, all layers sharing it;
    # each frame a whole graph (a frame without its graph ran eagerly)
    assert 1 <= frames <= 2 and graphs == frames, (frames, graphs)

    model.configure_layers(policy, 1.0, False)
    eager = _loss_and_grads(model, batches)
    assert abs(compiled[0] - eager[0]) <= 1e-5 * abs(eager[0])
    assert len(compiled[1]) == len(eager[1]) > 0
    assert max((a - b).abs().max().item() for a, b in zip(compiled[1], eager[1])) <= 1e-5


def test_compiled_gather_avoids_the_helper_torch_2_11_dynamo_refuses(dist1, monkeypatch):
    """The tensor-parallel gather, compiled (the decode step's logits under TP), gathers along dim 0
    and puts the shards side by side itself: torch 2.11's functional all-gather along another dim
    calls `_maybe_view_chunk_cat`, which its Dynamo refuses to trace, so at TP=2 the compiled decode
    step ran eagerly on that torch (patched here to fail wherever it is called)."""
    import torch
    import torch._dynamo
    import torch.distributed._functional_collectives as funcol

    from models.parallel import _all_gather_last

    def refused(*args, **kwargs):
        raise RuntimeError("_maybe_view_chunk_cat called")

    monkeypatch.setattr(funcol, "_maybe_view_chunk_cat", refused)
    torch._dynamo.reset()
    x = torch.randn(3, 2, 5)
    try:
        out = torch.compile(_all_gather_last, fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, x)  # a world of one: the gather is the shard
