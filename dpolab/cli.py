"""The command line: parse → config → call the Python API. Flags come from the config's fields.

A user's mistake (settings, files, data) prints one paragraph and exits with status 2, no traceback.
Anything else is a bug: one paragraph saying so and where to report it, exit status 1; with DPOLAB_DEBUG=1
the traceback is printed as well (the tests set it, so a real programming error stays visible there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback

from dpolab.config import Config, field_type
from dpolab.errors import DpolabError, Interrupted

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
EVAL_FIELDS = ["model", "ref_model", "data", "loss", "loss_weights", "beta", "label_smoothing", "reference_free",
               "unpair", "use_weighting", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef",
               "batch_size", "max_length", "max_prompt_length", "skip_invalid", "ignore_columns", "bf16", "logits_chunk",
               "layout", "row_tokens", "attn_implementation", "trust_remote_code", "allow_pickle_weights"]


def add_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """One flag per config field, its help from the field's docstring; unset flags stay None."""
    for name in names:
        f = FIELDS[name]
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
            parser.add_argument(flag, dest=name, default=None, metavar=meta,
                                help=f"{help_text} (default: {f.default})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpolab", description="Direct preference optimisation, exact and lean.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy (no arguments: the embedded default)")
    t.add_argument("--config", metavar="FILE", help="YAML file of settings (keys as the flags, with underscores)")
    add_flags(t, list(FIELDS))

    e = sub.add_parser("eval", help="mean metrics of a model against a reference on a dataset")
    add_flags(e, EVAL_FIELDS + extra_loss_params())
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    m = sub.add_parser("make-pairs", help="sample answers from a model, score them with a reward function, "
                                          "and pair a better answer with a worse one (on-policy preference data)")
    m.add_argument("--model", required=True, help="the model to sample from (folder or hub name)")
    m.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or .txt with one prompt per line")
    m.add_argument("--reward", required=True, help="module:function taking (prompt, completion) → float, "
                                                    "or a built-in task name")
    m.add_argument("--output", required=True, help="JSONL file to write (prompt, chosen, rejected, scores)")
    m.add_argument("--num-samples", type=int, default=4, help="answers sampled per prompt (default: 4)")
    m.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-new-tokens", type=int, default=64)
    m.add_argument("--trust-remote-code", action="store_true")

    k = sub.add_parser("task-eval", help="task reward (sampled and greedy) and KL of a model against its "
                                         "reference on a task's held-out prompts")
    k.add_argument("--model", required=True)
    k.add_argument("--ref-model", help="default: the reference recorded in a dpolab final/ folder")
    k.add_argument("--task", required=True, help="built-in task name or module:function")
    k.add_argument("--num-prompts", type=int, default=200)
    k.add_argument("--num-samples", type=int, default=4)
    k.add_argument("--max-new-tokens", type=int, default=64)
    k.add_argument("--seed", type=int, default=0)
    add_flags(k, ["layout"])
    k.add_argument("--json", action="store_true")

    s = sub.add_parser("score", help="the implicit reward β·log(π/π_ref) of one response")
    s.add_argument("--model", required=True)
    s.add_argument("--ref-model", help="default: the reference recorded in a dpolab final/ folder")
    s.add_argument("--prompt", required=True)
    s.add_argument("--response", required=True)
    s.add_argument("--beta", type=float, help="default: the β a dpolab final/ folder records, else 0.1")
    s.add_argument("--trust-remote-code", action="store_true")
    add_flags(s, ["layout", "allow_pickle_weights"])
    s.add_argument("--json", action="store_true", help="print reward and log-probs as JSON")

    m = sub.add_parser("merge", help="fold a LoRA adapter (e.g. a LoRA run's final/) into its base weights")
    m.add_argument("--adapter", required=True, metavar="DIR", help="a PEFT adapter folder (adapter_config.json)")
    m.add_argument("--output", required=True, metavar="DIR", help="where to write the merged Hugging Face model")
    m.add_argument("--trust-remote-code", action="store_true")
    add_flags(m, ["allow_pickle_weights"])
    return p


def extra_loss_params() -> list[str]:
    """Config fields that some loss declares as a hyper-parameter (for `dpolab eval`)."""
    from dpolab.losses import LOSSES

    names = {p for loss in LOSSES.values() for p in loss.params}
    return sorted(n for n in names if n in FIELDS and n not in EVAL_FIELDS)


def given(args: argparse.Namespace, names) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import dpolab

    if args.command == "train":
        from dpolab.config import load_config

        config = load_config(args.config, given(args, FIELDS))
        summary = dpolab.train(config)
        ev = summary.get("eval") or {}
        if "task_reward_after" in summary or ev:
            from dpolab.task_eval import format_table

            print(format_table(summary))
        print(f"done: {summary['steps']} steps in {summary['train_runtime_seconds']:.1f}s; output in "
              f"{config.output_dir}" + (f"; held-out reward accuracy {ev['eval/rewards/accuracies']:.3f}"
                                        if "eval/rewards/accuracies" in ev else "")
              + (f", margin {ev['eval/rewards/margins']:.4f}" if ev else ""))
        return 0
    if args.command == "eval":
        values = given(args, EVAL_FIELDS + extra_loss_params())
        for required in ("model", "data"):
            if required not in values:
                raise DpolabError(f"dpolab eval needs --{required}")
        result = dpolab.evaluate(**values)
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k:28s} {v:.6f}")
        return 0
    if args.command == "make-pairs":
        from dpolab.pairs import make_pairs

        n = make_pairs(args.model, args.prompts, args.reward, args.output, args.num_samples, args.temperature,
                       args.seed, args.max_new_tokens, args.trust_remote_code)
        print(f"wrote {n} pairs to {args.output}")
        return 0
    if args.command == "task-eval":
        from dpolab.task_eval import evaluate_task

        result = evaluate_task(args.model, args.task, args.ref_model, args.num_prompts, args.num_samples,
                               args.seed, args.max_new_tokens, **given(args, ["layout"]))
        if args.json:
            print(json.dumps(result))
        else:
            from dpolab.task_eval import format_table

            print(format_table(result))
        return 0
    if args.command == "score":
        result = dpolab.score(args.model, args.prompt, args.response, ref_model=args.ref_model, beta=args.beta,
                              trust_remote_code=args.trust_remote_code,
                              **given(args, ["layout", "allow_pickle_weights"]))
        print(json.dumps(result) if args.json else f"{result['reward']:.6f}")
        return 0
    if args.command == "merge":
        from dpolab.adapters import merge

        path = merge(args.adapter, args.output, args.trust_remote_code, bool(args.allow_pickle_weights))
        print(f"merged model in {path}")
        return 0
    return 2


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
