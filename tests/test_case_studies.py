"""The case studies' tasks (examples/sentiment.py, examples/capitals.py): their judges on hand-written
answers, their splits disjoint, and the held-out pairs the studies build judged as they claim. Fast: no model
is loaded (docs/real-model.md reports the studies themselves)."""

import re

import pytest

from examples import capital_study, capitals, sentiment, sentiment_study


def test_sentiment_judge_accepts_the_bare_label_only():
    train, heldout = sentiment.split()
    good = sentiment.prompt(next(r for r, label in train if label == "positive"))
    bad = sentiment.prompt(next(r for r, label in heldout if label == "negative"))
    for answer in ("Positive", "positive.", " POSITIVE! ", "Positive ."):
        assert sentiment.reward(good, answer) == 1.0, answer
    for answer in ("Negative", "Positive negative", "The review is positive.", "Good", "Positively", "", "Pos"):
        assert sentiment.reward(good, answer) == 0.0, answer
    assert sentiment.reward(bad, "Negative.") == 1.0 and sentiment.reward(bad, "Positive") == 0.0
    with pytest.raises(ValueError):
        sentiment.reward(sentiment.prompt("The cat was grey."), "Positive")


def test_sentiment_splits_share_no_review_and_no_word_and_are_balanced():
    train, heldout = sentiment.split()
    assert (len(train), len(heldout)) == (sentiment.NUM_TRAIN, sentiment.NUM_HELDOUT)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    words = lambda items: {w for review, _ in items for w in re.findall(r"[a-z]+", review.lower())}
    shared = (words(train) & words(heldout)) - {"the", "was"}
    assert not shared, shared
    shots = {w for text, _ in sentiment.EXAMPLES for w in re.findall(r"[a-z]+", text.lower())}
    assert not (shots & (words(train) | words(heldout))) - {"the", "was"}
    for items in (train, heldout):
        assert sum(label == "positive" for _, label in items) == len(items) // 2
    # each label is the one its adjective carries, checked against the word lists independently
    for review, label in train + heldout:
        adjective = review.rstrip(".").split()[-1]
        assert adjective in (sentiment.TRAIN_WORDS[label] + sentiment.HELDOUT_WORDS[label]), review
    assert sentiment.split() == (train, heldout)  # fixed, not redrawn per call


def test_capitals_judge_accepts_the_bare_city_only_and_splits_are_disjoint():
    france = capitals.prompt("France")
    assert capitals.reward(france, "Paris.") == 1.0 and capitals.reward(france, " paris ") == 1.0
    for answer in ("The capital of France is Paris.", "Paris, France", "Lyon", ""):
        assert capitals.reward(france, answer) == 0.0, answer
    train, heldout = capitals.split()
    assert not set(train) & set(heldout) and capitals.EXAMPLE[0] not in train + heldout
    assert len(heldout) == capitals.NUM_HELDOUT and len(train) + len(heldout) == len(capitals.CAPITALS) - 1


@pytest.mark.parametrize("module, study", [(sentiment, sentiment_study.study), (capitals, capital_study.study)])
def test_held_out_pairs_are_a_right_answer_against_a_wrong_one_on_held_out_prompts(module, study):
    s = study()
    task = module.task()
    assert s.module == module.__name__
    assert all(p not in task.train_prompts for p in task.eval_prompts)
    assert [p for p in s.train_prompts] == list(task.train_prompts)
    for row in s.heldout_pairs:
        assert row["prompt"] in task.eval_prompts
        assert module.reward(row["prompt"], row["chosen"]) == 1.0
        assert module.reward(row["prompt"], row["rejected"]) == 0.0
    assert all(p in task.eval_prompts for _, p in s.shown)
