"""Case study: DPO on its own samples teaches SmolLM2-135M-Instruct to answer a capital in one word.

    make real-model && .venv/bin/python -m examples.capital_study      (from the repository root)

1. On-policy pairs: ``make-pairs`` samples answers to the training countries' questions (examples/capitals.py)
   and pairs a right one-word answer (the judge gives 1) with a wrong one (a sentence, a wrong city, a ramble).
2. Held-out pairs, for the reward accuracy: on the held-out countries, the bare capital against the sentence
   the model tends to give ("The capital of Chile is Santiago.").
3. ``dpolab train`` (DPO, full fine-tuning) on the pairs, measuring the task reward (sampled at temperature
   1 and greedy) and KL on the held-out countries before and after, with the reward accuracy.
4. A few held-out answers, greedy, before and after.

Each stage's output is kept under ``--out`` and reused when the script runs again (delete it to start over).
The results go to ``OUT/study.json``; docs/real-model.md reports one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import dpolab
from dpolab.evaluation.generate import sample
from dpolab.evaluation.pairs import make_pairs, write_jsonl
from dpolab.models.loading import load_model, load_tokenizer
from examples import capitals

DEFAULT_MODEL = Path.home() / ".cache" / "dpolab" / "smollm2-135m-instruct" / "model"


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the model (a folder or a .gguf file)")
    p.add_argument("--out", default="runs/capitals", help="where every stage's output goes")
    p.add_argument("--train-countries", type=int, default=48, help="training countries to sample pairs on")
    p.add_argument("--samples", type=int, default=6, help="answers sampled per training country")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the pairs")
    p.add_argument("--heldout", type=int, default=32, help="held-out countries measured before and after")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    return p.parse_args()


def stage_pairs(args, out: Path) -> Path:
    pairs = out / "pairs.jsonl"
    if not pairs.is_file():
        train, _ = capitals.split()
        prompts = out / "train_prompts.jsonl"
        write_jsonl(prompts, [{"prompt": capitals.prompt(c)} for c in train[:args.train_countries]])
        make_pairs(args.model, str(prompts), "examples.capitals:reward", str(pairs), num_samples=args.samples,
                   temperature=args.temperature, max_new_tokens=8)
    return pairs


def stage_heldout_pairs(args, out: Path) -> Path:
    path = out / "heldout_pairs.jsonl"
    _, heldout = capitals.split()
    write_jsonl(path, [{"prompt": capitals.prompt(c),
                        "chosen": [{"role": "assistant", "content": capitals.CAPITALS[c]}],
                        "rejected": [{"role": "assistant",
                                      "content": f"The capital of {c} is {capitals.CAPITALS[c]}."}]}
                       for c in heldout[:args.heldout]])
    return path


def stage_train(args, out: Path, pairs: Path, heldout_pairs: Path) -> dict:
    run = out / "run"
    if (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text())
    return dpolab.train(model=args.model, data=str(pairs), eval_data=str(heldout_pairs), output_dir=str(run),
                        overwrite=True, loss="sigmoid", beta=args.beta, learning_rate=args.learning_rate,
                        epochs=args.epochs, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant",
                        save_every=0, max_length=128, max_prompt_length=96, task="examples.capitals:task",
                        task_prompts=args.heldout, task_samples=4, task_max_new_tokens=8)


def examples_before_after(args, out: Path, n: int = 6) -> list[dict]:
    _, heldout = capitals.split()
    prompts = [capitals.prompt(c) for c in heldout[:n]]
    tok = load_tokenizer(args.model)
    answers = {}
    for name, path in (("before", args.model), ("after", str(out / "run" / "final"))):
        answers[name] = sample(load_model(path), tok, prompts, 1, 0.0, max_new_tokens=8).completions
    return [{"country": c, "capital": capitals.CAPITALS[c], "before": b[0], "after": a[0]}
            for c, b, a in zip(heldout, answers["before"], answers["after"])]


def main() -> None:
    args = arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pairs = stage_pairs(args, out)
    num_pairs = sum(1 for _ in pairs.open())
    summary = stage_train(args, out, pairs, stage_heldout_pairs(args, out))
    shown = examples_before_after(args, out)
    ev, ev0 = summary.get("eval", {}), summary.get("eval_before", {})
    result = {"pairs": num_pairs, "train_countries": args.train_countries, "heldout_countries": args.heldout,
              "task_reward": [summary["task_reward_before"], summary["task_reward_after"]],
              "task_reward_greedy": [summary["task_reward_greedy_before"], summary["task_reward_greedy_after"]],
              "reward_accuracy": [ev0.get("eval/rewards/accuracies"), ev.get("eval/rewards/accuracies")],
              "kl": summary["kl"], "examples": shown, "seconds": round(time.time() - start, 1),
              "settings": vars(args)}
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "study.json")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
