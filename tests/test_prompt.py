"""The prompt/target contract: tokenizing prompt and target together gives the target ids of
`item_token_sequence`, so SFT labels, the IG trie and the decoding trie agree token for token."""

import pytest

from igdrec.prompt import (
    RESPONSE_HEADER,
    encode_prompt,
    encode_sample,
    item_token_sequence,
    item_token_sequences,
    reference_prompt,
    render_prompt,
)
from fixtures import TITLES

HISTORIES = [[], ["Toy Story (1995)"], ["Heat", "Heat Wave", "Fargo (1996)"], TITLES[:10]]


def assert_joint_tokenization_matches(tokenizer, titles):
    for history in HISTORIES:
        prompt = render_prompt(history, "movies")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for title in titles:
            joint = tokenizer(prompt + title + "\n", add_special_tokens=False)["input_ids"]
            target = item_token_sequence(tokenizer, title)
            assert target[-1] == tokenizer.eos_token_id
            assert joint[: len(prompt_ids)] == prompt_ids, title
            assert joint[len(prompt_ids):] + [tokenizer.eos_token_id] == target, title


def test_joint_tokenization_equals_item_token_sequence_tiny(tiny_tokenizer):
    titles = TITLES + ["Call of Duty: Black Ops", "  spaced", "naïve café", "日本語のタイトル", "a\tb", "123"]
    assert_joint_tokenization_matches(tiny_tokenizer, titles)


@pytest.mark.network
def test_joint_tokenization_equals_item_token_sequence_embedded():
    from igdrec.modeling import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.eos_token_id == 2 and len(tokenizer) == 49152
    assert_joint_tokenization_matches(tokenizer, TITLES + ["Call of Duty: Black Ops", "naïve café", "Se7en (1995)"])


def test_batched_equals_single(tiny_tokenizer):
    assert item_token_sequences(tiny_tokenizer, TITLES) == [item_token_sequence(tiny_tokenizer, t) for t in TITLES]


def test_prompt_template_and_reference_prompt():
    prompt = render_prompt(["A", "B"], "movies")
    assert prompt.endswith(RESPONSE_HEADER)
    assert '"A", "B"' in prompt and "movies" in prompt
    assert reference_prompt("movies") == render_prompt([], "movies")
    assert "Unknown" in reference_prompt("movies")


def test_encode_sample_labels_are_the_item_tokens(tiny_tokenizer):
    target = item_token_sequence(tiny_tokenizer, "Heat Wave")
    sample = encode_sample(tiny_tokenizer, ["Heat", "Fargo (1996)"], "movies", target, cutoff_len=512)
    assert sample.input_ids[sample.prompt_len:] == target
    assert sample.history_used == 2


def test_encode_prompt_drops_oldest_history_to_fit(tiny_tokenizer):
    history = TITLES[:10]
    full, used = encode_prompt(tiny_tokenizer, history, "movies", None)
    assert used == 10
    limit = len(full) - 5
    ids, used = encode_prompt(tiny_tokenizer, history, "movies", limit)
    assert len(ids) <= limit and 1 <= used < 10
    assert ids == tiny_tokenizer(render_prompt(history[10 - used:], "movies"), add_special_tokens=False)["input_ids"]
    # one more title would not have fitted
    longer = tiny_tokenizer(render_prompt(history[10 - used - 1:], "movies"), add_special_tokens=False)["input_ids"]
    assert len(longer) > limit
