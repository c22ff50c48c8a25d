"""The one prompt template and the one item-token-sequence function (docs/method.md §3).

SFT labels, the IG trie and the decoding trie all go through `item_token_sequence`: if any of them
tokenized titles differently, IG weights would silently land on the wrong tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from igdrec.errors import IgdrecError

RESPONSE_HEADER = "### Response:\n"
UNKNOWN_HISTORY = "Unknown"  # CFT's reference prompt replaces the history with this word

TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n"
    "Given a list of {category} the user recently enjoyed, please write the title of one more that the user may enjoy.\n\n"
    "### User Input:\n"
    "The user has interacted with the following {category} before: {history}\n\n" + RESPONSE_HEADER
)

# Category word per dataset, as in the reference code ("musics" for CDs is theirs).
CATEGORY_WORDS = {
    "ml-100k": "movies",
    "ml-1m": "movies",  # RecBole's other MovieLens sets (--source recbole names its data by the set)
    "ml-10m": "movies",
    "ml-20m": "movies",
    "Books": "books",
    "Video_Games": "video games",
    "Toys_and_Games": "toys and games",
    "CDs_and_Vinyl": "musics",
    "Movies_and_TV": "movies",
    "Sports_and_Outdoors": "sports products",
    "Beauty": "beauty products",
}
DEFAULT_CATEGORY_WORD = "items"


def category_word(source: str, category: str | None = None) -> str:
    return CATEGORY_WORDS.get(category or source, DEFAULT_CATEGORY_WORD)


def render_prompt(history_titles: Sequence[str], category: str) -> str:
    history = ", ".join(f'"{t}"' for t in history_titles) if history_titles else UNKNOWN_HISTORY
    return TEMPLATE.format(category=category, history=history)


def reference_prompt(category: str) -> str:
    """CFT's reference prompt: the same template with the history replaced by "Unknown"."""
    return render_prompt([], category)


def item_token_sequence(tokenizer, title: str) -> list[int]:
    """Token ids the model writes for an item: tokenize(title + "\\n") + [eos], as at the prompt's end.

    The title is tokenized after the response header and the header's ids removed, so that tokenizers
    that treat the start of a text specially (SentencePiece's leading space) give the ids the model sees.
    """
    return item_token_sequences(tokenizer, [title])[0]


def item_token_sequences(tokenizer, titles: Sequence[str]) -> list[list[int]]:
    """Batched `item_token_sequence` (one fast-tokenizer call for the whole catalog)."""
    header = tokenizer(RESPONSE_HEADER, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    n = len(header)
    out = []
    for title, ids in zip(titles, _encode_batch(tokenizer, [RESPONSE_HEADER + t + "\n" for t in titles])):
        if ids[:n] != header:
            raise ValueError(f"tokenizer merges the response header with title {title!r}; cannot align labels")
        out.append(ids[n:] + [eos])
    return out


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; straight through the Rust backend when there is one.

    Skipping transformers' per-text wrapping saves about a quarter of the catalog tokenization time
    and yields the same ids (the backend is what the wrapper calls).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]


@dataclass
class EncodedSample:
    input_ids: list[int]  # prompt ids followed by the target ids
    prompt_len: int  # labels are input_ids[prompt_len:]
    history_used: int  # how many of the most recent history items fit into the cutoff


def encode_prompt(tokenizer, history_titles: Sequence[str], category: str, max_tokens: int | None) -> tuple[list[int], int]:
    """Prompt ids, dropping the oldest history titles until the prompt fits into `max_tokens`.

    A prompt that does not fit even with a single history title (or none) is refused with an
    IgdrecError naming that title: it is never returned longer than `max_tokens`.

    The result is that of dropping one title at a time and tokenizing the prompt again, in linear time:
    each title is tokenized once, as the piece it adds to the prompt, and the pieces' token counts give
    the first title to keep; tokenizing that prompt and the one with one more title confirms the guess.
    Where a tokenizer merges tokens across pieces the guess can be off, and a bisection over real
    tokenizations finds the first title to keep (as long as dropping a title never lengthens the prompt).
    """
    titles = list(history_titles)
    n = len(titles)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    prompts: dict[int, list[int]] = {}  # first title kept -> the prompt's ids

    def fits(start: int) -> bool:
        prompts[start] = bos + tokenizer(render_prompt(titles[start:], category), add_special_tokens=False)["input_ids"]
        return max_tokens is None or len(prompts[start]) <= max_tokens

    if max_tokens is None or n == 0:
        if fits(0):
            return prompts[0], n
    else:
        lo, hi = 0, n  # the first start whose prompt fits lies in [lo, hi); hi = n: none does
        probes = [_first_fitting_guess(tokenizer, titles, category, max_tokens - len(bos))]
        probes.append(probes[0] - 1)  # one title more must not fit
        while lo < hi:
            start = probes.pop(0) if probes else (lo + hi) // 2
            if lo <= start < hi:
                if fits(start):
                    hi = start
                else:
                    lo = start + 1
        if hi < n:
            return prompts[hi], n - hi
    last = titles[-1] if titles else None
    what = f"with the single history title {last[:40]!r}{'…' if len(last) > 40 else ''}" if titles else "without history"
    raise IgdrecError(
        f"prompt {what} is {len(prompts[max(n - 1, 0)]):,} tokens, over its budget of {max_tokens:,} (cutoff_len, less the target's tokens in training); "
        "raise cutoff_len or shorten the title (preprocess max_title_chars)"
    )


def _first_fitting_guess(tokenizer, titles: list[str], category: str, max_tokens: int) -> int:
    """The first title to keep by token counts: the template around the history, and each title as the
    ` "title",` piece it adds (the last one with the template's end), all tokenized once. Pieces start at
    the space before a title's quote, where byte-level BPE pre-tokenizers split anyway, so their counts
    add up to the prompt's length for the usual tokenizers."""
    head, tail = TEMPLATE.format(category=category, history="\0").split("\0")
    pieces = [head.removesuffix(" ")] + [f' "{t}",' for t in titles[:-1]] + [f' "{titles[-1]}"' + tail]
    counts = np.array([len(ids) for ids in _encode_batch(tokenizer, pieces)])
    lengths = counts[0] + np.cumsum(counts[:0:-1])[::-1]  # the prompt's length when keeping titles[j:]
    fitting = np.flatnonzero(lengths <= max_tokens)
    return int(fitting[0]) if fitting.size else len(titles)


def encode_sample(tokenizer, history_titles: Sequence[str], category: str, target_ids: Sequence[int], cutoff_len: int | None,
                  sample: str = "sample") -> EncodedSample:
    """Prompt + target for SFT; the prompt gets whatever of `cutoff_len` the target leaves over.

    Refused with an IgdrecError naming `sample` (e.g. "train.parquet sample_id 7 (target 'Heat')") when
    no prompt fits: blaming the target when it leaves less room than the template around any history needs."""
    budget = None if cutoff_len is None else cutoff_len - len(target_ids)
    try:
        prompt_ids, used = encode_prompt(tokenizer, history_titles, category, budget)
    except IgdrecError as exc:
        template = len(encode_prompt(tokenizer, [""], category, None)[0])  # the shortest prompt with a history
        if template > budget:
            raise IgdrecError(
                f"{sample}: the target is {len(target_ids):,} tokens; with the prompt template's {template:,} around the history that is over "
                f"cutoff_len {cutoff_len:,}: raise cutoff_len or shorten the title (preprocess max_title_chars)"
            ) from exc
        raise IgdrecError(f"{sample}: {exc}") from exc
    return EncodedSample(input_ids=prompt_ids + list(target_ids), prompt_len=len(prompt_ids), history_used=used)


def shared_prefix_len(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> int:
    """Length of the token prefix common to all rows (the template's instruction, when their prompts are
    built by this module), capped one short of the shortest prompt so that every row keeps its last prompt
    token, whose logits predict what follows, outside the prefix."""
    limit = min(prompt_lens) - 1
    first = np.asarray(sequences[0][:limit])
    for seq in sequences[1:]:
        n = min(len(first), len(seq))
        differ = np.flatnonzero(first[:n] != np.asarray(seq[:n]))
        first = first[: differ[0] if differ.size else n]
    return max(len(first), 0)
