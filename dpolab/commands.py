"""The commands and the settings each takes: one declaration per command, from which the command line's flags,
help and defaults, the Python API's checks and the "does nothing here" refusal all come (SPEC §6).

Every setting is a field of the one flat :class:`dpolab.config.Config`; a command takes a subset. A value for
a field the command does not take is refused in one line naming the commands that do, on the command line
(no such flag), in a YAML ``--config`` file, and as a keyword of the Python API. :func:`load_config` turns a
command's settings (defaults < YAML file < flags or keywords) into a validated :class:`Config`.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from dpolab import recipes
from dpolab.config import NOT_TRAINING, Config, _fields
from dpolab.embedded import ITERATE_RECIPE, RECIPE
from dpolab.errors import ConfigError
from dpolab.objective import OBJECTIVE_FIELDS


class Command(NamedTuple):
    help: str
    fields: tuple[str, ...]  # the config fields it takes, in --help order
    required: tuple[str, ...] = ()
    json: bool = False  # has --json (print one JSON object)
    grid: tuple[str, ...] = ()  # fields that take a comma-separated list of values, one run each (sweep)


MODEL = ("model", "trust_remote_code", "allow_pickle_weights")
RUNTIME = ("bf16", "logits_chunk", "layout", "row_tokens", "attn_implementation")
DATA = ("data", "max_length", "max_prompt_length", "seed", "skip_invalid", "ignore_columns", "template_mismatch")
SAMPLING = ("num_samples", "temperature", "seed", "max_new_tokens")
# iterate makes each round's data, and trains full weights (a round's policy is the next one's model to sample)
NOT_ITERATE = ("data", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_on_save", "load_in_4bit")
ITERATE = ("rounds", "prompts", "prompts_per_round", "num_samples", "temperature", "max_new_tokens", "pairs",
           "ref_update", "keep_pairs")

COMMANDS = {
    "train": Command("train a policy (no arguments: the embedded default)",
                     tuple(f for f in _fields() if f not in NOT_TRAINING)),
    "eval": Command("mean metrics of a model against a reference on a dataset",
                    (*MODEL, "ref_model", *DATA, "batch_size", *OBJECTIVE_FIELDS, *RUNTIME, "progress"),
                    required=("model", "data"), json=True),
    "make-pairs": Command("sample answers from a model, score them with a reward function, and pair a better "
                          "answer with a worse one (on-policy preference data)",
                          (*MODEL, "prompts", "reward", "output", *SAMPLING, "progress"),
                          required=("model", "prompts", "reward", "output")),
    "task-eval": Command("task reward (sampled and greedy) and KL of a model against its reference on a task's "
                         "held-out prompts", (*MODEL, "ref_model", "task", "num_prompts", "num_samples", "seed",
                                             "max_new_tokens", "layout", "row_tokens", "progress"),
                         required=("model", "task"), json=True),
    "score": Command("the implicit reward β·log(π/π_ref) of one response",
                     (*MODEL, "ref_model", "prompt", "response", "beta", "layout"),
                     required=("model", "prompt", "response"), json=True),
    "merge": Command("fold a LoRA adapter (e.g. a LoRA run's final/) into its base weights",
                     ("adapter", "output", "trust_remote_code", "allow_pickle_weights"), required=("adapter", "output")),
    "compare": Command("judged win rate of a model against its reference on held-out prompts, per sampling "
                       "temperature (compare.json, win_rate.png and the judgments cache in --output)",
                       (*MODEL, "ref_model", "task", "prompts", "judge", "num_prompts", "temperatures", "seed",
                        "max_new_tokens", "output", "judge_model", "judge_api_key_env", "judge_timeout"),
                       required=("model",), json=True),
    "sweep": Command("train a grid of settings (comma-separated --beta, --loss, --learning-rate; a combined loss "
                     "as sigmoid+sft) from one reference pass, and write the reward-KL frontier",
                     tuple(f for f in _fields() if f not in NOT_TRAINING), json=True,
                     grid=("beta", "loss", "learning_rate")),
    "iterate": Command("online and iterative DPO: rounds of sampling from the current policy, judging, pairing "
                       "and training, with per-round metrics (no arguments: the embedded default)",
                       (*ITERATE, *(f for f in _fields() if f not in (*NOT_TRAINING, *NOT_ITERATE))), json=True),
    "inspect": Command("a pre-flight audit of a dataset (duplicates, contradictions, identical pairs, truncation, "
                       "length bias, tokenisation; with --model the reference's log-probs) and advice on the loss, "
                       "β and learning rate", ("data", "model", "max_length", "max_prompt_length", "skip_invalid",
                                              "ignore_columns", "batch_size", "output", "alarm_ref_token_logp",
                                              "layout", "trust_remote_code", "allow_pickle_weights", "progress"),
                       required=("data",), json=True),
}


def refuse_foreign(command: str, name: str, value: Any, where: str) -> None:
    """A setting the command does not take, set to anything but its default, is refused."""
    f = _fields()[name]
    if name in COMMANDS[command].fields or value == f.default:
        return
    takers = [c for c, spec in COMMANDS.items() if name in spec.fields]
    raise ConfigError(f"{where}: {name} does nothing in dpolab {command} (it is a setting of dpolab "
                      f"{', '.join(takers)}); remove it")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None, command: str = "train") -> Config:
    """Defaults < YAML file < overrides (flags or keyword arguments) for ``command``; unknown keys and keys
    the command does not take are errors."""
    values: dict[str, Any] = {}
    fields = _fields()
    raw = {str(k).replace("-", "_"): v for k, v in (read_yaml(path) if path is not None else {}).items()}
    if recipes.is_recipe(raw, fields):  # a TRL / alignment-handbook recipe: its keys become dpolab's
        raw, mapped, ignored = recipes.translate(raw, fields, path, given=set(overrides or ()))
        recipes.announce(path, mapped, ignored)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}{_suggest(key, recipes.KEYS)}")
        values[key] = coerce(key, value, path)
        refuse_foreign(command, key, values[key], path)
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}{_suggest(key)}")
        values[key] = coerce(key, value, "argument")
        refuse_foreign(command, key, values[key], "argument")
    if command == "train" and values.get("model") is None and values.get("data") is None:
        _add_embedded_recipe(values, RECIPE)
    if command == "iterate" and values.get("model") is None:  # the bundled model: its recipes, iterate's first
        _add_embedded_recipe(values, ITERATE_RECIPE, RECIPE)
    return Config(**values).validate()


def read_yaml(path: str) -> dict:
    """A YAML config file as a mapping, read with ``safe_load``; a bad file is one paragraph."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        if isinstance(e, yaml.constructor.ConstructorError):  # e.g. !!python/object/apply:os.system
            raise ConfigError(f"{path}{line}: a YAML tag that would build a Python object or run code "
                              f"({getattr(e, 'problem', e)}); config files are read with yaml.safe_load, which "
                              "accepts plain values only") from None
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return raw


def _add_embedded_recipe(values: dict[str, Any], *recipes: Path) -> None:
    """With no model and no data, the embedded default runs with its own recipe beneath the user's keys."""
    for recipe in recipes:
        if recipe.is_file():
            for key, value in (yaml.safe_load(recipe.read_text()) or {}).items():
                values.setdefault(key, coerce(key, value, str(recipe)))


def _suggest(key: str, more: tuple[str, ...] = ()) -> str:
    close = difflib.get_close_matches(key, [*_fields(), *more], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a config field: int, float, str, bool or list[float]."""
    hint = typing.get_type_hints(Config)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional else hint
    return base, optional


def coerce(name: str, value: Any, where: str) -> Any:
    """Check (and, from strings, parse) one value for field ``name``; ``where`` names its source."""
    base, optional = field_type(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError
            return [float(v) for v in items]
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where}: {name} expects {_type_name(base)}, got {value!r}")


def _type_name(base: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        base, "comma-separated numbers")
