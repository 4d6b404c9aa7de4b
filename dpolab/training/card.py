"""The model card of a run, ``final/README.md``, in the Hugging Face format: YAML front matter (``base_model``,
``library_name``, ``tags``, ``datasets`` where known) and then the loss with its equation, the settings, the
data (digest and row counts), the held-out metrics before and after (task reward, win rate and KL where
measured), the diagnostics raised, and the command that reproduces the run.

It takes plain values (the run's settings, their defaults, the summary), never the config."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from dpolab.losses import LOSSES

SETTINGS = ("learning_rate", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm",
            "batch_size", "grad_accum", "epochs", "max_steps", "max_length", "max_prompt_length", "bf16",
            "precompute_ref", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit",
            "layout", "seed")
MEASURED = (("task reward, sampled (T = 1)", "task_reward_before", "task_reward_after"),
            ("task reward, greedy", "task_reward_greedy_before", "task_reward_greedy_after"))


def reproduce_command(values: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``dpolab train`` with a flag for every setting that differs from its default."""
    parts = ["dpolab", "train"]
    for name, default in defaults.items():
        value = values.get(name)
        if value == default or name in ("overwrite", "resume", "progress"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            parts += [flag, ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def hub_name(source: str | None) -> str | None:
    """A hub dataset name (``name`` or ``name:split``) as the card's ``datasets`` lists it; None for a file."""
    if not source or Path(source).exists() or Path(source).suffix in (".jsonl", ".json", ".csv", ".parquet"):
        return None
    return source.split(":")[0]


def render_card(values: dict[str, Any], defaults: dict[str, Any], summary: dict, lora: bool) -> str:
    """The card's text, from the run's settings ``values``, their ``defaults`` and the run's ``summary``."""
    names = [n.strip() for n in values["loss"].split(",") if n.strip()]
    front = {"base_model": values["model"], "library_name": "peft" if lora else "transformers",
             "tags": ["dpolab", "dpo", "preference-optimization", *names, *(["lora"] if lora else [])]}
    datasets = sorted({d for d in (hub_name(values.get("data")), hub_name(values.get("eval_data"))) if d})
    if datasets:
        front["datasets"] = datasets
    weights = values.get("loss_weights") or [1.0] * len(names)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {Path(values['output_dir']).name}", "",
             f"Trained from `{values['model']}` with dpolab by direct preference "
             f"optimisation: {summary.get('steps', 0)} optimizer steps, β = {values['beta']:g}.", "",
             "## Objective", "", "loss = " + " + ".join(f"{w:g}·mean({n})" for n, w in zip(names, weights)), ""]
    for n in names:
        equation = " ".join(LOSSES[n].doc.split("\n\n")[0].split()).replace("``", "`")  # reST to Markdown
        lines += [f"- `{n}`: {equation}" + (f" ({LOSSES[n].paper})" if LOSSES[n].paper else "")]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {values.get(k)} |" for k in ("loss", "beta", *SETTINGS) if k in values]
    data = summary.get("data", {})
    held = f"`{values['eval_data']}`" if values.get("eval_data") else f"a {values.get('eval_split')} split of it"
    lines += ["", "## Data", "", f"- training: `{values.get('data')}`, {data.get('train_examples', '?')} examples",
              f"- held out: {held}, {data.get('eval_examples', '?')} examples",
              f"- digest of the tokenised training rows: `{data.get('digest', '?')}`"]
    lines += ["", *_results(summary), "", "## Diagnostics", ""]
    diagnostics = summary.get("diagnostics", [])
    lines += [f"- `{d.get('name')}` at step {d.get('step')}: {d.get('message')} {d.get('remedy', '')}".rstrip()
              for d in diagnostics] or ["None raised."]
    lines += ["", "## Reproduce", "", "```bash", reproduce_command(values, defaults), "```", ""]
    return "\n".join(lines)


def _results(summary: dict) -> list[str]:
    """The held-out metrics before and after training, then what a task or judge measured."""
    before, after = summary.get("eval_before") or {}, summary.get("eval") or {}
    lines = ["## Results", "", "| held out | before | after |", "|---|---|---|"]
    lines += [f"| `{k}` | {before.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in after.items()]
    lines += [f"| {label} | {summary[b]:.4f} | {summary[a]:.4f} |" for label, b, a in MEASURED
              if a in summary and b in summary]
    if "win_rate" in summary:  # judged against the reference, which ties itself: 0.5 before
        lines.append(f"| win rate against the reference | 0.5 | {summary['win_rate']:.4f} |")
    if "kl" in summary:
        lines.append(f"| KL(policy ‖ reference), nats | 0 | {summary['kl']:.4f} |")
    return lines if len(lines) > 4 else ["## Results", "", "No held-out data was measured."]
