"""The README stays true: every `dpolab ...` command in its bash blocks and its Python example run as
written (from the repository root, in a scratch copy of the paths they write)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # make test-fast skips it; make test runs it

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("#")[0].strip()
            if cmd.startswith(("dpolab ", "accelerate launch ")):
                out.append(cmd)
    return out


def test_readme_shows_the_main_commands():
    cmds = commands()
    for sub in ("train", "eval", "score"):
        assert any(c.startswith(f"dpolab {sub} ") for c in cmds), sub
    assert "make demo" in README and "make test" in README


def test_every_readme_command_and_the_python_example_run(tmp_path):
    """Run in a scratch folder that links the repository's inputs, so runs/ lands there."""
    for name in ("dpolab", "examples", "configs"):
        os.symlink(ROOT / name, tmp_path / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for cmd in commands():
        args = shlex.split(cmd)
        args[0] = str(Path(sys.executable).parent / args[0])  # this environment's dpolab / accelerate
        r = subprocess.run([*args, *(["--no-progress"] if "train" in args else [])], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    (python,) = blocks("python")
    r = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "quick" / "final" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "runs")
