"""dpolab: Direct Preference Optimization and the direct alignment family.

The Python API mirrors the command line::

    import dpolab
    summary = dpolab.train(model="my-model", data="prefs.jsonl", output_dir="runs/x", beta=0.1)
    metrics = dpolab.evaluate("runs/x/final", "heldout.jsonl", ref_model="my-model")
    dpolab.score("runs/x/final", "Question?", "Answer.", ref_model="my-model")["reward"]
"""

from __future__ import annotations

__version__ = "0.1.0"

from dpolab.config import Config, load_config
from dpolab.errors import ConfigError, DataError, DpolabError
from dpolab.evaluation import evaluate, score


def train(config: Config | str | None = None, **settings) -> dict:
    """Train as the config says: a :class:`Config`, a YAML path, or nothing (the embedded default),
    with ``settings`` (config field names) on top. Returns the run's summary."""
    from dpolab.training import train as _train

    if isinstance(config, Config):
        config = load_config(None, {**config.to_dict(), **settings}) if settings else config.validate()
    else:
        config = load_config(config, settings)
    return _train(config)


__all__ = ["Config", "ConfigError", "DataError", "DpolabError", "evaluate", "load_config", "score", "train"]
