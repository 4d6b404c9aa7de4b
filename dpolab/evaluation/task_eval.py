"""Held-out quality with a task: the task reward of sampled and greedy answers, and KL(π ‖ π_ref).

The sampled mean (temperature 1, several answers per prompt) is the expected reward the RLHF objective
maximises; greedy decoding is what a user usually sees. KL(π ‖ π_ref) is estimated from the same sampled
answers y ~ π as the mean of log π(y|x) − log π_ref(y|x), each sum taken by the training log-prob function
(plain-text tokenisation, EOS counted when the answer ended).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dpolab.data.batch import DEFAULT_LAYOUT, DEFAULT_ROW_TOKENS, Collate
from dpolab.data.records import Example
from dpolab.errors import ConfigError
from dpolab.evaluation.generate import prompt_ids, task_scores
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.models.logps import SequenceLogps
from dpolab.models.record import default_reference
from dpolab.tasks import load_task


@torch.no_grad()
def sampled_kl(policy, reference, tokenizer, prompts, samples, batch_size: int = 64,
               collate: Collate | None = None, progress: bool = False) -> float:
    """Monte-Carlo KL(π ‖ π_ref) from answers sampled from π (``samples`` from :func:`dpolab.evaluation.generate.sample`):
    the mean over answers of log π(y|x) − log π_ref(y|x), on the very tokens that were sampled (EOS included
    when the answer ended), never on a re-tokenisation of their text. ``collate``: the batch layout of the
    log-probs (default: packed); ``progress``: a bar over the answers scored."""
    collate = collate or Collate(tokenizer.pad_token_id)
    examples = []
    for ids, answers in zip(prompt_ids(tokenizer, prompts), samples.token_ids):
        examples += [Example(len(examples), ids, [answer]) for answer in answers if answer]
    if not examples:
        return 0.0
    device = next(policy.parameters()).device
    pi, ref = SequenceLogps(policy), SequenceLogps(reference)
    total = 0.0
    for i in tqdm(range(0, len(examples), batch_size), desc="KL of the sampled answers", disable=not progress,
                  leave=False):
        batch = collate(examples[i: i + batch_size]).to(device)
        inputs = batch.model_inputs()
        total += (pi(**inputs) - ref(**inputs)).sum().item()
    return total / len(examples)


def task_report(policy, reference, tokenizer, task, num_prompts: int, num_samples: int, seed: int,
                max_new_tokens: int, collate: Collate | None = None, progress: bool = False) -> dict[str, float]:
    """``task_reward`` (sampled, temperature 1), ``task_reward_greedy`` and ``kl`` on held-out prompts;
    ``collate`` makes the batches of the KL's log-probs."""
    prompts = list(task.eval_prompts[:num_prompts])
    was_training = policy.training
    policy.eval()
    scores = task_scores(policy, tokenizer, task.reward, prompts, num_samples=num_samples, temperature=1.0,
                         seed=seed, max_new_tokens=max_new_tokens, progress=progress)
    kl = 0.0 if reference is policy else sampled_kl(policy, reference, tokenizer, prompts, scores.samples,
                                                    collate=collate, progress=progress)
    policy.train(was_training)
    answers = [ids for per_prompt in scores.samples.token_ids for ids in per_prompt]
    length = sum(map(len, answers)) / max(len(answers), 1)  # mean sampled answer, tokens (length_growth alarm)
    return {"task_reward": scores.sampled_reward, "task_reward_greedy": scores.greedy_reward, "kl": kl,
            "task_length": length}


def before_after(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The summary keys of a run with a task."""
    return {"task_reward_before": before["task_reward"], "task_reward_after": after["task_reward"],
            "task_reward_greedy_before": before["task_reward_greedy"],
            "task_reward_greedy_after": after["task_reward_greedy"], "kl": after["kl"],
            "task_length_before": before["task_length"], "task_length_after": after["task_length"]}


def format_table(summary: dict) -> str:
    """The before/after table printed at the end of a run."""
    rows = [("task reward, sampled (T = 1)", "task_reward_before", "task_reward_after"),
            ("task reward, greedy", "task_reward_greedy_before", "task_reward_greedy_after")]
    lines = [f"{'held-out':32s} {'reference':>10s} {'trained':>10s}"]
    for label, b, a in rows:
        if b in summary:
            lines.append(f"{label:32s} {summary[b]:10.3f} {summary[a]:10.3f}")
    ev, before = summary.get("eval") or {}, summary.get("eval_before") or {}
    for label, key in (("reward accuracy", "eval/rewards/accuracies"), ("reward margin", "eval/rewards/margins")):
        if key in ev:
            lines.append(f"{label:32s} {before.get(key, float('nan')):10.3f} {ev[key]:10.3f}")
    if "kl" in summary:
        lines.append(f"{'KL(policy ‖ reference), nats':32s} {0.0:10.3f} {summary['kl']:10.3f}")
    if "win_rate" in summary:  # the reference against itself: 0.5 by definition
        lo, hi = summary["win_rate_ci"]
        lines.append(f"{'win rate vs reference (T = 1)':32s} {0.5:10.3f} {summary['win_rate']:10.3f}   "
                     f"95% [{lo:.3f}, {hi:.3f}], judged by {summary['judge']}")
    return "\n".join(lines)


def evaluate_task(model: str, task: str, ref_model: str | None = None, num_prompts: int = 200,
                  num_samples: int = 4, seed: int = 42, max_new_tokens: int = 64, layout: str = DEFAULT_LAYOUT,
                  row_tokens: int = DEFAULT_ROW_TOKENS, trust_remote_code: bool = False,
                  allow_pickle_weights: bool = False, progress: bool = True) -> dict[str, float]:
    """Task reward of ``ref_model`` (before) and ``model`` (after), and KL(model ‖ ref_model), on the task's
    held-out prompts; the reference defaults to the one a dpolab ``final/`` folder records."""
    try:
        task_obj = load_task(task)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None
    ref_name = ref_model or default_reference(model)
    if ref_name is None:
        raise ConfigError("task-eval needs --ref-model (or a dpolab final/ folder that records its reference)")
    tokenizer = load_tokenizer(model, trust_remote_code)
    policy = load_model(model, trust_remote_code, allow_pickle_weights)
    reference = load_model(ref_name, trust_remote_code, allow_pickle_weights)
    args = dict(num_prompts=num_prompts, num_samples=num_samples, seed=seed, max_new_tokens=max_new_tokens,
                collate=Collate(tokenizer.pad_token_id, layout, row_tokens), progress=progress)
    before = task_report(reference, reference, tokenizer, task_obj, **args)
    after = task_report(policy, reference, tokenizer, task_obj, **args)
    return before_after(before, after)
