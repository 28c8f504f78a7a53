"""fp16 loss scaling without a host sync per parameter (issue 22, defect 3): the overflow check and
the unscaling are one fused pass per dtype, and the scaler reads the device once per step. Host
reads are counted as torch counts them: every `.item()`, `bool()` or `float()` of a tensor is one
call of aten._local_scalar_dense. The skip / recover behaviour is tests/test_train.py's fp16 test."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import arith_and_model


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (each waits for the device on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fused_calls(monkeypatch):
    """How often the fused check-and-unscale kernel runs, and on how many tensors each time."""
    calls, real = [], torch._amp_foreach_non_finite_check_and_unscale_

    def counted(grads, found, inv_scale):
        calls.append(len(grads))
        return real(grads, found, inv_scale)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", counted)
    return calls


def test_scaler_unscales_in_one_fused_pass_per_dtype_with_one_host_read(dist1, fused_calls):
    from engine.train.gradients import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0 ** 12)
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(7, 5, generator=g) * 300).to(dtype) for dtype in (torch.float16, torch.float32)
             for _ in range(40)]
    expected = [t / scaler.scale for t in grads]  # a division by a power of two: exact either way
    with HostReads() as reads:
        overflow = scaler.unscale_(grads)
    assert not overflow
    assert reads.count == 1, f"{reads.count} host reads for {len(grads)} gradients"
    assert sorted(fused_calls) == [40, 40]  # one pass per dtype
    assert all(t.dtype == e.dtype and torch.equal(t, e) for t, e in zip(grads, expected))

    for where, bad in ((-1, float("inf")), (0, float("nan")), (40, float("-inf"))):
        grads[where][2, 3] = bad
        with HostReads() as reads:
            assert scaler.unscale_(grads), (where, bad)
        assert reads.count == 1
        grads[where][2, 3] = 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    return arith_and_model(tmp_path_factory.mktemp("scaling"), tiny_tokenizer, "tiny-llama3", "model", n_train=8,
                           n_test=2, data_seed=1, model_seed=4)


def _host_reads_of_a_step(root, dtype, dist1):
    from engine.distill.sft import SFTData, SFTTask
    from engine.text.records import read_records
    from engine.text.tokenizer import load_tokenizer
    from engine.train.launch import build_model
    from engine.train.trainer import TrainConfig, Trainer

    model, _ = build_model(str(root / "model"), None, -1, None, 0.0, "wq", dtype, dist1)
    tok = load_tokenizer(str(root / "model"))
    task = SFTTask(SFTData(read_records(str(root / "arith" / "train.json")), tok, 64, "none"), dist1.device)
    cfg = TrainConfig(save_dir=str(root / f"run-{dtype}"), max_batch_size=4, lr=1e-3, max_steps=2,
                      use_float16=dtype == torch.float16, progress=False, plot=False)
    trainer = Trainer(model, task, cfg, dist1)
    trainer._optimizer_step([[0, 1, 2, 3]])  # the optimizer's state is created in the first step
    with HostReads() as reads:
        out = trainer._optimizer_step([[4, 5, 6, 7]])
    return reads.count, out, len(trainer.params)


def test_fp16_step_reads_the_device_once_for_its_loss_scale(tiny, dist1, fused_calls):
    """The same step in fp16 and fp32: one host read more in fp16 (the overflow flag), one fused pass
    over every gradient, and the gradients unscaled once (the clipped norm is the fp32 one)."""
    fp32_reads, fp32, n_params = _host_reads_of_a_step(tiny, torch.float32, dist1)
    assert not fused_calls
    fp16_reads, fp16, _ = _host_reads_of_a_step(tiny, torch.float16, dist1)
    assert not fp16["skipped"]
    assert fused_calls == [n_params, n_params]  # one fused pass over every gradient, in each step
    assert fp16_reads == fp32_reads + 1, (fp16_reads, fp32_reads, n_params)
    assert abs(float(fp16["grad_norm"]) / float(fp32["grad_norm"]) - 1) < 0.05, (fp16["grad_norm"], fp32["grad_norm"])
