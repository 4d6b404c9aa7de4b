"""``dpolab compare``: the judged win rate of a model against its reference, at one or more temperatures.

Both models answer the same held-out prompts (a task's, or a file's) with the same seed, one answer each
per temperature (0 is greedy); a judge (:mod:`dpolab.evaluation.judges`) says which of each pair is better,
and :mod:`dpolab.evaluation.winrate` turns the judgments into the win rate with ties as half, its 95 %
interval and the length-controlled win rate. Judgments are cached in ``OUTPUT/judgments.jsonl``, so a
rerun (or one that a failed judge stopped) judges nothing twice; the results are ``OUTPUT/compare.json``
and, with several temperatures, ``OUTPUT/win_rate.png``, the DPO paper's Fig. 3 for one model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpolab.errors import ConfigError
from dpolab.evaluation.generate import sample
from dpolab.evaluation.judges import JudgmentCache, Settings, judge_pairs, load_judge
from dpolab.evaluation.pairs import read_prompts
from dpolab.evaluation.winrate import win_stats
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.models.record import default_reference
from dpolab.tasks import load_task


def judged_win_rate(policy, reference, tokenizer, prompts, judge, cache: JudgmentCache, temperature: float,
                    seed: int, max_new_tokens: int, progress: bool = True) -> dict:
    """One answer of each model per prompt at ``temperature`` (same seed), judged: the win rate of
    ``policy`` against ``reference`` (:func:`dpolab.evaluation.winrate.win_stats`), with each model's
    ``mean_length`` (tokens) and ``eos_rate``."""
    eos = tokenizer.eos_token_id
    mine = sample(policy, tokenizer, prompts, 1, temperature, seed, max_new_tokens)
    theirs = sample(reference, tokenizer, prompts, 1, temperature, seed, max_new_tokens)
    pairs = [(p, a[0], b[0]) for p, a, b in zip(prompts, mine.completions, theirs.completions)]
    prefs = judge_pairs(judge, pairs, cache, progress, desc=f"judging T={temperature:g}")

    def lengths(s):  # answer tokens without the EOS, and whether it ended with one
        return [(len(t[0]) - (t[0][-1:] == [eos]), t[0][-1:] == [eos]) for t in s.token_ids]

    ours, refs = lengths(mine), lengths(theirs)
    stats = win_stats(prefs, [a[0] - b[0] for a, b in zip(ours, refs)])
    n = max(len(prompts), 1)
    side = {name: {"mean_length": sum(x[0] for x in v) / n, "eos_rate": sum(x[1] for x in v) / n}
            for name, v in (("model", ours), ("reference", refs))}
    return {"temperature": temperature, **stats, **side}


def plot_win_rate(rows: list[dict], path: Path, title: str) -> None:
    """Win rate (with its 95 % interval) and length-controlled win rate against temperature."""
    from matplotlib.figure import Figure  # deferred: matplotlib is a heavy import

    fig = Figure(figsize=(6, 3.6), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)
    ax = fig.add_subplot()
    ts = [r["temperature"] for r in rows]
    lo = [r["win_rate"] - r["win_rate_ci"][0] for r in rows]
    hi = [r["win_rate_ci"][1] - r["win_rate"] for r in rows]
    ax.errorbar(ts, [r["win_rate"] for r in rows], yerr=[lo, hi], fmt="o-", capsize=4, label="win rate (95 % CI)")
    ax.plot(ts, [r["lc_win_rate"] for r in rows], "s--", label="length-controlled")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set(xlabel="sampling temperature", ylabel="win rate against the reference", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, pil_kwargs={"compress_level": 1})


def write_json(path: Path, value: dict) -> None:
    """Atomically: a temporary file beside ``path``, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def compare(model: str, ref_model: str | None = None, task: str | None = None, prompts: str | None = None,
            judge: str | None = None, num_prompts: int = 200, temperatures: list[float] | None = None,
            seed: int = 42, max_new_tokens: int = 64, output: str | None = None, judge_model: str = "default",
            judge_api_key_env: str = "OPENAI_API_KEY", judge_timeout: float = 30.0,
            trust_remote_code: bool = False, allow_pickle_weights: bool = False) -> dict:
    """The judged win rate of ``model`` against ``ref_model`` (default: the reference a dpolab ``final/``
    records) on ``num_prompts`` held-out prompts of ``task`` or of the file ``prompts``, per temperature
    (default 0 and 1); the judge defaults to the task's reward. Writes ``compare.json`` (and
    ``win_rate.png``) under ``output`` (default runs/compare); returns the JSON."""
    if (task is None) == (prompts is None):
        raise ConfigError("compare needs exactly one of --task (its held-out prompts) and --prompts (a file)")
    temperatures = temperatures if temperatures is not None else [0.0, 1.0]
    if num_prompts < 1 or max_new_tokens < 1 or not temperatures or min(temperatures) < 0:
        raise ConfigError("compare needs --num-prompts and --max-new-tokens ≥ 1 and --temperatures ≥ 0")
    if judge is None and task is None:
        raise ConfigError("compare --prompts needs --judge (with --task the judge defaults to the task's reward)")
    ref_name = ref_model or default_reference(model)
    if ref_name is None:
        raise ConfigError(f"compare needs --ref-model: {model} is not a dpolab final/ folder that records its "
                          "reference")
    try:
        texts = list(load_task(task).eval_prompts) if task is not None else read_prompts(prompts)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None
    spec = judge or f"task:{task}"  # the task's own reward, whatever form its name takes
    judge_obj = load_judge(spec, Settings(judge_model, judge_api_key_env, judge_timeout, trust_remote_code))
    out = Path(output or "runs/compare")
    cache = JudgmentCache(out / "judgments.jsonl")
    tokenizer = load_tokenizer(model, trust_remote_code)
    policy = load_model(model, trust_remote_code, allow_pickle_weights).eval()
    reference = load_model(ref_name, trust_remote_code, allow_pickle_weights).eval()
    rows = [judged_win_rate(policy, reference, tokenizer, texts[:num_prompts], judge_obj, cache, t, seed,
                            max_new_tokens) for t in temperatures]
    result = {"model": model, "reference": ref_name, "judge": judge_obj.identity, "seed": seed,
              **(rows[0] if len(rows) == 1 else {}), "by_temperature": rows}
    write_json(out / "compare.json", result)
    if len(rows) > 1:
        plot_win_rate(rows, out / "win_rate.png", f"{Path(model).name} against {Path(ref_name).name}")
    return result


def format_comparison(result: dict) -> str:
    """One line per temperature: the win rate, its interval, the counts, LC, and the answers' lengths."""
    lines = [f"judge {result['judge']}; model {result['model']} against {result['reference']}",
             f"{'T':>4s} {'win rate':>9s} {'95% CI':>15s} {'wins':>6s} {'ties':>6s} {'losses':>6s} {'LC':>6s} "
             f"{'len M/R':>11s} {'EOS M/R':>11s}"]
    for r in result["by_temperature"]:
        lo, hi = r["win_rate_ci"]
        lines.append(f"{r['temperature']:4g} {r['win_rate']:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>15s} {r['wins']:6.3f} "
                     f"{r['ties']:6.3f} {r['losses']:6.3f} {r['lc_win_rate']:6.3f} "
                     f"{r['model']['mean_length']:5.1f}/{r['reference']['mean_length']:<5.1f} "
                     f"{r['model']['eos_rate']:5.2f}/{r['reference']['eos_rate']:<5.2f}")
    return "\n".join(lines)
