"""The reward–KL frontier of the embedded default, timed: issue 15's acceptance run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sweep_time.py [--out runs/bench-sweep]

Runs ``dpolab sweep --beta 0.1,0.3,1,2,4 --epochs 1 --task addition`` (the embedded default's model, data
and recipe: learning rate 2e-4, batch 32, 500 held-out prompts) in a fresh output folder, and prints its
wall time, the frontier table, the load average (other work on the machine slows it), and whether the KL
falls as β rises. Target: under 10 minutes. Copies frontier.png to docs/frontier.png with --docs.
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
BETAS = "0.1,0.3,1,2,4"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-sweep"))
    p.add_argument("--docs", action="store_true", help="copy frontier.png and frontier.json into docs/")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "dpolab.cli", "sweep", "--beta", BETAS, "--epochs", "1", "--task", "addition",
           "--output-dir", str(out), "--no-progress"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    frontier = json.loads((out / "frontier.json").read_text())
    kls = [pt["kl"] for pt in frontier["points"]]
    print(r.stdout.strip())
    print(f"\nwall time {wall:.1f} s (target < 600 s); load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    print(f"KL falls as β rises: {all(a > b for a, b in zip(kls, kls[1:]))} ({', '.join(f'{k:.3f}' for k in kls)})")
    if args.docs:
        shutil.copy(out / "frontier.png", ROOT / "docs" / "frontier.png")
        (ROOT / "docs" / "frontier.json").write_text(json.dumps(frontier | {"wall_seconds": round(wall, 1)},
                                                                indent=2) + "\n")


if __name__ == "__main__":
    main()
