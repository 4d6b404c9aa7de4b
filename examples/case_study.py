"""The stages every case study of docs/real-model.md runs, for a task given as a :class:`Study`.

1. On-policy pairs: ``make-pairs`` samples answers to the training prompts from the model itself and pairs
   a right answer (the task's judge gives 1) with a wrong one.
2. Held-out pairs, for the reward accuracy: on the held-out prompts, the right answer against a wrong one.
3. ``dpolab.train`` (DPO by default, full fine-tuning) on the pairs, with the task report: the task reward
   (sampled at temperature 1, and greedy) and KL on the held-out prompts, before and after.
4. A few held-out answers, greedy, before and after.

Each stage's output is kept under ``--out`` and reused when the script runs again (delete it to start over).
The results go to ``OUT/study.json`` and ``OUT/study.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dpolab
from dpolab.evaluation.generate import sample
from dpolab.evaluation.pairs import make_pairs, write_jsonl
from dpolab.models.loading import load_model, load_tokenizer

DEFAULT_MODEL = Path.home() / ".cache" / "dpolab" / "smollm2-135m-instruct" / "model"


@dataclass
class Study:
    module: str  # the task's module, e.g. "examples.capitals": it has reward() and task()
    train_prompts: list  # chat prompts to sample the pairs on
    heldout_pairs: list[dict]  # {prompt, chosen, rejected} (answer texts) on held-out prompts
    shown: list[tuple[dict, list]]  # (what to print beside the answers, the held-out prompt)
    max_new_tokens: int


def arguments(description: str, **defaults) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the model (a folder or a .gguf file)")
    p.add_argument("--out", default=defaults["out"], help="where every stage's output goes")
    p.add_argument("--train-prompts", type=int, default=defaults["train_prompts"],
                   help="training prompts to sample pairs on")
    p.add_argument("--samples", type=int, default=defaults["samples"], help="answers sampled per training prompt")
    p.add_argument("--temperature", type=float, default=defaults["temperature"],
                   help="sampling temperature of the pairs")
    p.add_argument("--heldout", type=int, default=defaults["heldout"], help="held-out prompts measured")
    p.add_argument("--epochs", type=int, default=defaults["epochs"])
    p.add_argument("--learning-rate", type=float, default=defaults["learning_rate"])
    p.add_argument("--beta", type=float, default=defaults["beta"])
    p.add_argument("--loss", default=defaults.get("loss", "sigmoid"),
                   help="dpolab's --loss: a name, or names joined by commas (each weighted 1), e.g. sigmoid,sft")
    return p.parse_args()


def stage_pairs(args, study: Study, out: Path) -> Path:
    pairs = out / "pairs.jsonl"
    if not pairs.is_file():
        prompts = out / "train_prompts.jsonl"
        write_jsonl(prompts, [{"prompt": p} for p in study.train_prompts[:args.train_prompts]])
        make_pairs(args.model, str(prompts), f"{study.module}:reward", str(pairs), num_samples=args.samples,
                   temperature=args.temperature, max_new_tokens=study.max_new_tokens)
    return pairs


def stage_heldout_pairs(args, study: Study, out: Path) -> Path:
    path = out / "heldout_pairs.jsonl"
    write_jsonl(path, [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}]}
                       for row in study.heldout_pairs[:args.heldout]])
    return path


def stage_train(args, study: Study, out: Path, pairs: Path, heldout_pairs: Path) -> dict:
    run = out / "run"
    if (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text())
    return dpolab.train(model=args.model, data=str(pairs), eval_data=str(heldout_pairs), output_dir=str(run),
                        overwrite=True, loss=args.loss, beta=args.beta, learning_rate=args.learning_rate,
                        epochs=args.epochs, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant",
                        save_every=0, max_length=128, max_prompt_length=112, task=f"{study.module}:task",
                        task_prompts=args.heldout, task_samples=4, task_max_new_tokens=study.max_new_tokens)


def examples_before_after(args, study: Study, out: Path) -> list[dict]:
    prompts = [p for _, p in study.shown]
    tok = load_tokenizer(args.model)
    answers = {}
    for name, path in (("before", args.model), ("after", str(out / "run" / "final"))):
        answers[name] = sample(load_model(path), tok, prompts, 1, 0.0,
                               max_new_tokens=study.max_new_tokens).completions
    return [{**what, "before": b[0], "after": a[0]}
            for (what, _), b, a in zip(study.shown, answers["before"], answers["after"])]


def plot(result: dict, path: Path) -> None:
    import matplotlib  # deferred: only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above
    names = ("task_reward", "task_reward_greedy", "reward_accuracy")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (when, colour) in enumerate((("before", "tab:gray"), ("after", "tab:blue"))):
        ax.bar([i + 0.4 * k for i in range(len(names))], [result[n][k] or 0.0 for n in names], 0.4,
               label=when, color=colour)
    ax.set_xticks([i + 0.2 for i in range(len(names))], ["sampled reward (T=1)", "greedy reward",
                                                          "reward accuracy"])
    ax.set_ylim(0, 1.2)
    ax.set_title(f"held-out, before and after DPO (KL {result['kl']:.2f} nats)")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args, study: Study) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pairs = stage_pairs(args, study, out)
    num_pairs = sum(1 for _ in pairs.open())
    summary = stage_train(args, study, out, pairs, stage_heldout_pairs(args, study, out))
    shown = examples_before_after(args, study, out)
    ev, ev0 = summary.get("eval", {}), summary.get("eval_before", {})
    result = {"pairs": num_pairs, "train_prompts": args.train_prompts, "heldout_prompts": args.heldout,
              "task_reward": [summary["task_reward_before"], summary["task_reward_after"]],
              "task_reward_greedy": [summary["task_reward_greedy_before"], summary["task_reward_greedy_after"]],
              "reward_accuracy": [ev0.get("eval/rewards/accuracies"), ev.get("eval/rewards/accuracies")],
              "kl": summary["kl"], "examples": shown, "seconds": round(time.time() - start, 1),
              "settings": vars(args)}
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "study.json")
    plot(result, out / "study.png")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2, ensure_ascii=False))
    return result
