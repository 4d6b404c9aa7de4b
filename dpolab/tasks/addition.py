"""Two-digit addition: the task of the embedded default.

The prompt is ``"a+b="`` with 10 ≤ a, b ≤ 99 and the answer is the decimal sum, nothing else, e.g.
``"12+34="`` → ``"46"``. The reward is 1 for the exact, well-formed sum and 0 for anything else, so the
mean reward is the accuracy.

>>> reward("12+34=", "46"), reward("12+34=", "45"), reward("12+34=", " 46"), reward("12+34=", "046")
(1.0, 0.0, 0.0, 0.0)

The 8,100 problems are split once, by a fixed seed, into three disjoint sets: supervised fine-tuning
problems (the bundled base model learnt from these), preference prompts (the bundled pairs were sampled on
these) and held-out prompts (never trained on; the before/after table is measured on them).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from dpolab.tasks.task import Task

PROMPT = re.compile(r"^(\d+)\+(\d+)=$")
NUM_EVAL, NUM_TRAIN = 500, 3600  # the rest (4,000) is the supervised fine-tuning set


def reward(prompt: str, completion: str) -> float:
    """1.0 if ``completion`` is exactly the sum asked for in ``prompt``, else 0.0."""
    m = PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return float(completion == str(int(m.group(1)) + int(m.group(2))))


@lru_cache(maxsize=1)
def splits() -> dict[str, tuple[str, ...]]:
    """``{"sft", "train", "eval"}`` → prompts, disjoint, fixed forever (seed 0)."""
    problems = [f"{a}+{b}=" for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(problems)
    held, train = problems[:NUM_EVAL], problems[NUM_EVAL: NUM_EVAL + NUM_TRAIN]
    return {"eval": tuple(held), "train": tuple(train), "sft": tuple(problems[NUM_EVAL + NUM_TRAIN:])}


def answer(prompt: str) -> str:
    a, b = PROMPT.match(prompt).groups()
    return str(int(a) + int(b))


def task() -> Task:
    s = splits()
    return Task("addition", s["train"], s["eval"], reward,
                "two-digit addition, 'a+b=' → the sum; reward 1 for the exact sum, else 0")
