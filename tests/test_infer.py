"""infer.py: greedy output token-identical to HF generate() for every family at TP=1 and TP=2,
batch-independence, seeded sampling, resume after a kill, scoring, evaluation, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import infer
from engine.runtime.errors import UserError
from engine.text.tokenizer import load_tokenizer
from tests.conftest import shared_path
from tests.helpers import FAMILIES, ROOT, child_env, run_cli, save_hf, torchrun

QUESTIONS = ["What is 1 + 2 ?", "Tom has 3 apples.", "What is 48 + 17 ? Let's think step by step, first add the ones",
             "A", "Mary buys 12 books and sells 5 . How many books are left ?", "What is 999 * 12 ?",
             "The answer is (A) bank"]
NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """HF random models of every family over the tiny tokenizer's vocabulary, plus HF's greedy
    continuation of each prompt (batched, left-padded, as HF users run it)."""
    root = tmp_path_factory.mktemp("infer")
    data = root / "prompts.json"
    data.write_text(json.dumps([{"instruction": q, "label": "3"} for q in QUESTIONS]))
    tok = load_tokenizer(tiny_tokenizer)
    prompts = [tok.encode(q) for q in QUESTIONS]
    out = {}
    for i, family in enumerate(FAMILIES):
        hf_dir = root / family
        hf = save_hf(family, str(hf_dir), seed=10 + i, vocab_size=320)
        shutil.copy(tiny_tokenizer, hf_dir / "tokenizer.model")
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), 3)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=3)
        ref = []
        for b in range(len(prompts)):
            row = gen[b, width:].tolist()
            ref.append(row[: row.index(tok.eos_id) + 1] if tok.eos_id in row else row)
        out[family] = (str(hf_dir), ref)
    return root, data, out


def _tokens(path):
    return [json.loads(line)["tokens"] for line in open(path)]


def _job(ckpt, data, out, **kw):
    return {"ckpt_dir": ckpt, "data_file": str(data), "output_file": str(out), "template": "none",
            "max_new_tokens": NEW, "batch_size": 3, "output_tokens": True, "progress": False, **kw}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf_generate_tp1(models, family, dist1):
    root, data, refs = models
    hf_dir, ref = refs[family]
    out = root / f"{family}-tp1.jsonl"
    infer.generate(**_job(hf_dir, data, out))
    assert _tokens(out) == ref
    assert sum(len(r) for r in ref) > 3 * len(ref)  # not all stopping at once


@pytest.mark.processes
def test_greedy_matches_hf_generate_tp2(models):
    root, data, refs = models
    jobs = [_job(hf_dir, data, root / f"{family}-tp2.jsonl") for family, (hf_dir, _) in refs.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun("tests/workers/infer_worker.py", str(root / "jobs.json"))
    for family, (_, ref) in refs.items():
        assert _tokens(root / f"{family}-tp2.jsonl") == ref, family


DECODE_FAMILIES = ["llama2", "llama3", "mistral", "mixtral", "qwen2"]


FUSED_AT_TP1 = ("mistral", "qwen2")  # GQA and a window, q/k/v biases; every family at TP=2 (interpreted kernels are slow)


def _check_decode_paths(paths, ref, family, fused=True):
    assert paths["traced_without_fallback"] is True, family
    for name in ("eager_greedy", "static_greedy", "traced_greedy") + (("fused_greedy",) if fused else ()):
        assert paths[name] == ref, (family, name)
    assert paths["static_sample"] == paths["eager_sample"], family
    assert paths["shared_greedy"] == ref * 2 and paths["shared_segment"] is True, family
    assert paths["eager_sample"] != paths["eager_greedy"], family


@pytest.mark.parametrize("family", DECODE_FAMILIES)
def test_static_decode_step_matches_eager_and_hf_tp1(models, family, dist1, tiny_tokenizer):
    """The step a CUDA graph captures (static shapes, KV buckets, dense MoE, tokens read back every
    3 steps) gives HF's greedy tokens and the eager path's sampled tokens; Dynamo traces it whole; so
    does it with --decode_attention fused, its Triton kernels interpreted on the CPU (FUSED_AT_TP1 here,
    every family at TP=2: the layers' residuals after the all-reduce)."""
    from engine.checkpoint import load_for_inference
    from tests.model_checks import decode_paths

    root, data, refs = models
    hf_dir, ref = refs[family]
    tok = load_tokenizer(tiny_tokenizer)
    model = load_for_inference(hf_dir, None, torch.float32, "cpu")[0].eval()  # q/k/v and gate/up fused, as infer.py
    assert model.layers[0].attention.fused is not None
    fused = family in FUSED_AT_TP1 and os.environ.get("TRITON_INTERPRET") == "1"  # not where a GPU is visible
    paths = decode_paths(model, [tok.encode(q) for q in QUESTIONS], [tok.eos_id], NEW, fused=fused)
    _check_decode_paths(paths, ref, family, fused)


@pytest.mark.processes
def test_static_decode_step_matches_eager_and_hf_tp2(models, tiny_tokenizer):
    root, data, refs = models
    tok = load_tokenizer(tiny_tokenizer)
    prompts = [tok.encode(q) for q in QUESTIONS]
    jobs = [{"ckpt": refs[f][0], "prompts": prompts, "stop_ids": [tok.eos_id], "new_tokens": NEW,
             "out": str(root / f"{f}-paths-tp2.json")} for f in DECODE_FAMILIES]
    (root / "decode_jobs.json").write_text(json.dumps(jobs))
    torchrun("tests/workers/decode_worker.py", str(root / "decode_jobs.json"))
    for f, job in zip(DECODE_FAMILIES, jobs):
        _check_decode_paths(json.load(open(job["out"])), refs[f][1], f)


def test_static_shapes_and_stop_strings_across_sync_windows(models, dist1, tiny_tokenizer):
    """Row counts and KV lengths come from a few levels; a stop string met in the middle of a window
    of 4 unread steps finishes its row exactly where the step-by-step path does."""
    from engine.checkpoint import load_model
    from engine.infer.generation import EagerSteps, Request, SamplingParams, StaticSteps, StopStrings, generate_stream

    root, data, refs = models
    hf_dir, ref = refs["llama2"]
    model = load_model(hf_dir).eval()
    static = StaticSteps(model, sync_every=4, first_bucket=4)
    assert [static.rows_for(c, 384) for c in (384, 200, 192, 100, 3, 1)] == [384, 384, 192, 192, 3, 1]
    assert [static.kv_len(n, 5000) for n in (1, 64, 65, 1000, 1025, 4097, 4999)] == [4, 64, 128, 1024, 2048, 5000, 5000]
    tok = load_tokenizer(hf_dir)
    row = max(range(len(ref)), key=lambda i: len(ref[i]))
    text = tok.decode(ref[row][:NEW // 2])
    stop = text[-3:]  # met after about half of the row's tokens
    reqs = [Request(i, tok.encode(q), 0) for i, q in enumerate(QUESTIONS)]
    runs = []
    for runner in (EagerSteps(model), static):
        done = generate_stream(model, reqs, SamplingParams(max_new_tokens=NEW), 3, [tok.eos_id],
                               StopStrings(tok, [stop]), runner=runner)
        runs.append(sorted((c.key, c.tokens, c.finish) for c in done))
    assert runs[0] == runs[1]
    key, tokens, finish = runs[0][row]
    assert finish == "stop" and len(tokens) < len(ref[row]) and stop in tok.decode(tokens)


def test_cuda_graph_runner_says_what_it_is_without_a_gpu(capsys):
    """The line make_runner prints for a model on a GPU names CUDA graphs of the compiled step (the
    runner's description was only set once its buffers were rebuilt, from the builtin `compile`);
    built here on the CPU, nothing captured."""
    from types import SimpleNamespace

    from engine.infer import generation as g

    on_gpu = SimpleNamespace(head_weight=SimpleNamespace(device=torch.device("cuda")))
    runner = g.make_runner(on_gpu)
    assert isinstance(runner, g.CUDAGraphSteps) and runner.graphs == {} and runner.pool is None
    assert runner.description == "CUDA graphs of a torch.compile'd static-shape decode step"
    assert "decode: CUDA graphs of a torch.compile'd static-shape decode step" in capsys.readouterr().err
    runner.forget()
    assert runner.description == "CUDA graphs of a torch.compile'd static-shape decode step"
    assert g.CUDAGraphSteps(on_gpu, compiled=False).description == "CUDA graphs of a static-shape decode step"


@pytest.mark.processes
@pytest.mark.parametrize("family", ["llama3"])
def test_inductor_compiled_decode_step_matches_hf(models, family, dist1):
    """The step and the prefill torch.compile builds for the GPU path, compiled here by inductor for the CPU."""
    import torch._dynamo

    from engine.checkpoint import load_model
    from engine.infer import generation as g

    root, data, refs = models
    hf_dir, ref = refs[family]
    tok = load_tokenizer(hf_dir)
    model = load_model(hf_dir).eval()
    torch._dynamo.reset()
    runner = g.StaticSteps(model, sync_every=3, first_bucket=8, compiled=True)
    out = g.complete_prompts(model, [tok.encode(q) for q in QUESTIONS], g.SamplingParams(max_new_tokens=NEW), [tok.eos_id], 3,
                     runner=runner)
    assert runner.step_call.active and runner.prefill_call.active and out == ref


def test_batching_and_sampling(models, dist1, tmp_path, monkeypatch):
    """Same outputs in a batch as alone (greedy and seeded sampling); seeds reproduce; K samples, the
    same with their prompt's keys in a shared segment of the cache (the default) and copied per row
    (--share_prompts False)."""
    from engine.infer import generation

    root, data, refs = models
    hf_dir = refs["llama3"][0]
    runs, segments = {}, {}
    real = generation.Batcher.run

    def watched(batcher, requests):  # which layout each run's cache had
        yield from real(batcher, requests)
        segments[name] = batcher.cache.prompts is not None

    monkeypatch.setattr(generation.Batcher, "run", watched)
    for name, kw in {"greedy-b7": dict(batch_size=7), "greedy-b1": dict(batch_size=1),
                     "sample-b7": dict(batch_size=7, temperature=0.9, top_p=0.9, seed=1),
                     "sample-b2": dict(batch_size=2, temperature=0.9, top_p=0.9, seed=1),
                     "sample-seed2": dict(batch_size=7, temperature=0.9, top_p=0.9, seed=2),
                     "k4": dict(batch_size=5, temperature=1.0, top_k=50, num_samples=4, seed=3),
                     "k4-copies": dict(batch_size=5, temperature=1.0, top_k=50, num_samples=4, seed=3,
                                       share_prompts=False)}.items():
        infer.generate(**_job(hf_dir, data, tmp_path / f"{name}.jsonl", **kw))
        runs[name] = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
    assert segments == {name: name == "k4" for name in runs}
    assert runs["k4"] == runs["k4-copies"]
    tokens = {k: [r["tokens"] for r in v] for k, v in runs.items()}
    assert tokens["greedy-b7"] == tokens["greedy-b1"]
    assert tokens["sample-b7"] == tokens["sample-b2"]
    assert tokens["sample-b7"] != tokens["sample-seed2"]
    assert tokens["sample-b7"] != tokens["greedy-b7"]
    assert all(len(r["output"]) == 4 and len(r["tokens"]) == 4 for r in runs["k4"])
    assert any(len({tuple(t) for t in r["tokens"]}) > 1 for r in runs["k4"])  # samples are independent
    assert [r["index"] for r in runs["k4"]] == list(range(len(QUESTIONS)))


@pytest.mark.processes
def test_killed_run_resumes_with_every_record_once(tmp_path, tiny_tokenizer):
    from checkpoint_split import init

    init("tiny-llama", str(tmp_path / "m"), tokenizer=tiny_tokenizer, seed=9)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"What is {i} + {i * 7 % 13} ?"}) + "\n"
                            for i in range(300)))
    args = ["infer.py", "--ckpt_dir", str(tmp_path / "m"), "--data_file", str(data), "--template", "none",
            "--max_new_tokens", "48", "--batch_size", "4"]
    straight = run_cli(*args, "--output_file", str(tmp_path / "straight.jsonl"))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, *args, "--output_file", str(out)], cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or sum(1 for _ in open(out)) < 40):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = sum(1 for _ in open(out))
    assert 40 <= partial < 300
    resumed = run_cli(*args, "--output_file", str(out))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["records"] == 300 and summary["generated_this_run"] <= 300 - partial + 1
    lines = [json.loads(line) for line in open(out)]
    assert [r["index"] for r in lines] == list(range(300))
    assert [r["id"] for r in lines] == [f"q{i}" for i in range(300)]
    assert lines == [json.loads(line) for line in open(tmp_path / "straight.jsonl")]


def _torchrun_cmd(*args: str) -> list:
    from tests.helpers import _free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            *args]


def _output_lines(path) -> list:
    return [json.loads(line) for line in open(path)]


@pytest.mark.processes
def test_data_parallel_replicas_write_one_file_and_resume(tmp_path, tiny_tokenizer):
    """world 2: --tp_size 1 (two replicas, each taking every other record still to do) and --tp_size 2 write
    the file one process writes, sampled (--top_p_bound: the draws it cut counted over the replicas), two
    samples a record; a killed two-replica run (lines in the
    output and in replica 1's part file) resumes to that same file, the parts merged and removed."""
    from checkpoint_split import init

    for n in (1, 2):  # the same weights in 1 and in 2 shards (a native checkpoint holds one per tensor-parallel rank)
        init("tiny-llama", str(tmp_path / f"m{n}"), n=n, tokenizer=tiny_tokenizer, seed=4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"What is {i} + {i * 5 % 11} ?"}) + "\n"
                            for i in range(150)))
    args = ["infer.py", "--ckpt_dir", str(tmp_path / "m1"), "--data_file", str(data), "--template", "none",
            "--max_new_tokens", "24", "--batch_size", "4", "--temperature", "0.9", "--num_samples", "2",
            "--top_p", "0.9", "--top_p_bound", "64", "--seed", "7", "--output_tokens", "True", "--progress", "False"]
    one = run_cli(*args, "--output_file", str(tmp_path / "one.jsonl"))
    cut = json.loads(one.stdout.strip().splitlines()[-1])["top_p_cut_draws"]
    assert one.returncode == 0, one.stderr
    reference = _output_lines(tmp_path / "one.jsonl")
    assert len({json.dumps(r["tokens"]) for r in reference}) > 100  # samples that differ record to record
    for name, tp in (("dp", "1"), ("tp", "2")):
        flags = args if tp == "1" else [a.replace(str(tmp_path / "m1"), str(tmp_path / "m2")) for a in args]
        torchrun(*flags, "--output_file", str(tmp_path / f"{name}.jsonl"), "--tp_size", tp)
        assert _output_lines(tmp_path / f"{name}.jsonl") == reference, name
        summary = json.load(open(tmp_path / f"{name}.jsonl.meta.json"))["summary"]
        assert summary["records"] == 150 and summary["generated_this_run"] == 150, name
        assert summary["new_tokens"] == json.loads(one.stdout.strip().splitlines()[-1])["new_tokens"], name
        assert summary["top_p_cut_draws"] == cut > 0, name  # summed over the replicas
    assert not list(tmp_path.glob("*.part*"))

    out = tmp_path / "killed.jsonl"
    part = tmp_path / "killed.jsonl.part1"
    cmd = _torchrun_cmd(*args, "--output_file", str(out), "--tp_size", "1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def count(path):
        return sum(1 for _ in open(path)) if path.exists() else 0

    deadline = time.time() + 240
    while time.time() < deadline and (count(out) < 10 or count(part) < 10):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    partial = count(out) + count(part)
    assert 20 <= partial < 150 and count(part) >= 10
    resumed = subprocess.run(_torchrun_cmd(*args, "--output_file", str(out), "--tp_size", "1"), cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["records"] == 150 and summary["generated_this_run"] <= 150 - partial + 2
    assert _output_lines(out) == reference
    assert not part.exists()


def test_replica_shares_and_part_files_make_one_output(tmp_path):
    """The records still to do are dealt round-robin to the replicas (every one once, shares within one
    of each other); the finished lines are the union of the output and every part file, a torn last line
    cut; finish writes them in input order into the one file and removes the parts."""
    from engine.infer.jobs import OutputFile, replica_share

    done = {0, 1, 2, 7}
    shares = [replica_share(20, done, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == [i for i in range(20) if i not in done]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares[1] == [4, 8, 11, 14, 17]
    out = OutputFile(str(tmp_path / "o.jsonl"), {"m": 1})
    out.open()
    out.append({"index": 3, "x": "a"})
    out.close()
    for r, idx in ((1, [0, 2]), (2, [1])):
        part = OutputFile(out.path, {"m": 1})
        part.open_part(r)
        for i in idx:
            part.append({"index": i, "x": str(i)})
        part.close()
    with open(out.path + ".part2", "a") as f:
        f.write('{"index": 9, "x"')  # a replica killed mid-line
    again = OutputFile(out.path, {"m": 1})
    assert sorted(again.read_done()) == [0, 1, 2, 3]
    again.open()
    summary = again.finish(lambda lines: {"records": len(lines)}, 4)
    assert summary == {"records": 4} and json.load(open(out.path + ".meta.json"))["complete"]
    assert [r["index"] for r in _output_lines(out.path)] == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["o.jsonl", "o.jsonl.meta.json"]


@pytest.mark.processes
def test_data_parallel_scoring_matches_one_process(tmp_path, tiny_tokenizer):
    """score at world 2: --tp_size 1 (two replicas, each scoring every other sequence) and --tp_size 2
    write what one process writes (log-likelihoods within 1e-5, the same top-k ids), in input order."""
    from checkpoint_split import init

    for n in (1, 2):
        init("tiny-llama", str(tmp_path / f"m{n}"), n=n, tokenizer=tiny_tokenizer, seed=4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} + {i % 7} ?",
                                        "output": [f"It is {2 * i}", "no idea" * (i % 3 + 1)]}) + "\n"
                            for i in range(23)))
    args = ["infer.py", "score", "--data_file", str(data), "--template", "none", "--batch_size", "4", "--top_k", "3"]
    one = run_cli(*args, "--ckpt_dir", str(tmp_path / "m1"), "--output_file", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    reference = _output_lines(tmp_path / "one.jsonl")
    for name, tp in (("dp", "1"), ("tp", "2")):
        torchrun(*args, "--ckpt_dir", str(tmp_path / f"m{tp if tp == '2' else 1}"), "--tp_size", tp,
                 "--output_file", str(tmp_path / f"{name}.jsonl"))
        got = _output_lines(tmp_path / f"{name}.jsonl")
        assert [r["index"] for r in got] == list(range(23)), name
        for g, r in zip(got, reference):
            assert g["n_tokens"] == r["n_tokens"] and g["topk_ids"] == r["topk_ids"], name
            assert max(abs(a - b) for a, b in zip(g["sum_logprob"], r["sum_logprob"])) < 1e-5, name


def test_score_matches_hf_log_likelihood(models, dist1, tmp_path):
    root, _, refs = models
    hf_dir = refs["qwen2"][0]
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(hf_dir)
    recs = [{"instruction": "What is 2 + 2 ?", "output": ["4 .", "It is 5"]}, {"instruction": "Hi", "output": "there"}]
    data = tmp_path / "s.json"
    data.write_text(json.dumps(recs))
    infer.score(ckpt_dir=hf_dir, data_file=str(data), output_file=str(tmp_path / "s.jsonl"), template="none")
    got = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def ref(prompt, text):
        p, r = tok.encode(prompt), tok.encode(text, bos=False, eos=True)
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
        return float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(r))), len(r)

    s0, n0 = ref("What is 2 + 2 ?", "4 .")
    s1, _ = ref("What is 2 + 2 ?", "It is 5")
    s2, n2 = ref("Hi", "there")
    assert got[0]["n_tokens"][0] == n0 and abs(got[0]["sum_logprob"][0] - s0) < 1e-3
    assert abs(got[0]["sum_logprob"][1] - s1) < 1e-3
    assert abs(got[1]["sum_logprob"] - s2) < 1e-3 and abs(got[1]["mean_logprob"] - s2 / n2) < 1e-4


@pytest.mark.processes
def test_evaluate_gold_and_empty(tmp_path):
    gold = shared_path("data", "mcc", "GSM8K", "test.json")
    proc = run_cli("infer.py", "evaluate", "--task", "GSM8K", "--predictions_file", gold)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"accuracy": 1.0, "correct": 659, "total": 659, "unparsable": 0}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"output": ""}) + "\n" for _ in range(659)))
    proc = run_cli("infer.py", "evaluate", "--task", "GSM8K", "--predictions_file", str(empty), "--label_file", gold)
    assert json.loads(proc.stdout) == {"accuracy": 0.0, "correct": 0, "total": 659, "unparsable": 659}
    proc = run_cli(
        "infer.py",
        "evaluate",
        "--task",
        "GSM8K",
        "--predictions_file",
        gold,
        "--scoring",
        "exact",
        "--report",
        "authors",
    )  # a whole rationale never equals its label string
    assert json.loads(proc.stdout) == {
        "accuracy": 0.0,
        "correct": 0,
        "total": 659,
        "unparsable": 0,
        "accuracy_answered": 0.0,
        "answered": 659,
    }


def test_long_prompts_skip_or_truncate(models, dist1, tmp_path):
    root, _, refs = models
    hf_dir = refs["llama2"][0]  # max_position_embeddings 256
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "What is 1 + 1 ?", "label": "2"},
                                {"instruction": "1 2 3 4 5 6 7 8 9 " * 40, "label": "2"}]))
    infer.generate(**_job(hf_dir, data, tmp_path / "skip.jsonl", task="ARITH"))
    lines = [json.loads(line) for line in open(tmp_path / "skip.jsonl")]
    assert "error" in lines[1] and lines[1]["correct"] is False and "error" not in lines[0]
    meta = json.load(open(str(tmp_path / "skip.jsonl") + ".meta.json"))
    assert meta["summary"]["skipped_long_prompts"] == 1 and meta["summary"]["total"] == 2
    infer.generate(**_job(hf_dir, data, tmp_path / "trunc.jsonl", long_prompts="truncate"))
    lines = [json.loads(line) for line in open(tmp_path / "trunc.jsonl")]
    assert "error" not in lines[1] and len(lines[1]["tokens"]) > 0


def test_bad_input(models, dist1, tmp_path):
    root, data, refs = models
    hf_dir = refs["llama2"][0]

    def err(**kw):
        with pytest.raises(UserError) as e:
            infer.generate(**{**_job(hf_dir, data, tmp_path / "o.jsonl"), **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    bad = tmp_path / "bad.txt"
    bad.write_text("this is not json\n")
    assert err(data_file=str(bad)).startswith(f"{bad} line 1 is not valid JSON")
    bad.write_text(json.dumps([{"question": "x"}]))
    assert err(data_file=str(bad)) == f"{bad} record 0 lacks the key 'instruction'"
    assert "--temperature" in err(temperature=-1)
    assert "--top_p" in err(top_p=0)
    assert "--top_p" in err(top_p=1.5)
    assert "--task 'MATHS' is unknown" in err(task="MATHS")
    infer.generate(**_job(hf_dir, data, tmp_path / "o.jsonl"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": "different"}]))
    assert "different data file" in err(data_file=str(other))
    assert "--max_new_tokens" in err(max_new_tokens=5)


def test_infer_uses_the_template_the_model_was_trained_with(tmp_path, tiny_tokenizer, dist1, capsys):
    import checkpoint_split as cks
    import train
    from data.arithmetic import main as make_arith

    make_arith(str(tmp_path / "data"), n_train=8, n_test=3, min_value=10, style="fixed")
    cks.init("tiny-llama", str(tmp_path / "base"), tokenizer=tiny_tokenizer, seed=1)
    common = dict(task="ARITH", train_file=str(tmp_path / "data" / "train.json"), template="none", max_steps=1,
                  max_batch_size=4, max_seq_len=64)
    train.main(ckpt_dir=str(tmp_path / "base"), save_dir=str(tmp_path / "full"), **common)
    train.main(ckpt_dir=str(tmp_path / "base"), save_dir=str(tmp_path / "lora"), model_type="lora-tiny-llama",
               lora_rank=2, **common)
    cks.reshard(str(tmp_path / "full" / "checkpoint-1"), str(tmp_path / "resharded"), n=1)
    cks.merge_lora(str(tmp_path / "lora" / "checkpoint-1"), str(tmp_path / "merged"))
    data = str(tmp_path / "data" / "test.json")
    instructions = [r["instruction"] for r in json.load(open(data))]
    for name, ckpt in [("full", tmp_path / "full" / "checkpoint-1"), ("adapter", tmp_path / "lora" / "checkpoint-1"),
                       ("resharded", tmp_path / "resharded"), ("merged", tmp_path / "merged")]:
        out = tmp_path / f"{name}.jsonl"
        infer.generate(ckpt_dir=str(ckpt), data_file=data, output_file=str(out), max_new_tokens=2, progress=False)
        assert [json.loads(line)["prompt"] for line in open(out)] == instructions, name
        assert "using the prompt template 'none' recorded with" in capsys.readouterr().out
    infer.generate(ckpt_dir=str(tmp_path / "merged"), data_file=data, output_file=str(tmp_path / "d.jsonl"),
                   max_new_tokens=2, progress=False, template="default")  # asked for: used, with a warning
    assert "differs from the template 'none'" in capsys.readouterr().out
    assert json.loads(open(tmp_path / "d.jsonl").readline())["prompt"].startswith("### Instruction:")
