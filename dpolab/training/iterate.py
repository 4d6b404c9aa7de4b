"""``dpolab iterate``: online and iterative DPO. Each round samples answers from the current policy, judges
them, pairs a better answer with a worse one, trains on the pairs, and measures the new policy.

A round takes the whole prompt set (iterative DPO, as in Tülu 3 and Llama 3) or, with ``prompts_per_round``,
the next batch of a seeded shuffle (online DPO, Guo et al. 2024). Any judge of
:mod:`dpolab.evaluation.judges` scores the answers (a reward model relabels on the fly, as D2PO does). The
reference becomes the previous round's policy (``ref_update=round``) or stays the initial model (``fixed``; or
``ref_model`` where given);
each round trains on its own pairs or, with ``keep_pairs``, on every round's so far, from a fresh optimizer
and schedule. On disk, under ``OUT``::

    rounds/<n>/samples.jsonl    the answers sampled from the round's policy (seed + n)
    rounds/<n>/judgments.jsonl  the judge's cache;  rounds/<n>/pairs.jsonl  the round's pairs
    rounds/<n>/train.jsonl      with keep_pairs: the pairs it trains on;  rounds/<n>/run/  a normal run
    rounds/<n>/win_judgments.jsonl  the judgments of its win rate against the initial model
    rounds/<n>/round.json       the round's metrics, written last: the round is done (round 0: the initial model)
    settings.json               the settings (a resume must match them; only the number of rounds may change)
    summary.json, rounds.png, final/   the per-round metrics, their plot, the last policy

Resumable at every stage: a round with ``round.json`` is kept; a finished stage's file is read, never redone
(samples, judgments, pairs), and a stopped training run resumes from its newest checkpoint, so a killed
``iterate`` continued with ``resume`` ends with the weights an uninterrupted one gives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

from dpolab import builder, embedded
from dpolab.config import Config
from dpolab.data.records import split_records
from dpolab.errors import ConfigError
from dpolab.evaluation.compare import judged_win_rate, write_json
from dpolab.evaluation.generate import sample
from dpolab.evaluation.judges import JudgmentCache, Settings, load_judge
from dpolab.evaluation.pairs import all_pair_rows, judge_scores, pair_rows, read_prompts, write_jsonl
from dpolab.evaluation.plots import plot_rounds
from dpolab.evaluation.task_eval import sampled_kl, task_report
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.training import loop, resume
from dpolab.training.rundir import check_output_dir, prepare_output_dir

log = logging.getLogger("dpolab")
MAY_CHANGE = {"rounds", "output_dir", "resume", "overwrite", "progress"}  # a resume may change these only


@dataclasses.dataclass
class Setup:
    """What every round needs, built once."""

    config: Config
    out: Path
    initial: str  # the initial policy (the KL and the win rate are measured against it)
    prompts: list  # the prompts sampled from
    eval_prompts: list  # the held-out prompts of the per-round metrics
    task: object  # a dpolab.tasks.Task, or None
    judge: object
    tokenizer: object
    device: torch.device


def prepare(config: Config) -> Setup:
    """Refuse what cannot run before any model is loaded; then the output folder and the tokenizer."""
    if config.num_samples < 2:
        raise ConfigError(f"iterate needs --num-samples ≥ 2 to have two answers to compare, got {config.num_samples}")
    if config.temperature <= 0:
        raise ConfigError("iterate samples from the policy: --temperature must be > 0")
    if config.task is None and (config.prompts is None or config.judge is None):
        raise ConfigError("iterate needs --task (its prompts and reward), or --prompts with --judge")
    task = loop.load_task_or_refuse(config.task)
    judge = load_judge(config.judge or f"task:{config.task}", Settings(
        config.judge_model, config.judge_api_key_env, config.judge_timeout, config.trust_remote_code))
    prompts = read_prompts(config.prompts) if config.prompts else list(task.train_prompts)
    if config.prompts_per_round > len(prompts):
        raise ConfigError(f"prompts_per_round {config.prompts_per_round} is more than the {len(prompts)} prompts "
                          "there are (0 takes them all every round)")
    eval_prompts = list(task.eval_prompts if task is not None else prompts)[:config.task_prompts]
    out = Path(config.output_dir)
    check_output_dir(out, config.resume, config.overwrite)
    check_resume(out / "settings.json", config)
    prepare_output_dir(out, config.overwrite)
    write_json(out / "settings.json", config.to_dict())
    initial = config.model or str(embedded.MODEL)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Setup(config, out, initial, prompts, eval_prompts, task, judge,
                 load_tokenizer(initial, config.trust_remote_code), device)


def check_resume(saved: Path, config: Config) -> None:
    """A resume continues the same rounds: every setting but the number of rounds and run control must match."""
    if not (config.resume and saved.is_file()):
        return
    before = json.loads(saved.read_text())
    changed = [f"{k} ({before[k]!r} → {v!r})" for k, v in config.to_dict().items()
               if k not in MAY_CHANGE and k in before and before[k] != v]
    if changed:
        raise ConfigError(f"cannot resume: {', '.join(changed)} differ from {saved}, so the rounds would not "
                          "continue the same way. Resume with the saved values (only --rounds may change), or "
                          "start afresh (another --output-dir, or --overwrite)")


def round_prompts(s: Setup, n: int) -> list:
    """Round ``n``'s prompts: all of them, or the ``n``-th batch of a seeded shuffle (cyclic)."""
    per = s.config.prompts_per_round
    if per == 0:
        return list(s.prompts)
    order = list(range(len(s.prompts)))
    random.Random(s.config.seed).shuffle(order)
    return [s.prompts[order[(i + (n - 1) * per) % len(order)]] for i in range(per)]


def load(s: Setup, name: str):
    return load_model(name, s.config.trust_remote_code, s.config.allow_pickle_weights,
                      attn_implementation=s.config.attn_implementation).to(s.device)


def sample_stage(s: Setup, folder: Path, policy: str, prompts: list, n: int) -> list[list[str]]:
    """The round's answers, from ``samples.jsonl`` when they were drawn already."""
    path = folder / "samples.jsonl"
    if path.is_file():
        return [row["completions"] for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())]
    c = s.config
    drawn = sample(load(s, policy), s.tokenizer, prompts, c.num_samples, c.temperature, c.seed + n, c.max_new_tokens,
                   progress=c.progress)
    write_jsonl(path, [{"prompt": p, "completions": a} for p, a in zip(prompts, drawn.completions)])
    return drawn.completions


def pair_stage(s: Setup, folder: Path, prompts: list, answers: list[list[str]], n: int) -> list[dict]:
    """The round's pairs, from ``pairs.jsonl`` when they were made already (judged through the round's cache).
    An empty answer cannot be a training row (SPEC §4): it is left out, so it is neither chosen nor rejected."""
    path = folder / "pairs.jsonl"
    if not path.is_file():
        usable = [(p, kept) for p, a in zip(prompts, answers) if len(kept := [x for x in a if x.strip()]) > 1]
        prompts, answers = [p for p, _ in usable], [a for _, a in usable]
        scores = judge_scores(s.judge, prompts, answers, JudgmentCache(folder / "judgments.jsonl"), s.config.progress)
        rows = pair_rows(prompts, answers, scores, s.config.seed + n) if s.config.pairs == "best-worst" else \
            all_pair_rows(prompts, answers, scores)
        write_jsonl(path, rows)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_stage(s: Setup, folder: Path, policy: str, reference: str, data: Path, count: int) -> str:
    """Train the round's policy on ``count`` pairs in ``data``; return its ``final/`` (or ``policy`` unchanged
    when too few pairs are left to make one batch). A round with fewer pairs than ``batch_size`` trains on them
    as one batch."""
    c = s.config
    kept = len(split_records(list(range(count)), c.eval_split, c.seed)[0])  # the builder's own split
    batch = min(c.batch_size, kept // c.grad_accum * c.grad_accum)
    if batch == 0:
        log.info("iterate: %d pairs are too few to train on: the policy is kept", count)
        return policy
    run = dataclasses.replace(c, model=policy, ref_model=reference, data=str(data), batch_size=batch, task=None,
                              judge=None, ref_cache_dir=c.ref_cache_dir or str(s.out / "ref_cache"))
    summary, run = resume.continue_run(run, folder / "run")
    if summary is None:
        loop.train(run.validate())
    return str(folder / "run" / "final")


def evaluate(s: Setup, policy: str, cache: JudgmentCache) -> dict:
    """Task reward (sampled, greedy), KL and the judged win rate against the initial model, on held-out prompts
    (without a task: KL and win rate on the first ``task_prompts`` of ``prompts``)."""
    c = s.config
    model, initial = load(s, policy), load(s, s.initial)
    collate = builder.collate_for(c, s.tokenizer)
    if s.task is not None:
        out = task_report(model, initial, s.tokenizer, s.task, c.task_prompts, c.task_samples, c.seed,
                          c.task_max_new_tokens, collate, c.progress)
    else:
        drawn = sample(model, s.tokenizer, s.eval_prompts, c.task_samples, 1.0, c.seed, c.task_max_new_tokens)
        out = {"kl": sampled_kl(model, initial, s.tokenizer, s.eval_prompts, drawn, collate=collate)}
    win = judged_win_rate(model, initial, s.tokenizer, s.eval_prompts, s.judge, cache, 1.0, c.seed,
                          c.task_max_new_tokens, progress=False)
    return out | {k: win[k] for k in ("win_rate", "win_rate_ci")}


def run_round(s: Setup, n: int, policy: str, reference: str) -> dict:
    """Round ``n``: sample from ``policy``, judge, pair, train against ``reference``, evaluate."""
    folder = s.out / "rounds" / str(n)
    seconds, t = {}, time.perf_counter()
    prompts = round_prompts(s, n)
    answers = sample_stage(s, folder, policy, prompts, n)
    seconds["sampling"], t = time.perf_counter() - t, time.perf_counter()
    rows = pair_stage(s, folder, prompts, answers, n)
    seconds["judging"], t = time.perf_counter() - t, time.perf_counter()
    data = folder / "pairs.jsonl"
    if s.config.keep_pairs and n > 1:
        data = folder / "train.jsonl"
        write_jsonl(data, [json.loads(x) for k in range(1, n + 1)
                           for x in (s.out / "rounds" / str(k) / "pairs.jsonl").read_text().splitlines()])
    count = len(data.read_text(encoding="utf-8").splitlines())
    trained = train_stage(s, folder, policy, reference, data, count)
    seconds["training"], t = time.perf_counter() - t, time.perf_counter()
    metrics = evaluate(s, trained, JudgmentCache(folder / "win_judgments.jsonl"))
    seconds["evaluation"] = time.perf_counter() - t
    paired = {json.dumps(r["prompt"]) for r in rows}
    result = {"round": n, "prompts": len(prompts), "pairs": len(rows), "train_pairs": count,
              "prompts_without_pair": len(prompts) - len(paired), **metrics, "policy": trained, "seconds": seconds}
    write_json(folder / "round.json", result)
    return result


def iterate(config: Config) -> dict:
    """Run ``config.rounds`` rounds under ``config.output_dir`` (continuing the finished ones with ``resume``);
    write and return the summary."""
    s = prepare(config)
    start = s.out / "rounds" / "0" / "round.json"
    if not start.is_file():  # the initial model, measured once: round 0
        model = load(s, s.initial)
        report = {"kl": 0.0} if s.task is None else task_report(
            model, model, s.tokenizer, s.task, config.task_prompts, config.task_samples, config.seed,
            config.task_max_new_tokens, progress=config.progress)
        write_json(start, {"round": 0, **report, "win_rate": 0.5, "policy": s.initial})
    rounds = [json.loads(start.read_text())]
    for n in range(1, config.rounds + 1):
        done = s.out / "rounds" / str(n) / "round.json"
        if done.is_file():
            rounds.append(json.loads(done.read_text()))
            continue
        log.info("iterate: round %d of %d", n, config.rounds)
        policy = rounds[-1]["policy"]
        reference = (config.ref_model or s.initial) if config.ref_update == "fixed" else policy
        rounds.append(run_round(s, n, policy, reference))
        write_summary(s, rounds, final=False)
    return write_summary(s, rounds, final=True)


def write_summary(s: Setup, rounds: list[dict], final: bool) -> dict:
    """``summary.json`` and ``rounds.png``; at the end also ``final/``, the last policy."""
    first, last = rounds[0], rounds[-1]
    summary = {"task": s.config.task, "judge": s.judge.identity, "rounds": rounds, "settings": s.config.to_dict()}
    if "task_reward" in first:
        summary |= {"task_reward_before": first["task_reward"],
                    "task_reward_greedy_before": first["task_reward_greedy"], "task_reward_after": last["task_reward"],
                    "task_reward_greedy_after": last["task_reward_greedy"]}
    summary |= {"kl": last["kl"], "win_rate": last["win_rate"]}
    if final:
        tmp, dest = s.out / ".final.tmp", s.out / "final"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last["policy"], tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        summary["final"] = str(dest)
    write_json(s.out / "summary.json", summary)
    plot_rounds(rounds, s.out / "rounds.png")
    return summary


def format_rounds(summary: dict) -> str:
    """One row per round (round 0: the initial model)."""
    lines = [f"{'round':>5s} {'sampled':>8s} {'greedy':>7s} {'KL':>6s} {'win':>6s} {'pairs':>6s} {'no pair':>8s} "
             f"{'seconds':>8s}"]
    for r in summary["rounds"]:
        cells = [f"{r.get(k, float('nan')):{w}.3f}" for k, w in (("task_reward", 8), ("task_reward_greedy", 7),
                                                                   ("kl", 6), ("win_rate", 6))]
        secs = sum(r.get("seconds", {}).values())
        lines.append(f"{r['round']:5d} {' '.join(cells)} {r.get('pairs', 0):6d} {r.get('prompts_without_pair', 0):8d} "
                     f"{secs:8.1f}")
    return "\n".join(lines)
