"""How long a newcomer waits: `make demo` on a fresh clone, set-up and run timed apart.

    python3 bench/demo_time.py            # clones this checkout's HEAD into a temporary folder

Prints the seconds of the set-up (`make install`: venv, CPU torch, dpolab and its dependencies), of the run
(`make demo`, i.e. `dpolab train` with no arguments, on an installed venv), their sum, and the held-out
before/after numbers the run printed. Targets (issue 3): the whole under 5 minutes, the run under 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t, r.stdout


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dpolab-demo-") as tmp:
        clone = Path(tmp) / "dpolab"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        setup, _ = timed(["make", "install"], clone)
        run, out = timed(["make", "demo"], clone)
        summary = json.loads((clone / "runs" / "demo" / "summary.json").read_text())
    print(out.strip().split("done:")[0].rstrip().split("\n", 1)[-1] if "held-out" in out else out[-1500:])
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"set-up (make install)    {setup:7.1f} s")
    print(f"run (make demo)          {run:7.1f} s   (training alone: {summary['train_runtime_seconds']:.1f} s)")
    print(f"total                    {setup + run:7.1f} s   target ≤ 300 s; run target ≤ 180 s")


if __name__ == "__main__":
    main()
