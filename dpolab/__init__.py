"""dpolab: Direct Preference Optimization and the direct alignment family.

The Python API mirrors the command line::

    import dpolab
    summary = dpolab.train(model="my-model", data="prefs.jsonl", output_dir="runs/x", beta=0.1)
    metrics = dpolab.evaluate("runs/x/final", "heldout.jsonl", ref_model="my-model")
    dpolab.score("runs/x/final", "Question?", "Answer.", ref_model="my-model")["reward"]
"""

from __future__ import annotations

__version__ = "0.1.0"

from dpolab import commands
from dpolab.builder import check_environment
from dpolab.config import Config
from dpolab.errors import ConfigError, DataError, DpolabError
from dpolab.evaluation.heldout import evaluate, score
from dpolab.training import loop


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """The settings of a training run: defaults < YAML file < ``overrides``, with every refusal a run makes
    before loading a model (unknown keys, impossible values, QLoRA where it cannot run, ...)."""
    return check_environment(commands.load_config(path, overrides))


def train(config: Config | str | None = None, **settings) -> dict:
    """Train as the config says: a :class:`Config`, a YAML path, or nothing (the embedded default),
    with ``settings`` (config field names) on top. Returns the run's summary."""
    if isinstance(config, Config):
        config = load_config(None, {**config.to_dict(), **settings}) if settings else config.validate()
    else:
        config = load_config(config, settings)
    return loop.train(config)


__all__ = ["Config", "ConfigError", "DataError", "DpolabError", "evaluate", "load_config", "score", "train"]
