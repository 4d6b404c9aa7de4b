"""A verifiable task for a real chat model: label a short review positive or negative, in one word.

SmolLM2-135M-Instruct asked "Is this review positive or negative?" under the system prompt "Answer with one
word: positive or negative." answers in a sentence ("The review is positive, but"): 0 of 128 answers
sampled at temperature 1 and 0 of 16 greedy ones were the bare label (16 reviews). Shown two solved
examples first, as previous turns (a positive review → "Positive", a negative one → "Negative"), it answers
in one word often, but not reliably, and leans to "Positive": on 16 reviews, 36 % of sampled answers and
50 % of greedy ones were right, and its greedy answer to each of the 40 held-out reviews is "Positive".
That is the behaviour DPO on its own samples can fix: the format, and naming the label the review's words
carry.

The judge is a program: the answer, stripped of punctuation and case, must be exactly the label
(``"Negative."`` passes; ``"Positive negative"``, ``"The review is negative."`` and ``"Bad"`` do not).
The reviews are templated, ``"The <thing> was <adjective>."``, with known labels. Training and held-out
reviews share no thing and no adjective (nor any word of the two solved examples), so the held-out reward
measures the behaviour on words never trained on. Used by ``examples/sentiment_study.py``.
"""

from __future__ import annotations

import random
import re

from dpolab.tasks import Task

SYSTEM = "Answer with one word: positive or negative."
EXAMPLES = (("I enjoyed every minute.", "Positive"), ("It was a waste of money.", "Negative"))
TEMPLATE = "The {} was {}."

TRAIN_THINGS = ("pizza", "movie", "hotel room", "phone", "concert", "book", "bus ride", "haircut", "coffee",
                "laptop", "museum", "garden")
TRAIN_WORDS = {"positive": ("wonderful", "delicious", "excellent", "fantastic", "lovely", "great", "amazing",
                            "superb"),
               "negative": ("awful", "terrible", "disgusting", "horrible", "boring", "dreadful", "bad",
                            "disappointing")}
HELDOUT_THINGS = ("restaurant", "song", "train journey", "hat", "sofa", "game", "beach", "lecture")
HELDOUT_WORDS = {"positive": ("brilliant", "charming", "pleasant", "perfect", "marvellous"),
                 "negative": ("dull", "nasty", "poor", "unpleasant", "miserable")}
NUM_TRAIN, NUM_HELDOUT = 100, 40  # reviews per split, half of each label


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed: ``" Negative."`` → ``"negative"``."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _reviews(things, words, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (review, label) items, half of each label, a seeded draw of every thing × adjective."""
    rng = random.Random(seed)
    items = []
    for label in ("positive", "negative"):
        every = [(TEMPLATE.format(t, w), label) for t in things for w in words[label]]
        items += rng.sample(every, count // 2)
    rng.shuffle(items)
    return items


def split(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint (train, held-out) lists of (review, label)."""
    return (_reviews(TRAIN_THINGS, TRAIN_WORDS, NUM_TRAIN, seed),
            _reviews(HELDOUT_THINGS, HELDOUT_WORDS, NUM_HELDOUT, seed))


LABELS = {review: label for part in split() for review, label in part}


def prompt(review: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for text, label in EXAMPLES:
        messages += [{"role": "user", "content": f"Review: {text}"}, {"role": "assistant", "content": label}]
    return messages + [{"role": "user", "content": f"Review: {review}"}]


def review_of(prompt_messages) -> str:
    text = prompt_messages[-1]["content"] if isinstance(prompt_messages, list) else prompt_messages
    review = text.removeprefix("Review: ")
    if review not in LABELS:
        raise ValueError(f"not a review of the task: {text!r}")
    return review


def reward(prompt_messages, answer: str) -> float:
    """1.0 when the answer, stripped of punctuation and case, is exactly the review's label; else 0.0."""
    return float(normalise(answer) == LABELS[review_of(prompt_messages)])


def task() -> Task:
    train, heldout = split()
    return Task("sentiment", [prompt(r) for r, _ in train], [prompt(r) for r, _ in heldout], reward,
                "label a review positive or negative in one word")
