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


def test_a_prompt_that_cannot_fit_is_refused_not_returned_long(tiny_tokenizer):
    """Dropping history stops at one title; if that prompt is still over budget it is an error naming
    the title, never a prompt longer than the budget."""
    import pytest

    from igdrec.errors import IgdrecError

    huge = "Heat " * 400
    plain, _ = encode_prompt(tiny_tokenizer, ["Fargo"], "movies", None)
    ids, used = encode_prompt(tiny_tokenizer, [huge, "Fargo"], "movies", len(plain))  # the huge oldest title is dropped
    assert (ids, used) == (plain, 1)
    needed = len(encode_prompt(tiny_tokenizer, [huge], "movies", None)[0])  # "Fargo", the older, is dropped first
    with pytest.raises(IgdrecError, match=rf"prompt with the single history title 'Heat Heat .*'… is {needed:,} tokens, over its budget of 512"):
        encode_prompt(tiny_tokenizer, ["Fargo", huge], "movies", 512)
    empty, _ = encode_prompt(tiny_tokenizer, [], "movies", None)
    with pytest.raises(IgdrecError, match=rf"prompt without history is {len(empty)} tokens, over its budget of 5\b"):
        encode_prompt(tiny_tokenizer, [], "movies", 5)
    # every prompt returned fits its budget, whatever the budget
    for budget in range(len(empty), needed + 5, 97):
        try:
            ids, _ = encode_prompt(tiny_tokenizer, ["Fargo", huge, "Heat"], "movies", budget)
        except IgdrecError:
            continue
        assert len(ids) <= budget
