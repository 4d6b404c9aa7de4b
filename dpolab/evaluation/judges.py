"""Judges: who says which of two answers to a prompt is better. One interface, one registry by name.

A judge is called as ``judge(prompt, answer_a, answer_b)`` and returns the preference for ``answer_a``: 1.0
(a is better), 0.5 (a tie) or 0.0 (b is better); ``judge.identity`` names it for the cache. A pointwise
scorer ``(prompt, answer) -> float`` becomes a judge through :class:`Pointwise` (the higher score wins, equal
scores tie). :func:`load_judge` builds one from its name, ``KIND:ARGUMENT`` with a kind of :data:`JUDGES`:

- ``task:addition`` (or just ``addition``, a built-in task): the task's program reward;
- ``function:module:fn`` (or just ``module:fn``): a function of yours, pointwise ``(prompt, completion) ->
  float`` or pairwise ``(prompt, a, b) -> preference in [0, 1]``;
- ``reward_model:PATH``: a local ``AutoModelForSequenceClassification`` folder, scoring each answer;
- ``llm:PATH``: a local chat model asked to choose, each pair in both orders (ties where they disagree);
- ``endpoint:BASE_URL``: an OpenAI-compatible chat-completions endpoint, asked the same way (the model name,
  the environment variable holding the key and the timeout are settings of their own).

:func:`judge_pairs` judges a list of pairs through a :class:`JudgmentCache` on disk, keyed by a content hash
of (judge identity, prompt, answers), so a rerun judges nothing twice; a judge that fails stops with one
paragraph that says how many pairs were judged (and kept in the cache).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

from tqdm.auto import tqdm

from dpolab.errors import JudgeError
from dpolab.evaluation.model_judges import (BothOrders, EndpointChoice, JudgeFailure, LocalChoice, RewardModel,
                                            weights_identity)
from dpolab.tasks import builtin_tasks, load_object, load_task


class Pointwise:
    """A judge from a scorer ``(prompt, answer) -> float``: the higher score wins, equal scores tie.

    >>> Pointwise(lambda p, a: len(a), "length")("q", "long", "s")
    1.0
    """

    def __init__(self, score: Callable[[object, str], float], identity: str):
        self.score, self.identity = score, identity

    def value(self, prompt, answer: str) -> float:
        s = self.score(prompt, answer)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise JudgeFailure(f"the score of answer {answer!r} is {s!r}, not a finite number")
        return float(s)

    def __call__(self, prompt, answer_a: str, answer_b: str) -> float:
        a, b = self.value(prompt, answer_a), self.value(prompt, answer_b)
        return 1.0 if a > b else 0.5 if a == b else 0.0


class Pairwise:
    """A judge from a function ``(prompt, a, b) -> preference``, checked to be a number in [0, 1]."""

    def __init__(self, fn: Callable[[object, str, str], float], identity: str):
        self.fn, self.identity = fn, identity

    def __call__(self, prompt, answer_a: str, answer_b: str) -> float:
        p = self.fn(prompt, answer_a, answer_b)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise JudgeFailure(f"it returned {p!r} for answers {answer_a!r} and {answer_b!r}, not a "
                               "preference in [0, 1]")
        return float(p)


class Settings(NamedTuple):
    """What a judge may need besides its name (the endpoint's model, key variable and timeout)."""

    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 30.0
    trust_remote_code: bool = False


def task_judge(arg: str, settings: Settings):
    try:
        return Pointwise(load_task(arg).reward, f"task:{arg}")
    except ValueError as e:
        raise JudgeFailure(str(e)) from None


def function_judge(arg: str, settings: Settings):
    try:
        fn = load_object(arg)
    except ValueError as e:
        raise JudgeFailure(str(e)) from None
    if not callable(fn):
        raise JudgeFailure(f"{arg} is not callable")
    try:
        arity = len([p for p in inspect.signature(fn).parameters.values() if p.default is p.empty])
    except (TypeError, ValueError):
        arity = 2
    if arity not in (2, 3):
        raise JudgeFailure(f"{arg} takes {arity} arguments; a judge takes (prompt, completion) or "
                           "(prompt, answer_a, answer_b)")
    return (Pointwise if arity == 2 else Pairwise)(fn, f"function:{arg}")


JUDGES: dict[str, Callable[[str, Settings], object]] = {
    "task": task_judge,
    "function": function_judge,
    "reward_model": lambda arg, s: Pointwise(RewardModel(arg, s.trust_remote_code), ""),
    "llm": lambda arg, s: BothOrders(LocalChoice(arg, s.trust_remote_code), f"llm:{weights_identity(arg)}"),
    "endpoint": lambda arg, s: BothOrders(EndpointChoice(arg, s.model, s.api_key_env, s.timeout),
                                          f"endpoint:{arg}#{s.model}"),
}


def load_judge(spec: str, settings: Settings | None = None):
    """The judge named ``spec`` (see the module's docstring); a bad name is one paragraph."""
    settings = settings or Settings()
    kind, _, arg = spec.partition(":")
    if kind not in JUDGES:
        kind, arg = ("task", spec) if spec in builtin_tasks() else ("function", spec) if ":" in spec else ("", "")
    if not kind or not arg:
        raise JudgeError(f"judge: unknown judge {spec!r}. A judge is KIND:ARGUMENT with KIND one of "
                         f"{', '.join(JUDGES)} (e.g. task:addition, reward_model:path/to/folder, llm:path/to/chat-"
                         f"model, endpoint:http://host:port/v1), a built-in task ({', '.join(builtin_tasks())}), "
                         "or module:function")
    try:
        judge = JUDGES[kind](arg, settings)
    except JudgeFailure as e:
        raise JudgeError(f"judge {spec}: {e}") from None
    if isinstance(judge, Pointwise) and not judge.identity:  # a reward model names itself
        judge.identity = judge.score.identity
    return judge


class JudgmentCache:
    """Judgments on disk, one JSON line ``{"key", "preference"}`` each, appended as they are made (a line
    cut short by a kill is ignored on reading). ``path=None``: in memory only."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path is not None else None
        self.values: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.values[row["key"]] = float(row["preference"])
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(identity: str, prompt, answer_a: str, answer_b: str) -> str:
        return hashlib.sha256(json.dumps([identity, prompt, answer_a, answer_b]).encode()).hexdigest()

    def put(self, key: str, preference: float) -> None:
        self.values[key] = preference
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "preference": preference}) + "\n")


def judge_pairs(judge, pairs: list[tuple], cache: JudgmentCache, progress: bool = True,
                desc: str = "judging") -> list[float]:
    """The preference for the first answer of each ``(prompt, answer_a, answer_b)``, from the cache where it
    has one, else from ``judge`` (and then cached)."""
    out = []
    fresh = 0
    for i, (prompt, a, b) in enumerate(tqdm(pairs, desc=desc, disable=not progress, unit="pair")):
        key = cache.key(judge.identity, prompt, a, b)
        if key not in cache.values:
            try:
                cache.put(key, judge(prompt, a, b))
            except Exception as e:  # the judge is the user's code, a model or a remote service: say which pair
                reason = str(e) if isinstance(e, JudgeFailure) else f"{type(e).__name__}: {e}"
                kept = f", kept in {cache.path}" if cache.path is not None else ""
                raise JudgeError(f"judge {judge.identity} failed on pair {i + 1} of {len(pairs)} (prompt "
                                 f"{str(prompt)[:80]!r}): {reason}. {i} of {len(pairs)} pairs were judged "
                                 f"({fresh} just now{kept}); fix the judge and run again to continue where it "
                                 "stopped") from None
            fresh += 1
        out.append(cache.values[key])
    return out
