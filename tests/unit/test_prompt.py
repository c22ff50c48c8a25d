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


def dropping_one_title_at_a_time(tokenizer, titles, category, max_tokens):
    """The definition `encode_prompt` must meet (its former, quadratic algorithm): re-tokenize after each
    dropped title; None where even the single newest title does not fit."""
    titles = list(titles)
    while True:
        ids = tokenizer(render_prompt(titles, category), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return ids, len(titles)
        if len(titles) <= 1:
            return None
        titles = titles[1:]


class MergingTokenizer:
    """Characters as tokens, except that `", "` between two titles is one token: counting the tokens of each
    title's piece overestimates every prompt, so the first guess is wrong and the bisection has to find it."""

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) for c in text.replace('", "', "\x01")]}


@pytest.mark.parametrize("merging", [False, True])
def test_encode_prompt_equals_dropping_one_title_at_a_time(tiny_tokenizer, merging):
    import random

    from igdrec.errors import IgdrecError

    tokenizer = MergingTokenizer() if merging else tiny_tokenizer
    rng = random.Random(0)
    words = ["Heat", "Toy", "Story", "(1995)", "The", "Wave", '"quoted"', "a,", "é", "  ", "Fargo", "x" * 30]
    pool = TITLES + [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(40)]
    for trial in range(60):
        history = rng.choices(pool, k=rng.randint(1, 40))
        full = len(tokenizer(render_prompt(history, "movies"), add_special_tokens=False)["input_ids"])
        budget = rng.randint(full // 4, full + 5)
        expected = dropping_one_title_at_a_time(tokenizer, history, "movies", budget)
        if expected is None:
            with pytest.raises(IgdrecError, match="single history title"):
                encode_prompt(tokenizer, history, "movies", budget)
        else:
            assert encode_prompt(tokenizer, history, "movies", budget) == expected


def test_a_3000_title_history_is_encoded_in_linear_time(tiny_tokenizer):
    """Re-tokenizing the prompt once per dropped title took 40 s for a 2,900-item history."""
    import time

    history = [TITLES[i % len(TITLES)] + f" #{i}" for i in range(3000)]
    started = time.perf_counter()
    ids, used = encode_prompt(tiny_tokenizer, history, "movies", 1024)
    assert time.perf_counter() - started < 5
    assert (ids, used) == dropping_one_title_at_a_time(tiny_tokenizer, history[-used - 1:], "movies", 1024)


def test_a_target_longer_than_the_budget_is_blamed_not_a_history_title(tiny_tokenizer):
    from igdrec.errors import IgdrecError

    template = len(encode_prompt(tiny_tokenizer, [""], "movies", None)[0])
    target = item_token_sequence(tiny_tokenizer, "Heat " * 100)
    with pytest.raises(IgdrecError) as caught:
        encode_sample(tiny_tokenizer, ["Fargo"], "movies", target, cutoff_len=len(target) + template - 1,
                      sample="sample_id 7 (target 'Heat Heat')")
    assert str(caught.value) == (
        f"sample_id 7 (target 'Heat Heat'): the target is {len(target):,} tokens; with the prompt template's {template:,} "
        f"around the history that is over cutoff_len {len(target) + template - 1:,}: raise cutoff_len or shorten the title "
        "(preprocess max_title_chars)"
    )
    # room for the template but not for the history's one title: that title is named, with the sample
    plain = len(encode_prompt(tiny_tokenizer, ["Fargo (1996)"], "movies", None)[0])
    with pytest.raises(IgdrecError, match=r"^sample_id 7 \(target 'Heat Heat'\): prompt with the single history title 'Fargo \(1996\)'"):
        encode_sample(tiny_tokenizer, ["Fargo (1996)"], "movies", target, cutoff_len=len(target) + plain - 1,
                      sample="sample_id 7 (target 'Heat Heat')")


def test_training_names_the_sample_and_target_that_do_not_fit(tiny_tokenizer):
    from igdrec import training
    from igdrec.errors import IgdrecError

    titles = ["Fargo (1996)", "Heat " * 100]
    sequences = item_token_sequences(tiny_tokenizer, titles)
    data = training.SFTExamples(tiny_tokenizer, [[0], [1]], [1, 0], titles, sequences, "movies", "plain", 1.0,
                                cutoff_len=len(sequences[1]), sample_ids=[41, 42])
    with pytest.raises(IgdrecError, match=r"^sample_id 41 \(target 'Heat Heat Heat Heat Heat Heat Heat Heat '…\): the target is "):
        data.encoded(0)
