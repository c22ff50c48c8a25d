"""`decoding`: the decode batch size (auto and given) and what a `Decoder` refuses or keeps on a CPU."""

from __future__ import annotations

import pytest
from decode_helpers import model_dir, run  # noqa: F401 (fixtures)

from igdrec.config import DecodeConfig
from igdrec.errors import IgdrecError


def test_batch_size_auto_is_eight_on_cpu_and_fits_free_memory_on_cuda():
    from types import SimpleNamespace

    from igdrec.config import parse_batch_size
    from igdrec.decoding import AUTO_MEMORY_SHARE, auto_batch_size, sample_memory_bytes

    assert parse_batch_size("auto") is None and parse_batch_size(12) == 12 and parse_batch_size("3") == 3
    for bad in ("0", "-1", "many", 2.5):
        with pytest.raises(IgdrecError, match="--batch-size"):
            parse_batch_size(bad)
    # SmolLM2-135M's shape
    shape = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                            head_dim=64, intermediate_size=1536, vocab_size=49152)
    # by hand: KV = 2·30·3·64·2 B · (10+1) beams · (200+30) tokens; logits = 10 · 31 · 49152 · (2+8) B
    kv = 2 * 30 * 3 * 64 * 2 * 11 * 230
    logits = 10 * 31 * 49152 * 10
    assert sample_memory_bytes(shape, 10, 200, 30, 2) == kv + logits
    free = 40 << 30  # an H100 with a large model loaded: below the cap
    batch = auto_batch_size(shape, 10, 200, 30, 2, free)
    assert batch % 8 == 0 and batch * (kv + logits) <= AUTO_MEMORY_SHARE * free < (batch + 8) * (kv + logits)
    assert auto_batch_size(shape, 10, 2000, 30, 2, free) < batch  # longer prompts, fewer samples
    assert auto_batch_size(shape, 10, 200, 30, 2, 1 << 20) == 1  # never below one
    assert auto_batch_size(shape, 1, 10, 5, 2, 1 << 40) == 256  # capped
    # static shapes: 48 B for each of a beam's candidates (the trie's widest node: 5,000 children)
    assert sample_memory_bytes(shape, 10, 200, 30, 2, candidate_width=5000) == kv + logits + 10 * 5000 * 48
    assert auto_batch_size(shape, 10, 200, 30, 2, free, candidate_width=100_000) < batch  # a root with 100,000 children


def test_decoder_on_cpu_keeps_fp32_and_batches_eight(run, model_dir):
    import torch

    from igdrec.decoding import Decoder

    decoder = Decoder.from_run(run.root, model=str(model_dir), device="cpu")
    assert next(decoder.model.parameters()).dtype == torch.float32
    assert decoder.batch_size(prompt_len=100) == 8
    assert Decoder(decoder.model, decoder.tokenizer, decoder.catalog, DecodeConfig(batch_size="5")).batch_size(100) == 5
    # S / L^lp needs L^lp finite in float32: the largest length penalty (10) with a hypothesis of 10^5 tokens is not
    with pytest.raises(IgdrecError, match=r"^--length-penalty 10: L\^lp overflows float32 for hypotheses of up to 100001 tokens"):
        Decoder(decoder.model, decoder.tokenizer, decoder.catalog, DecodeConfig(constrained=False, max_new_tokens=100_000, length_penalty=10))
    Decoder(decoder.model, decoder.tokenizer, decoder.catalog, DecodeConfig(constrained=False, max_new_tokens=7000, length_penalty=10))


def test_compile_turns_on_static_shapes_and_the_inductor_backend(run, model_dir):
    """--compile: the search compiles the model with inductor and takes static shapes (their results are
    those of the default search: tests/unit/test_beam_static.py); without it a CPU decode shrinks its passes."""
    from igdrec.decoding import Decoder

    decoder = Decoder.from_run(run.root, model=str(model_dir), device="cpu")
    assert not decoder.engine.static_shapes and decoder.engine.compile_backend is None
    compiled = Decoder(decoder.model, decoder.tokenizer, decoder.catalog, DecodeConfig(compile=True))
    assert compiled.engine.static_shapes and compiled.engine.compile_backend == "inductor"
