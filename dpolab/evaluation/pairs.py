"""On-policy preference pairs: sample answers from a model, score them, pair a better with a worse one.

This is how Tülu 3 built its on-policy preference data, with a program in place of the judge: for each
prompt, draw several answers from the model itself, score each with a reward function, and, where the
scores differ, pair an answer of the highest score (chosen) with one of the lowest (rejected), ties broken
by a seeded draw. Prompts whose answers all score the same give no pair. Rows are written in the standard
format (the conversational one for a prompt of chat messages: each answer one assistant message) with the scores, so ODPO's ``margin`` can be derived from ``score_chosen − score_rejected``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from dpolab.data.reading import iter_rows
from dpolab.errors import ConfigError, DataError
from dpolab.evaluation.generate import sample
from dpolab.evaluation.judges import JudgmentCache, Pointwise, judge_pairs
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.tasks import load_reward


def pair_rows(prompts, completions: list[list[str]], scores: list[list[float]], seed: int = 0) -> list[dict]:
    """One ``{prompt, chosen, rejected, score_chosen, score_rejected}`` row per prompt whose scores differ.

    >>> pair_rows(["1+1="], [["2", "3", "2"]], [[1.0, 0.0, 1.0]], seed=0)
    [{'prompt': '1+1=', 'chosen': '2', 'rejected': '3', 'score_chosen': 1.0, 'score_rejected': 0.0}]
    """
    rng = random.Random(seed)
    rows = []
    for prompt, answers, s in zip(prompts, completions, scores):
        hi, lo = max(s), min(s)
        if hi == lo:
            continue
        chosen = rng.choice([a for a, v in zip(answers, s) if v == hi])
        rejected = rng.choice([a for a, v in zip(answers, s) if v == lo])
        if isinstance(prompt, list):  # a chat prompt: the answers are assistant messages, as training reads them
            chosen, rejected = ([{"role": "assistant", "content": a}] for a in (chosen, rejected))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": hi,
                     "score_rejected": lo})
    return rows


def all_pair_rows(prompts, completions: list[list[str]], scores: list[list[float]]) -> list[dict]:
    """Every two distinct answers of a prompt whose scores differ, the higher-scored one chosen, with the score
    gap as ``margin`` (for margin-aware losses such as ``odpo``).

    >>> rows = all_pair_rows(["q"], [["a", "b", "c", "a"]], [[2.0, 0.5, 1.0, 2.0]])
    >>> [(r["chosen"], r["rejected"], r["margin"]) for r in rows]
    [('a', 'b', 1.5), ('a', 'c', 1.0), ('c', 'b', 0.5)]
    """
    rows = []
    for prompt, answers, s in zip(prompts, completions, scores):
        unique = list(dict.fromkeys(zip(answers, s)))  # each distinct answer once, in order of first sampling
        for i, (a, sa) in enumerate(unique):
            for b, sb in unique[i + 1:]:
                if sa == sb:
                    continue
                (c, sc), (r, sr) = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
                if isinstance(prompt, list):
                    c, r = ({"role": "assistant", "content": x} for x in (c, r))
                rows.append({"prompt": prompt, "chosen": c, "rejected": r, "score_chosen": sc, "score_rejected": sr,
                             "margin": sc - sr})
    return rows


class _Score:
    """A pointwise judge's score of one answer, through :func:`judge_pairs` and its cache (the second answer
    is empty and unused)."""

    def __init__(self, judge: Pointwise):
        self.judge, self.identity = judge, f"{judge.identity}#score"

    def __call__(self, prompt, answer: str, _: str) -> float:
        return self.judge.value(prompt, answer)


def judge_scores(judge, prompts, completions: list[list[str]], cache: JudgmentCache,
                 progress: bool = True) -> list[list[float]]:
    """A score for every answer, judged through ``cache``. A pointwise judge scores each distinct answer once;
    a pairwise judge compares every two distinct answers of a prompt, and an answer's score is its mean
    preference against the others (a Borda count: 1 beats all, 0 loses to all)."""
    distinct = [list(dict.fromkeys(answers)) for answers in completions]
    if isinstance(judge, Pointwise):
        values = iter(judge_pairs(_Score(judge), [(p, a, "") for p, u in zip(prompts, distinct) for a in u], cache,
                                  progress, desc="judging answers"))
        by_answer = [{a: next(values) for a in u} for u in distinct]
    else:
        matches = [(p, u[i], u[j]) for p, u in zip(prompts, distinct)
                   for i in range(len(u)) for j in range(i + 1, len(u))]
        prefs = iter(judge_pairs(judge, matches, cache, progress, desc="judging pairs of answers"))
        by_answer = []
        for u in distinct:
            wins = {a: 0.0 for a in u}
            for i in range(len(u)):
                for j in range(i + 1, len(u)):
                    p = next(prefs)
                    wins[u[i]] += p
                    wins[u[j]] += 1 - p
            by_answer.append({a: w / max(len(u) - 1, 1) for a, w in wins.items()})
    return [[scores[a] for a in answers] for scores, answers in zip(by_answer, completions)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def read_prompts(path: str) -> list:
    """Prompts from a ``.txt`` file (one per line) or JSONL / JSON rows with a ``prompt`` field (a string or
    a list of chat messages)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    if p.suffix.lower() == ".txt":
        prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for where, row in iter_rows(path):
            if isinstance(row, Exception):
                raise row
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not (isinstance(prompt, str) and prompt) and not isinstance(prompt, list):
                raise DataError(f"{where}: field 'prompt' must be a non-empty string or a list of messages")
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def make_pairs(model: str, prompts: str, reward: str, output: str, num_samples: int = 4, temperature: float = 1.0,
               seed: int = 42, max_new_tokens: int = 64, trust_remote_code: bool = False,
               allow_pickle_weights: bool = False, progress: bool = True) -> int:
    """Sample ``num_samples`` answers per prompt of the file ``prompts`` from ``model``, score them with
    ``reward`` (``module:function`` or a built-in task name), write the pairs to ``output``; return their
    number."""
    if num_samples < 2:
        raise ConfigError("make-pairs needs --num-samples ≥ 2 to have two answers to compare")
    if temperature <= 0:
        raise ConfigError("make-pairs samples: --temperature must be > 0")
    try:
        reward_fn = load_reward(reward)
    except ValueError as e:
        raise ConfigError(f"--reward: {e}") from None
    texts = read_prompts(prompts)
    tokenizer = load_tokenizer(model, trust_remote_code)
    policy = load_model(model, trust_remote_code, allow_pickle_weights)
    drawn = sample(policy, tokenizer, texts, num_samples, temperature, seed, max_new_tokens, progress=progress)
    scores = []
    for prompt, answers in zip(texts, drawn.completions):
        row = []
        for a in answers:
            try:
                row.append(float(reward_fn(prompt, a)))
            except Exception as e:  # the user's function failed: say where, not a traceback
                raise ConfigError(f"--reward {reward} failed on prompt {prompt!r}, answer {a!r}: "
                                  f"{type(e).__name__}: {e}") from None
        scores.append(row)
    rows = pair_rows(texts, drawn.completions, scores, seed)
    write_jsonl(Path(output), rows)
    return len(rows)
