"""PNG charts of a run's curves, drawn from ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path

from dpolab.metrics import read_metrics

CHARTS = {  # file name → (title, metric names)
    "loss.png": ("Loss", ["loss", "eval/loss"]),
    "reward_accuracy.png": ("Reward accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
    "margins.png": ("Reward margin r_c − r_r", ["rewards/margins", "eval/rewards/margins"]),
    "rewards.png": ("Implicit rewards β·log(π/π_ref)", ["rewards/chosen", "rewards/rejected",
                                                        "eval/rewards/chosen", "eval/rewards/rejected"]),
    "logps.png": ("Policy log-probs", ["logps/chosen", "logps/rejected", "eval/logps/chosen",
                                       "eval/logps/rejected"]),
    "learning_rate.png": ("Learning rate", ["learning_rate"]),
}


def plot_metrics(metrics_file: Path, out_dir: Path) -> list[Path]:
    """Draw every chart whose metrics appear in ``metrics_file``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file) if metrics_file.exists() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in CHARTS.items():
        series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for k, points in series.items():
            xs, ys = zip(*points)
            style = "o--" if k.startswith("eval/") else "-"
            ax.plot(xs, ys, style, label=k, markersize=4, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written
