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
