"""``dpolab sweep``: train a grid of settings and draw the reward–KL frontier (the DPO paper's Fig. 2).

The grid is the product of the listed ``beta``, ``loss`` and ``learning_rate`` values; every other setting
is the base config's. Each configuration is a normal run directory, ``OUT/runs/<name>/``, trained by
:func:`dpolab.training.loop.train` with the task report (task reward sampled and greedy, KL(π ‖ π_ref) from
samples, the judged win rate against the reference) and held-out reward accuracy. All of them train from
one reference pass: the reference log-probs are precomputed into ``OUT/ref_cache``, keyed by the reference
and the tokenised data (never by β, loss or learning rate), so the first configuration computes them and
the others read them.

Resumable: a configuration with a ``summary.json`` is finished and kept; one that was stopped resumes from
its newest checkpoint (or starts again when it has none). With ``overwrite`` every configuration is trained
afresh (the reference cache is kept: it is keyed by content). The results are ``OUT/frontier.json``
(``points``, one per configuration), ``OUT/frontier.png`` (task reward against KL, one mark each) and the
table :func:`format_frontier` prints.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

from tqdm.auto import tqdm

from dpolab.config import Config
from dpolab.evaluation.compare import write_json
from dpolab.training import loop, resume

log = logging.getLogger("dpolab")
POINT_KEYS = ("task_reward", "task_reward_greedy", "kl", "reward_accuracy", "win_rate")


def grid_configs(base: Config, grid: dict[str, list]) -> list[tuple[str, Config]]:
    """(name, config) per point of the grid; a loss written ``a+b`` is the combined loss ``a,b``."""
    values = {k: grid.get(k) or [getattr(base, k)] for k in ("beta", "loss", "learning_rate")}
    out = []
    for beta, loss, lr in itertools.product(values["beta"], values["loss"], values["learning_rate"]):
        loss = str(loss).replace("+", ",")
        name = f"beta={beta:g}_loss={loss.replace(',', '+')}_lr={lr:g}" if beta is not None else \
            f"loss={loss.replace(',', '+')}_lr={lr:g}"
        out.append((name, dataclasses.replace(base, beta=beta, loss=loss, learning_rate=lr).validate()))
    return out  # every configuration checked before the first one trains


def run_config(config: Config, out: Path) -> dict:
    """Train one configuration in ``out`` (kept if finished, resumed if stopped), sharing ``ref_cache``."""
    summary, config = resume.continue_run(config, out)
    return summary if summary is not None else loop.train(config.validate())


def point(config: Config, summary: dict) -> dict:
    """The frontier's entry for one configuration."""
    values = {"task_reward": summary.get("task_reward_after"), "task_reward_greedy": summary.get(
        "task_reward_greedy_after"), "kl": summary.get("kl"), "reward_accuracy": summary.get("eval_reward_accuracy"),
        "win_rate": summary.get("win_rate")}
    return {"beta": config.beta, "loss": config.loss, "learning_rate": config.learning_rate,
            **{k: v for k, v in values.items() if v is not None}}


def sweep(config: Config, grid: dict[str, list]) -> dict:
    """Train every configuration of ``grid`` over ``config`` under ``config.output_dir``; write and return
    the frontier."""
    out = Path(config.output_dir)
    configs = grid_configs(config, grid)
    points, reference = [], {}
    for name, c in tqdm(configs, desc="sweep", unit="config", disable=not config.progress):
        log.info("sweep: %s", name)
        summary = run_config(dataclasses.replace(c, ref_cache_dir=config.ref_cache_dir or str(out / "ref_cache")),
                             out / "runs" / name)
        points.append({"name": name, **point(c, summary)})
        if "task_reward_before" in summary:  # the reference itself: the frontier's point at KL 0
            reference = {"task_reward": summary["task_reward_before"], "kl": 0.0,
                         "task_reward_greedy": summary["task_reward_greedy_before"]}
    frontier = {"task": config.task, "reference": reference, "points": points}
    write_json(out / "frontier.json", frontier)
    if any("kl" in p and "task_reward" in p for p in points):
        plot_frontier(points, reference, out / "frontier.png")
    return frontier


def plot_frontier(points: list[dict], reference: dict, path: Path) -> None:
    """Task reward (sampled, and greedy) against KL(π ‖ π_ref), one mark per configuration, labelled, with
    the reference's own rewards at KL 0."""
    from matplotlib.figure import Figure  # deferred: matplotlib is a heavy import

    fig = Figure(figsize=(6, 4), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.91, bottom=0.13)
    ax = fig.add_subplot()
    drawn = [p for p in points if "kl" in p and "task_reward" in p]
    ax.plot([p["kl"] for p in drawn], [p["task_reward"] for p in drawn], "o", label="task reward, sampled (T = 1)")
    ax.plot([p["kl"] for p in drawn], [p.get("task_reward_greedy", float("nan")) for p in drawn], "^",
            label="task reward, greedy")
    if reference:
        ax.plot([0, 0], [reference["task_reward"], reference["task_reward_greedy"]], "kx", label="reference")
    for p in drawn:
        ax.annotate(f"β={p['beta']:g}" if len({q['loss'] for q in drawn}) == 1 else f"{p['loss']} β={p['beta']:g}",
                    (p["kl"], p["task_reward"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="KL(π ‖ π_ref), nats (from samples)", ylabel="held-out task reward",
           title="Reward–KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, pil_kwargs={"compress_level": 1})


def format_frontier(frontier: dict) -> str:
    """One row per configuration."""
    head = f"{'beta':>6s} {'loss':>14s} {'lr':>8s} {'reward':>7s} {'greedy':>7s} {'KL':>7s} {'acc':>6s} {'win':>6s}"
    lines = [head]
    for p in frontier["points"]:
        cells = [f"{p.get(k, float('nan')):7.3f}" for k in ("task_reward", "task_reward_greedy", "kl")]
        lines.append(f"{p['beta'] if p['beta'] is not None else float('nan'):6g} {p['loss']:>14s} "
                     f"{p['learning_rate']:8.1e} {' '.join(cells)} {p.get('reward_accuracy', float('nan')):6.3f} "
                     f"{p.get('win_rate', float('nan')):6.3f}")
    return "\n".join(lines)
