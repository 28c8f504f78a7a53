"""Checkpoint conversions: bit-identical round trips, Meta's layout, and one-sentence errors."""
import json
import os

import pytest
import torch

import checkpoint_split as cks
import checkpoint_split as cli
from engine import checkpoint as ck
from engine.runtime.errors import UserError
from tests.helpers import assert_same_tensors, build_hf, hf_to_meta_files, read_shards, run_cli, save_hf


def test_split_merge_bit_identical(tmp_path, tiny_tokenizer):
    cli.init("tiny-llama3", str(tmp_path / "one"), n=1, tokenizer=tiny_tokenizer, seed=3)
    cli.split(str(tmp_path / "one"), str(tmp_path / "two"), n=2)
    cli.merge(str(tmp_path / "two"), str(tmp_path / "back"))
    assert_same_tensors(read_shards(str(tmp_path / "one")), read_shards(str(tmp_path / "back")))
    assert sorted(os.listdir(tmp_path / "two")) == ["consolidated.00.safetensors", "consolidated.01.safetensors",
                                                  "params.json", "tokenizer.model"]


def test_reshard_1_2_4_1_bit_identical_with_kv_replication(tmp_path, tiny_tokenizer):
    # tiny-mistral has 2 KV heads: at 4 shards each head is replicated on two ranks
    cli.init("tiny-mistral", str(tmp_path / "r1"), n=1, tokenizer=tiny_tokenizer)
    cli.reshard(str(tmp_path / "r1"), str(tmp_path / "r2"), n=2)
    cli.reshard(str(tmp_path / "r2"), str(tmp_path / "r4"), n=4)
    cli.reshard(str(tmp_path / "r4"), str(tmp_path / "back"), n=1)
    assert_same_tensors(read_shards(str(tmp_path / "r1")), read_shards(str(tmp_path / "back")))
    four = read_shards(str(tmp_path / "r4"))
    k = "layers.1.attention.wk.weight"
    assert torch.equal(four["consolidated.00.safetensors"][k], four["consolidated.01.safetensors"][k])
    assert not torch.equal(four["consolidated.01.safetensors"][k], four["consolidated.02.safetensors"][k])


def test_init_is_independent_of_shard_count(tmp_path, tiny_tokenizer):
    cli.init("tiny-qwen2", str(tmp_path / "a"), n=1, tokenizer=tiny_tokenizer, seed=7)
    cli.init("tiny-qwen2", str(tmp_path / "b"), n=2, tokenizer=tiny_tokenizer, seed=7)
    cli.merge(str(tmp_path / "b"), str(tmp_path / "c"))
    assert_same_tensors(read_shards(str(tmp_path / "a")), read_shards(str(tmp_path / "c")))
    params = json.load(open(tmp_path / "a" / "params.json"))
    assert params["vocab_size"] == 320 and params["tie_embeddings"] and params["qkv_bias"]


@pytest.mark.parametrize("family", ["llama3", "mixtral", "qwen2"])
def test_from_hf_to_hf_bit_identical_and_loadable(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf = save_hf(family, str(tmp_path / "hf"))
    cli.from_hf(str(tmp_path / "hf"), str(tmp_path / "native"), n=2)
    cli.to_hf(str(tmp_path / "native"), str(tmp_path / "back"))
    a = read_shards(str(tmp_path / "hf"))["model.safetensors"]
    b = read_shards(str(tmp_path / "back"))["model.safetensors"]
    assert_same_tensors({"m": a}, {"m": b})
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, hf(x).logits)


def test_qwen1_to_hf_is_a_qwen2_model(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = save_hf("qwen1", str(tmp_path / "qwen1"))  # a Qwen2 model written with Qwen-1 names
    cli.from_hf(str(tmp_path / "qwen1"), str(tmp_path / "native"))
    cli.to_hf(str(tmp_path / "native"), str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == ["Qwen2ForCausalLM"]
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)


def test_to_hf_shards_large_models_with_an_index(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    cli.init("tiny-llama", str(tmp_path / "n"), tokenizer=tiny_tokenizer)
    src = ck.open_checkpoint(str(tmp_path / "n"))
    ck.write_hf(src, str(tmp_path / "hf"), shard_bytes=100_000, progress=False)
    names = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in names and sum(n.startswith("model-") for n in names) > 2
    cli.from_hf(str(tmp_path / "hf"), str(tmp_path / "n2"))
    assert_same_tensors(read_shards(str(tmp_path / "n")), read_shards(str(tmp_path / "n2")))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # loads
    tok_cfg = json.load(open(tmp_path / "hf" / "tokenizer_config.json"))
    assert tok_cfg["bos_token"] == "<s>" and tok_cfg["eos_token"] == "</s>"


def test_meta_pth_to_native_to_meta(tmp_path, dist1):
    """Meta's layout built independently (tests/helpers.py): loads with HF's logits, and writing it
    back reproduces the original files tensor for tensor."""
    hf = build_hf("llama2", seed=5)
    hf_to_meta_files(hf, str(tmp_path / "meta"), n=2)
    cli.merge(str(tmp_path / "meta"), str(tmp_path / "native"))
    model = ck.load_model(str(tmp_path / "native")).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4
    cli.to_meta(str(tmp_path / "native"), str(tmp_path / "meta2"), n=2)
    original = read_shards(str(tmp_path / "meta"))
    for shard in original.values():
        del shard["rope.freqs"]
    assert_same_tensors(original, read_shards(str(tmp_path / "meta2")))
    params = json.load(open(tmp_path / "meta2" / "params.json"))
    assert params["n_heads"] == 4 and params["vocab_size"] == 256


@pytest.mark.processes
def test_seed_command_line_splits_a_file(tmp_path):
    hf = build_hf("llama2", seed=2)
    hf_to_meta_files(hf, str(tmp_path / "meta"), n=1)
    proc = run_cli("checkpoint_split.py", "--ckpt_file", str(tmp_path / "meta" / "consolidated.00.pth"),
                   "--save_path", str(tmp_path / "split"), "--n", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "split"))[:2] == ["consolidated.00.safetensors", "consolidated.01.safetensors"]


# ----- bad input: one sentence naming the file / flag, exit code != 0, nothing left behind -----
def _error(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_name_the_problem(tmp_path, tiny_tokenizer, dist1):
    good = str(tmp_path / "good")
    cli.init("tiny-llama", good, n=2, tokenizer=tiny_tokenizer)
    out = str(tmp_path / "out")

    assert "/nope" in _error(cli.reshard, str(tmp_path / "nope"), out, n=1)
    assert "--n=3" in _error(cli.split, good, out, n=3)  # 3 does not divide 4 heads
    assert "model_type" in _error(cli.init, "llama-9-1b", out)
    assert not os.path.exists(out)

    bad_arch = tmp_path / "gpt2"
    bad_arch.mkdir()
    (bad_arch / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8}))
    assert "GPT2LMHeadModel" in _error(cli.from_hf, str(bad_arch), out)

    # missing shard
    gap = tmp_path / "gap"
    cli.reshard(good, str(gap), n=2)
    os.remove(gap / "consolidated.00.safetensors")
    assert "shard 00 is missing" in _error(cli.merge, str(gap), out)

    # params.json that disagrees with the weights
    wrong = tmp_path / "wrong"
    cli.reshard(good, str(wrong), n=1)
    params = json.load(open(wrong / "params.json"))
    params["hidden_dim"] = 128
    (wrong / "params.json").write_text(json.dumps(params))
    msg = _error(cli.merge, str(wrong), out)
    assert "consolidated.00.safetensors" in msg and "shape" in msg

    # truncated and corrupted shards
    for name, damage in [("trunc", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00\x01junk" * 50)]:
        d = tmp_path / name
        cli.reshard(good, str(d), n=1)
        f = d / "consolidated.00.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        msg = _error(cli.merge, str(d), out)
        assert "consolidated.00.safetensors" in msg and "corrupted" in msg
    assert not os.path.exists(out)

    # an existing checkpoint is never overwritten silently
    assert "--overwrite" in _error(cli.reshard, good, str(wrong), n=1)
    cli.reshard(good, str(wrong), n=1, overwrite=True)
    assert ck.open_checkpoint(str(wrong)).args.hidden_dim == 160


def test_failed_conversion_leaves_nothing_behind(tmp_path, tiny_tokenizer, monkeypatch):
    cli.init("tiny-llama", str(tmp_path / "src"), tokenizer=tiny_tokenizer)
    src = ck.open_checkpoint(str(tmp_path / "src"))
    real_read, calls = src.read, []

    def failing_read(spec, box):
        calls.append(spec.key)
        if len(calls) > 5:
            raise ck.CheckpointError("disk fell off")
        return real_read(spec, box)

    monkeypatch.setattr(src, "read", failing_read)
    with pytest.raises(ck.CheckpointError):
        ck.write_native(src, str(tmp_path / "out"), 2, progress=False)
    assert os.listdir(tmp_path) == ["src"]


@pytest.mark.processes
def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path):
    proc = run_cli("checkpoint_split.py", "reshard", "--ckpt_dir", str(tmp_path / "missing"),
                   "--save_dir", str(tmp_path / "out"), "--n", "2")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'} does not exist"]
    assert not os.path.exists(tmp_path / "out")


def test_from_hf_reads_pytorch_model_bin(tmp_path, dist1):
    hf = build_hf("mistral", seed=6)
    hf.save_pretrained(str(tmp_path / "hf"))
    os.remove(tmp_path / "hf" / "model.safetensors")  # the older pickle format instead
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    cks.from_hf(str(tmp_path / "hf"), str(tmp_path / "native"), n=2)
    cks.merge(str(tmp_path / "native"), str(tmp_path / "one"))
    model = ck.load_model(str(tmp_path / "one")).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4


def test_device_choice_sentences(monkeypatch):
    """--device: more processes than GPUs, CUDA without a GPU, or an unknown device end in one sentence
    saying what to pass (checked here with the GPU count faked; tests/test_cuda.py runs it for real)."""
    from engine.runtime.distributed import resolve_device

    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="is not cpu or cuda"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="shows no GPU; pass --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError) as e:
        resolve_device("cuda")
    assert str(e.value) == ("2 processes on this node but only 1 GPU(s): start at most 1 per node "
                            "(torchrun --nproc_per_node 1), or pass --device cpu to run all 2 on the CPU")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_device("cuda") == "cuda"


def test_native_shards_load_at_another_tensor_parallel_size(tmp_path, tiny_tokenizer, dist1):
    """A 2- or 4-shard native checkpoint loads at TP=1 (resharded on load) with the weights of the
    1-shard one, exactly."""
    one = str(tmp_path / "one")
    cli.init("tiny-qwen2", one, n=1, tokenizer=tiny_tokenizer, seed=4)
    want = dict(ck.load_model(one).named_parameters())
    for n in (2, 4):
        cli.reshard(one, str(tmp_path / f"n{n}"), n=n)
        got = dict(ck.load_model(str(tmp_path / f"n{n}")).named_parameters())
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), n


@pytest.mark.processes
def test_tp2_loads_1_and_4_shards_as_the_native_2_shard_load(tmp_path, tiny_tokenizer):
    """At TP=2, a 1-shard and a 4-shard native checkpoint give logits equal to the 2-shard one's
    (tiny-qwen2: one KV head, replicated on every shard; tiny-mixtral: experts split like the MLP)."""
    from tests.helpers import torchrun

    jobs = []
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    for model_type in ("tiny-qwen2", "tiny-mixtral"):
        base = str(tmp_path / f"{model_type}-1")
        cli.init(model_type, base, n=1, tokenizer=tiny_tokenizer, seed=5)
        for n in (2, 4):
            cli.reshard(base, str(tmp_path / f"{model_type}-{n}"), n=n)
        for n in (1, 2, 4):
            jobs.append(dict(ckpt=str(tmp_path / f"{model_type}-{n}"), tokens=str(tmp_path / "tokens.pt"),
                             prompt_lens=[5, 8], out=str(tmp_path / f"{model_type}-{n}.pt")))
    with open(tmp_path / "jobs.json", "w") as f:
        json.dump(jobs, f)
    proc = torchrun("tests/workers/parity_worker.py", str(tmp_path / "jobs.json"))
    assert "4 shard(s) resharded on load to tensor-parallel size 2" in proc.stdout
    for model_type in ("tiny-qwen2", "tiny-mixtral"):
        native = torch.load(tmp_path / f"{model_type}-2.pt")
        for n in (1, 4):
            got = torch.load(tmp_path / f"{model_type}-{n}.pt")
            assert torch.equal(got["full"], native["full"]), (model_type, n)
            assert torch.equal(got["cached"], native["cached"]), (model_type, n)
