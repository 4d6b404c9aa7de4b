"""PNG charts of a run's curves, drawn from ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dpolab.evaluation.metrics import read_metrics

CHARTS = {  # file name → (title, metric names)
    "loss.png": ("Loss", ["loss", "eval/loss"]),
    "reward_accuracy.png": ("Reward accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
    "margins.png": ("Reward margin r_c − r_r", ["rewards/margins", "eval/rewards/margins"]),
    "rewards.png": ("Rewards (β·log(π/π_ref), or the loss's own)", ["rewards/chosen", "rewards/rejected",
                                                        "eval/rewards/chosen", "eval/rewards/rejected"]),
    "logps.png": ("Policy log-probs", ["logps/chosen", "logps/rejected", "eval/logps/chosen",
                                       "eval/logps/rejected"]),
    "ref_logps.png": ("Reference log-probs", ["logps/ref_chosen", "logps/ref_rejected"]),
    "learning_rate.png": ("Learning rate", ["learning_rate"]),
}


def plot_metrics(metrics_file: Path, out_dir: Path, alarms: Sequence[dict] = ()) -> list[Path]:
    """Draw every chart whose metrics appear in ``metrics_file``; return the files written. Each alarm
    (``{name, step, ...}``, dpolab.training.diagnostics) is a labelled vertical line on every chart.

    Figures are made without pyplot (no global state, nothing to close; savefig picks Agg for .png), with
    fixed margins instead of tight_layout (so each chart is drawn once), and written with fast PNG compression."""
    from matplotlib.figure import Figure  # deferred: matplotlib is a heavy import, needed at the end of a run

    rows = read_metrics(metrics_file) if metrics_file.exists() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in CHARTS.items():
        series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig = Figure(figsize=(6, 3.6), dpi=100)
        fig.subplots_adjust(left=0.12, right=0.97, top=0.91, bottom=0.14)
        ax = fig.add_subplot()
        for k, points in series.items():
            xs, ys = zip(*points)
            style = "o--" if k.startswith("eval/") else "-"
            ax.plot(xs, ys, style, label=k, markersize=4, linewidth=1.4)
        for alarm in alarms:
            ax.axvline(alarm["step"], color="crimson", linestyle=":", linewidth=1.2)
            ax.annotate(alarm["name"], (alarm["step"], 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", color="crimson", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best" if len(rows) < 200 else "upper right")  # "best" scans every point
        fig.savefig(out_dir / name, pil_kwargs={"compress_level": 1})
        written.append(out_dir / name)
    return written


def plot_rounds(rounds: list[dict], path: Path) -> None:
    """``dpolab iterate``'s metrics over rounds (round 0: the initial model): task reward sampled and greedy and
    the win rate against the initial model on the left axis, KL to the initial model on the right."""
    from matplotlib.figure import Figure  # deferred: matplotlib is a heavy import

    fig = Figure(figsize=(6, 3.6), dpi=100)
    fig.subplots_adjust(left=0.11, right=0.88, top=0.91, bottom=0.14)
    ax = fig.add_subplot()
    xs = [r["round"] for r in rounds]
    for key, label, style in (("task_reward", "task reward, sampled (T = 1)", "o-"),
                              ("task_reward_greedy", "task reward, greedy", "^-"),
                              ("win_rate", "win rate vs initial (T = 1)", "s--")):
        if all(key in r for r in rounds):
            ax.plot(xs, [r[key] for r in rounds], style, label=label, markersize=4, linewidth=1.4)
    kl = ax.twinx()
    kl.plot(xs, [r["kl"] for r in rounds], "k:", marker="x", label="KL to initial (right)", linewidth=1.2)
    kl.set_ylabel("KL(π ‖ π_initial), nats")
    ax.set(xlabel="round", ylabel="held-out", title="Online / iterative DPO, per round")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + kl.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, pil_kwargs={"compress_level": 1})
