"""A tiny byte-level BPE tokenizer and a tiny random Llama, built in-process (no download).

Both are saved into a directory so that they go through the same `--model DIR` path as a real model.
"""

from __future__ import annotations

from pathlib import Path

from igdrec.prompt import TEMPLATE

EOS = "<|im_end|>"
BOS = "<|im_start|>"

CORPUS_TITLES = [
    "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "The Lion King (1994)", "The Usual Suspects (1995)", "Star Wars (1977)", "The Godfather (1972)",
    "Return of the Jedi (1983)", "The Empire Strikes Back (1980)", "Fargo (1996)", "Heat (1995)",
    "Super Mario Odyssey", "The Legend of Zelda", "Halo 3", "Call of Duty: Black Ops", "Lego Star Wars",
]


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TEMPLATE.format(category="movies", history=", ".join(CORPUS_TITLES))] * 4
    corpus += CORPUS_TITLES * 8
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS)


def build_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, tie: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        eos_token_id=0,
        bos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, seed: int = 0, embedding_scale: float = 1.0) -> Path:
    """Save the tiny model and tokenizer; `embedding_scale` > 1 makes its next-token distributions peaked."""
    import torch

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embedding_scale)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
