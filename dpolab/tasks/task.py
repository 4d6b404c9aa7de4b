"""A verifiable task: training prompts, held-out prompts, and a reward a program computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Reward = Callable[[str, str], float]


@dataclass(frozen=True)
class Task:
    name: str
    train_prompts: Sequence[str]
    eval_prompts: Sequence[str]
    reward: Reward  # (prompt, completion text without EOS) -> float
    description: str = ""
