"""CUDA paths, run where a GPU is present (skipped elsewhere): HF logits parity in bf16 and fp32 on the
GPU, greedy generation through infer.py (CUDA graphs of the compiled decode step) equal to HF
generate() in fp32, training steps with bf16 autocast and fp16 loss scaling, resume on the GPU, and
TP=2 over NCCL equal to TP=1 when two GPUs exist. Launchers run as users run them, with --device cuda."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, child_env, run_cli, save_hf, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

# bf16 keeps 8 bits of mantissa: logits of the two implementations differ by rounding, not by design
BF16_MEAN_REL_TOL = 2e-2
FP32_MAX_ABS_TOL = 1e-4


@pytest.fixture(scope="module")
def gpu_env(tmp_path_factory, tiny_tokenizer):
    from data.arithmetic import main as make_arith

    root = tmp_path_factory.mktemp("cuda")
    hf_dir = root / "llama3"
    save_hf("llama3", str(hf_dir), seed=3, vocab_size=320)
    shutil.copy(tiny_tokenizer, hf_dir / "tokenizer.model")
    make_arith(str(root / "arith"), n_train=16, n_test=8, min_value=10, style="fixed", seed=1)
    return root, hf_dir


def test_logits_match_hf_on_gpu_bf16_and_fp32(gpu_env, dist1):
    from transformers import AutoModelForCausalLM

    from engine.checkpoint import load_model

    root, hf_dir = gpu_env
    tokens = torch.randint(3, 320, (3, 24), generator=torch.Generator().manual_seed(0)).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).cuda().eval()
        ours = load_model(str(hf_dir), dtype=dtype, device="cuda").eval()
        with torch.no_grad():
            ref, got = hf(tokens).logits.float(), ours(tokens).float()
        if dtype == torch.float32:
            assert (got - ref).abs().max() <= FP32_MAX_ABS_TOL
        else:
            assert ((got - ref).abs().mean() / ref.abs().mean()) <= BF16_MEAN_REL_TOL


@pytest.mark.processes
def test_infer_greedy_matches_hf_generate_on_gpu(gpu_env, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.text.tokenizer import load_tokenizer

    root, hf_dir = gpu_env
    questions = ["What is 1 + 2 ?", "Tom has 3 apples.", "A", "What is 999 * 12 ?"] * 3
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"instruction": q} for q in questions]))
    out = tmp_path / "out.jsonl"
    proc = run_cli("infer.py", "--ckpt_dir", str(hf_dir), "--data_file", str(data), "--output_file", str(out),
                   "--template", "none", "--max_new_tokens", "12", "--batch_size", "5", "--output_tokens", "True",
                   "--progress", "False", "--device", "cuda", gpu=True)
    assert proc.returncode == 0, proc.stderr
    assert "decode: CUDA graphs" in proc.stderr
    tok = load_tokenizer(str(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).cuda().eval()
    for line, q in zip(open(out), questions):
        ids = torch.tensor([tok.encode(q)]).cuda()
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=3)[0, ids.shape[1]:].tolist()
        assert json.loads(line)["tokens"] == gen, q


def _train(root, hf_dir, save, *extra, launcher=run_cli):
    args = ["train.py", "--task", "ARITH", "--ckpt_dir", str(hf_dir), "--save_dir", str(save), "--train_file",
            str(root / "arith" / "train.json"), "--template", "none", "--max_seq_len", "64", "--lr", "1e-3",
            "--max_batch_size", "4", "--max_steps", "4", "--save_every", "2", "--device", "cuda", *extra]
    proc = launcher(*args, gpu=True) if launcher is run_cli else launcher(*args, nproc=2, gpu=True)
    if launcher is run_cli:
        assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["loss"] for line in open(save / "metrics.jsonl") if '"eval"' not in line]


@pytest.mark.processes
def test_training_steps_bf16_fp16_and_resume_on_gpu(gpu_env, tmp_path):
    root, hf_dir = gpu_env
    fp32 = _train(root, hf_dir, tmp_path / "fp32")
    bf16 = _train(root, hf_dir, tmp_path / "bf16", "--use_bfloat16", "True")
    fp16 = _train(root, hf_dir, tmp_path / "fp16", "--use_float16", "True")
    for run in (bf16, fp16):
        assert len(run) == 4 and all(x == x for x in run)
        assert abs(run[0] - fp32[0]) / fp32[0] < 2e-2
    _train(root, hf_dir, tmp_path / "stopped", "--exit_after_steps", "2")
    resumed = _train(root, hf_dir, tmp_path / "stopped", "--resume", "True")
    assert len(resumed) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(resumed, fp32)) < 1e-4


@pytest.mark.processes
@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_tp2_over_nccl_equals_tp1(gpu_env, tmp_path):
    root, hf_dir = gpu_env
    one = _train(root, hf_dir, tmp_path / "tp1")
    two = _train(root, hf_dir, tmp_path / "tp2", launcher=torchrun)
    assert max(abs(a - b) / abs(b) for a, b in zip(one, two)) < 1e-4


@pytest.mark.processes
def test_more_processes_than_gpus_is_one_sentence(gpu_env, tmp_path):
    root, hf_dir = gpu_env
    n = GPUS + 1
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "train.py",
                           "--task", "ARITH", "--ckpt_dir", str(hf_dir), "--save_dir", str(tmp_path / "x"),
                           "--train_file", str(root / "arith" / "train.json")], cwd=ROOT, capture_output=True,
                          text=True, env=child_env(gpu=True), timeout=300)
    assert proc.returncode != 0
    assert f"error: {n} processes on this node but only {GPUS} GPU(s)" in proc.stderr
    assert "--device cpu" in proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_policy_decode_graphs_see_the_weights_after_an_optimizer_step(gpu_env, dist1, dtype):
    """on_policy's Sampler keeps one runner (CUDA graphs of the compiled decode step) across training
    steps: after an in-place AdamW step the replayed graphs sample what freshly captured ones do on the
    new weights, and not what they sampled before; under bf16 autocast too (its weight cache is off, so no
    cast copy of the old weights is captured)."""
    from engine.checkpoint import load_model
    from engine.distill.on_policy.sampling import Sampler
    from engine.infer.generation import SamplingParams
    from engine.text.tokenizer import load_tokenizer

    root, hf_dir = gpu_env
    model = load_model(str(hf_dir), dtype=torch.float32, device="cuda").train()
    tok = load_tokenizer(str(hf_dir))
    prompts = [tok.encode(q) for q in ("What is 12 + 30 ?", "What is 7 + 41 ?", "What is 55 + 5 ?")]
    params, seeds = SamplingParams(max_new_tokens=12, temperature=1.0), [1, 2, 3]
    reused = Sampler(model, params, 4, 48, [tok.eos_id], dtype)
    before = reused.sample(prompts, seeds)
    assert type(reused.runner).__name__ == "CUDAGraphSteps" and reused.runner.graphs
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = model.logits(model.forward_hidden(torch.tensor([prompts[0]], device="cuda"))).float().logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    again = reused.sample(prompts, seeds)
    assert again == Sampler(model, params, 4, 48, [tok.eos_id], dtype).sample(prompts, seeds)
    assert again != before
