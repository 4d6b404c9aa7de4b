"""Online and iterative DPO on the embedded default, timed: issue 17's acceptance run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/iterate_time.py [--out runs/bench-iterate] [--docs] [-- FLAGS...]

Runs ``dpolab iterate`` with no arguments (the bundled model, the addition task's 3,600 preference prompts,
its program reward as judge, the defaults of ``dpolab/assets/default/iterate.yaml``) in a fresh output folder,
plus any FLAGS given after ``--`` (how the experiments of docs/iterate.md were run), and prints the per-round
table, the wall time, the load average (other work on the machine slows it) and whether the last round
reaches the targets: held-out sampled task reward ≥ 0.80 and greedy ≥ 0.92 within 15 minutes. With --docs,
copies rounds.png and summary.json to docs/iterate.png and docs/iterate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench-iterate", help="output folder (relative: to the repository root)")
    p.add_argument("--docs", action="store_true", help="copy rounds.png and summary.json into docs/")
    p.add_argument("flags", nargs="*", help="more dpolab iterate flags, after --")
    args = p.parse_args()
    out = ROOT / args.out  # the command runs in ROOT with args.out as given, so summary.json's paths are relative
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "dpolab.cli", "iterate", "--output-dir", args.out, "--no-progress", *args.flags]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    print(" ".join(["dpolab iterate", *args.flags]))
    print(r.stdout.strip())
    sampled, greedy = summary["task_reward_after"], summary["task_reward_greedy_after"]
    print(f"\nwall time {wall:.1f} s (target < 900 s); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"targets: sampled {sampled:.3f} ≥ 0.80: {sampled >= 0.80}; greedy {greedy:.3f} ≥ 0.92: {greedy >= 0.92}; "
          f"time: {wall < 900}")
    if args.docs:
        shutil.copy(out / "rounds.png", ROOT / "docs" / "iterate.png")
        (ROOT / "docs" / "iterate.json").write_text(json.dumps(summary | {"wall_seconds": round(wall, 1)},
                                                               indent=2) + "\n")


if __name__ == "__main__":
    main()
