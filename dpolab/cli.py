"""The command line: each subcommand's flags come from the config fields it declares in
:data:`dpolab.commands.COMMANDS`; the given flags go to the command's Python function.

A user's mistake (settings, files, data) prints one paragraph and exits with status 2, no traceback.
Anything else is a bug: one paragraph saying so and where to report it, exit status 1; with DPOLAB_DEBUG=1
the traceback is printed as well (the tests set it, so a real programming error stays visible there).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from dpolab.commands import COMMANDS, coerce, field_type, load_config
from dpolab.config import _fields
from dpolab.errors import DpolabError, Interrupted
from dpolab.evaluation.compare import compare, format_comparison
from dpolab.evaluation.heldout import evaluate, score
from dpolab.evaluation.inspect import format_report, inspect_data
from dpolab.evaluation.pairs import make_pairs
from dpolab.evaluation.task_eval import evaluate_task, format_table
from dpolab.models.adapters import merge
from dpolab.training.iterate import format_rounds, iterate
from dpolab.training.loop import train
from dpolab.training.sweep import format_frontier, sweep


def add_flags(parser: argparse.ArgumentParser, names, required=()) -> None:
    """One flag per config field, its help from the field's docstring; unset flags stay None."""
    fields = _fields()
    for name in names:
        f = fields[name]
        base, _ = field_type(name)
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.metadata.get("choices"):
            help_text += f" One of: {', '.join(f.metadata['choices'])}."
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {f.default})")
        else:
            meta = {int: "N", float: "X", str: "STR"}.get(base, "X,Y")
            parser.add_argument(flag, dest=name, default=None, metavar=meta, required=name in required,
                                help=help_text if name in required else f"{help_text} (default: {f.default})")


def parser() -> argparse.ArgumentParser:
    """Every subcommand's flags from its declaration in :data:`dpolab.commands.COMMANDS`."""
    p = argparse.ArgumentParser(prog="dpolab", description="Direct preference optimisation, exact and lean.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        s = sub.add_parser(name, help=command.help)
        if name == "train":
            s.add_argument("--config", metavar="FILE", help="YAML file of settings (keys as the flags, with "
                                                             "underscores), or a TRL / alignment-handbook recipe")
        add_flags(s, command.fields, command.required)
        if command.json:
            s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def run_train(args: argparse.Namespace, values: dict) -> int:
    config = load_config(args.config, values)
    summary = train(config)
    ev = summary.get("eval") or {}
    if "task_reward_after" in summary or ev:
        print(format_table(summary))
    print(f"done: {summary['steps']} steps in {summary['train_runtime_seconds']:.1f}s; output in "
          f"{config.output_dir}" + (f"; held-out reward accuracy {ev['eval/rewards/accuracies']:.3f}"
                                    if "eval/rewards/accuracies" in ev else "")
          + (f", margin {ev['eval/rewards/margins']:.4f}" if ev else ""))
    return 0


def run_eval(args: argparse.Namespace, values: dict) -> int:
    result = evaluate(**values)
    print(json.dumps(result) if args.json else "\n".join(f"{k:28s} {v:.6f}" for k, v in result.items()))
    return 0


def run_make_pairs(args: argparse.Namespace, values: dict) -> int:
    print(f"wrote {make_pairs(**values)} pairs to {values['output']}")
    return 0


def run_task_eval(args: argparse.Namespace, values: dict) -> int:
    result = evaluate_task(**values)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_score(args: argparse.Namespace, values: dict) -> int:
    result = score(**values)
    print(json.dumps(result) if args.json else f"{result['reward']:.6f}")
    return 0


def run_merge(args: argparse.Namespace, values: dict) -> int:
    print(f"merged model in {merge(**values)}")
    return 0


def run_compare(args: argparse.Namespace, values: dict) -> int:
    result = compare(**values)
    print(json.dumps(result) if args.json else format_comparison(result))
    return 0


def run_sweep(args: argparse.Namespace, values: dict) -> int:
    grid = {k: values.pop(k) for k in COMMANDS["sweep"].grid if k in values}
    frontier = sweep(load_config(None, values), grid)
    print(json.dumps(frontier) if args.json else format_frontier(frontier))


def run_iterate(args: argparse.Namespace, values: dict) -> int:
    summary = iterate(load_config(None, values, command="iterate"))
    print(json.dumps(summary) if args.json else format_rounds(summary) + f"\nlast policy in {summary['final']}")
    return 0


def run_inspect(args: argparse.Namespace, values: dict) -> int:
    report = inspect_data(**values)
    print(json.dumps({k: v for k, v in report.items() if k != "lengths"}) if args.json else format_report(report))
    return 0


HANDLERS = {"train": run_train, "eval": run_eval, "make-pairs": run_make_pairs, "task-eval": run_task_eval,
            "score": run_score, "merge": run_merge, "compare": run_compare, "sweep": run_sweep,
            "iterate": run_iterate, "inspect": run_inspect}


def run(argv: list[str] | None = None) -> int:
    """Parse, then hand the given flags (parsed to their fields' types) to the command's Python function,
    whose defaults are the config's (a test pins that)."""
    args = parser().parse_args(argv)
    flags = {k: getattr(args, k) for k in COMMANDS[args.command].fields if getattr(args, k, None) is not None}
    grid = COMMANDS[args.command].grid  # a comma-separated list of values, each parsed as the field's type
    values = {k: [coerce(k, x, "--" + k.replace("_", "-")) for x in v.split(",")] if k in grid
              else coerce(k, v, "--" + k.replace("_", "-")) for k, v in flags.items()}
    return HANDLERS[args.command](args, values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="dpolab: %(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return run(argv)
    except Interrupted as e:
        print(f"dpolab: {e}", file=sys.stderr)
        return e.exit_code
    except DpolabError as e:
        print(f"dpolab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpolab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's mistake
        if os.environ.get("DPOLAB_DEBUG") == "1":
            raise
        print(internal_error(e), file=sys.stderr)
        return 1


BUG_REPORTS = "the dpolab issue tracker"


def internal_error(e: BaseException) -> str:
    """The one paragraph an unexpected exception gets instead of a traceback."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" in {os.path.basename(where.filename)}:{where.lineno} ({where.name})" if where else ""
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return (f"dpolab: internal error: {type(e).__name__}{': ' + text if text else ''}{at}. This is a bug in dpolab "
            f"or a library it uses, not a problem with your settings or data; please report it to {BUG_REPORTS} "
            "with the command you ran. Run it again with DPOLAB_DEBUG=1 in the environment to see the full "
            "traceback.")


if __name__ == "__main__":
    sys.exit(main())
