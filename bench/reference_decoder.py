"""The decoding design of the reference code, as a baseline: transformers `generate` with beam search and
a per-beam Python logits processor that walks a dict trie and applies the IG weights.

For every beam at every step the processor re-walks the beam's generated prefix through a Python dict
trie, masks the disallowed tokens and multiplies the allowed log-probs by w_d = 1 - alpha * IG~.
It is the yardstick `bench_decode.py` measures igdrec's batched decoder against, and the oracle the
tests compare it with (same hypotheses, same scores).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from igdrec.ig import CatalogTrie


def dict_trie(trie: CatalogTrie) -> dict:
    """{token: (ig_norm, children)} nested dicts, one per catalog prefix."""
    root: dict = {}
    for row in range(len(trie.item_ids)):
        nodes = trie.item_path_nodes[trie.item_path_ptr[row]:trie.item_path_ptr[row + 1]]
        level = root
        for node in nodes.tolist():
            entry = level.setdefault(int(trie.token[node]), (float(trie.ig_norm[node]), {}))
            level = entry[1]
    return root


class TrieIGLogitsProcessor(LogitsProcessor):
    def __init__(self, root: dict, prompt_len: int, alpha: float):
        self.root = root
        self.prompt_len = prompt_len
        self.alpha = alpha

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        for row, sequence in enumerate(input_ids[:, self.prompt_len:].tolist()):
            level = self.root
            for token in sequence:
                entry = level.get(token)
                if entry is None:  # a placeholder beam off the catalog: nothing allowed
                    level = {}
                    break
                level = entry[1]
            if not level:
                continue
            allowed = torch.tensor(list(level), dtype=torch.long)
            weights = torch.tensor([1.0 - self.alpha * ig for ig, _ in level.values()], dtype=scores.dtype)
            out[row, allowed] = scores[row, allowed] * weights if self.alpha else scores[row, allowed]
        return out


@torch.no_grad()
def reference_generate(model, prompts: list[list[int]], *, num_beams: int, length_penalty: float, eos_token_id: int,
                       pad_token_id: int, max_new_tokens: int, root: dict | None = None, alpha: float = 0.0):
    """Beam search with transformers `generate` on a left-padded batch; returns per prompt a list of
    (generated tokens up to and including EOS, sequence score), best first."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention[i, width - len(p):] = 1
    processors = LogitsProcessorList([TrieIGLogitsProcessor(root, width, alpha)] if root is not None else [])
    config = GenerationConfig(
        num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
        length_penalty=length_penalty, early_stopping=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        output_scores=True, return_dict_in_generate=True,
    )
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
                         logits_processor=processors)
    sequences = out.sequences[:, width:].tolist()
    scores = out.sequences_scores.tolist()
    results = []
    for i in range(len(prompts)):
        hyps = []
        for k in range(num_beams):
            tokens = sequences[i * num_beams + k]
            if eos_token_id in tokens:
                tokens = tokens[: tokens.index(eos_token_id) + 1]
            hyps.append((tokens, scores[i * num_beams + k]))
        results.append(hyps)
    return results
