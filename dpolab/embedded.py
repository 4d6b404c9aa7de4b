"""The embedded default: the bundled tiny model, its preference data and its task, used by
``dpolab train`` when no model and no data are given (see docs/default-task.md)."""

from pathlib import Path

ROOT = Path(__file__).parent / "assets" / "default"
MODEL = ROOT / "model"
TRAIN = ROOT / "train.jsonl"
EVAL = ROOT / "eval.jsonl"
RECIPE = ROOT / "recipe.yaml"  # the training settings the embedded default runs with
ITERATE_RECIPE = ROOT / "iterate.yaml"  # `dpolab iterate` with no arguments: these, over RECIPE
