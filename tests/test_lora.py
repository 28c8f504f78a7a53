"""LoRA: merged weights give base + adapter logits; the exported peft adapter on the HF model
gives our logits; adapters trained at TP=2 (with a replicated KV head) load anywhere."""
import json
import os

import pytest
import torch

import checkpoint_split as cks
from engine import checkpoint as ck
from engine.checkpoint import load_lora_into, save_lora
from models.lora import LoRAConfig, apply_lora, merge_lora, unmerge_lora
from tests.helpers import save_hf, torchrun

TOL = 1e-4


def _random_adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _adapted_base(tmp_path, family: str, seed: int, targets=None):
    """(HF model, our model of it with a random LoRA adapter, the adapter's config, a batch of ids): the
    HF checkpoint at tmp_path/hf, ours at tmp_path/base, the adapter saved at tmp_path/adapter."""
    hf = save_hf(family, str(tmp_path / "hf"))
    cks.from_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
    model = ck.load_model(str(tmp_path / "base")).eval()
    cfg = LoRAConfig(rank=4, alpha=8.0, seed=3, **({"targets": targets} if targets else {}))
    apply_lora(model, cfg)
    _random_adapter(model, seed)
    os.makedirs(tmp_path / "adapter")
    save_lora(model, cfg, str(tmp_path / "adapter"), str(tmp_path / "base"))
    return hf, model, cfg, torch.randint(0, 256, (2, 20))


@pytest.mark.parametrize("family,targets", [("llama3", None), ("qwen2", None),
                                            ("llama3", "wq,wv,output")])  # the output head too (the authors')
def test_merge_and_peft_export_match(tmp_path, family, targets, dist1):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf, model, cfg, x = _adapted_base(tmp_path, family, 1, targets)
    with torch.no_grad():
        ours = model(x)
        base = hf(x).logits
        assert (ours - base).abs().max() > 1e-2  # the adapter changes the model
        merge_lora(model)
        assert (model(x) - ours).abs().max() <= TOL
        unmerge_lora(model)
        assert (model(x) - ours).abs().max() <= TOL

    # merged checkpoint (native) and HF export with the adapter merged
    cks.merge_lora(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = ck.load_model(str(tmp_path / "merged")).eval()
    cks.to_hf(str(tmp_path / "adapter"), str(tmp_path / "hf-merged"), merge_lora=True)
    hf_merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-merged"), dtype=torch.float32).eval()
    # peft adapter on the HF base model
    cks.export_peft(str(tmp_path / "adapter"), str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        for name, logits in (("merged", merged(x)), ("hf merged", hf_merged(x).logits), ("peft", peft_model(x).logits)):
            err = (logits - ours).abs().max().item()
            print(f"LORA {family} {name}: {err:.2e}")
            assert err <= TOL, (name, err)
    conf = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and "q_proj" in conf["target_modules"]
    assert ("lm_head" in conf["target_modules"]) == (targets is not None and "output" in targets)
    assert conf["base_model_name_or_path"] is None  # the base is native: nothing transformers loads


def _peft_logits(adapter_dir, x):
    """AutoPeftModelForCausalLM alone (the base found through adapter_config.json), as a user loads it."""
    from peft import AutoPeftModelForCausalLM

    with torch.no_grad():
        return AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32).eval()(x).logits


def test_auto_peft_loads_the_exported_adapter_with_our_logits(tmp_path, dist1, capsys):
    """to_hf's adapter folder names the HF model written beside it, export_peft --hf_base names the
    user's HF base: AutoPeftModelForCausalLM.from_pretrained(adapter) loads either with our logits."""
    _, model, cfg, x = _adapted_base(tmp_path, "llama2", 2)
    with torch.no_grad():
        ours = model(x)
    cks.to_hf(str(tmp_path / "adapter"), str(tmp_path / "out"))  # base + peft adapter in out/adapter
    conf = json.load(open(tmp_path / "out" / "adapter" / "adapter_config.json"))
    assert conf["base_model_name_or_path"] == str(tmp_path / "out")
    assert (_peft_logits(tmp_path / "out" / "adapter", x) - ours).abs().max() <= TOL
    cks.export_peft(str(tmp_path / "adapter"), str(tmp_path / "peft"), hf_base=str(tmp_path / "hf"))
    assert (_peft_logits(tmp_path / "peft", x) - ours).abs().max() <= TOL
    cks.export_peft(str(tmp_path / "adapter"), str(tmp_path / "bare"))
    assert "pass --hf_base" in capsys.readouterr().out
    save_hf("llama2", str(tmp_path / "other"), num_hidden_layers=3)
    with pytest.raises(ck.CheckpointError, match="different model than the adapter's base"):
        cks.export_peft(str(tmp_path / "adapter"), str(tmp_path / "bad"), hf_base=str(tmp_path / "other"))


def test_lora_on_a_tied_output_head_is_refused(tmp_path, tiny_tokenizer, dist1):
    from engine.runtime.errors import UserError

    cks.init("tiny-qwen2", str(tmp_path / "q"), tokenizer=tiny_tokenizer)  # output head = token embeddings
    model = ck.load_model(str(tmp_path / "q"))
    with pytest.raises(UserError, match="ties its output head to the token embeddings"):
        apply_lora(model, LoRAConfig(rank=2, targets="wq,output"))


@pytest.mark.processes
def test_adapter_trained_at_tp2_loads_at_tp1_and_in_peft(tmp_path, tiny_tokenizer, dist1):
    """tiny-qwen2 has one KV head, replicated on both TP ranks: its LoRA B is stored twice and must
    be read once; the adapter loads into a TP=1 model and exports to peft with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from data.arithmetic import main as make_arith

    make_arith(str(tmp_path / "data"), n_train=8, n_test=2, style="fixed", min_value=10)
    cks.init("tiny-qwen2", str(tmp_path / "base"), n=1, tokenizer=tiny_tokenizer, seed=2)
    cks.split(str(tmp_path / "base"), str(tmp_path / "base2"), n=2)
    torchrun("train.py", "--task", "ARITH", "--ckpt_dir", str(tmp_path / "base2"), "--save_dir",
             str(tmp_path / "run"), "--train_file", str(tmp_path / "data" / "train.json"), "--max_batch_size", "4",
             "--model_type", "lora-tiny-qwen2", "--lora_rank", "4", "--lr", "5e-2", "--max_steps", "2",
             "--template", "none", "--max_seq_len", "64")
    adapter = tmp_path / "run" / "checkpoint-2"
    assert sorted(p for p in os.listdir(adapter) if p.startswith("lora.")) == ["lora.00.safetensors", "lora.01.safetensors"]
    model = ck.load_model(str(tmp_path / "base")).eval()
    load_lora_into(model, str(adapter))
    x = torch.randint(0, 320, (2, 16))
    cks.to_hf(str(adapter), str(tmp_path / "hf"), lora_dir=None)  # base + peft adapter beside it
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "hf" / "adapter")).eval()
    with torch.no_grad():
        ours = model(x)
        base = ck.load_model(str(tmp_path / "base")).eval()(x)
        assert (ours - base).abs().max() > 1e-3  # training moved the adapter
        assert (peft_model(x).logits - ours).abs().max() <= TOL

    # infer.py with the adapter (merged on load) == infer.py on the merged checkpoint
    import infer

    cks.merge_lora(str(adapter), str(tmp_path / "merged"), n=1)
    outs = []
    for name, kw in (("adapter", dict(ckpt_dir=str(tmp_path / "base"), lora_dir=str(adapter))),
                     ("merged", dict(ckpt_dir=str(tmp_path / "merged")))):
        infer.generate(data_file=str(tmp_path / "data" / "test.json"), output_file=str(tmp_path / f"{name}.jsonl"),
                       template="none", max_new_tokens=8, output_tokens=True, progress=False, **kw)
        outs.append([json.loads(line)["tokens"] for line in open(tmp_path / f"{name}.jsonl")])
    assert outs[0] == outs[1]
