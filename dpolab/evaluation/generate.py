"""Sampling answers from a model, and scoring them with a task's reward.

Prompts are tokenised exactly as in training (:class:`dpolab.data.tokenization.Tokenizer`: plain text with the
tokenizer's special tokens, or a message list through the chat template), left-padded into batches, and
continued by ``model.generate`` (Hugging Face, with its KV cache). Sampling is pure temperature sampling:
no top-k, no top-p, so the mean reward over samples at temperature 1 estimates the policy's expected
reward. Seeded: the same model, prompts, seed and batch size give the same answers, and the caller's random
state is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dpolab.data.tokenization import Tokenizer


@dataclass
class Samples:
    completions: list[list[str]]  # per prompt, its answers (text, EOS not included)
    token_ids: list[list[list[int]]]  # the sampled tokens of each answer, EOS last when it ended (else it
    # hit max_new_tokens)


@dataclass
class TaskScores:
    sampled_reward: float  # mean reward over every sampled answer (temperature as given)
    greedy_reward: float  # mean reward of the greedy answer of each prompt
    samples: Samples  # the sampled answers
    rewards: list[list[float]]  # their rewards


def prompt_ids(tokenizer, prompts) -> list[list[int]]:
    tok = Tokenizer(tokenizer, max_length=1 << 30, max_prompt_length=1 << 30)
    return [tok.render_prompt(p) for p in prompts]


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _ticker(bar, rows: int):
    """A stopping criterion that never stops: it advances ``bar`` by the batch's ``rows`` at each step."""
    from transformers import StoppingCriteria, StoppingCriteriaList  # deferred: transformers is a heavy import

    class Tick(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(rows)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Tick()])


@torch.no_grad()
def sample(model, tokenizer, prompts, num_samples: int = 4, temperature: float = 1.0, seed: int = 0,
           max_new_tokens: int = 64, batch_size: int = 256, progress: bool = False) -> Samples:
    """``num_samples`` answers per prompt; ``temperature = 0`` is greedy decoding (one answer suffices)."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    greedy = temperature == 0
    options = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0,
                                                        top_p=1.0, min_p=None, typical_p=1.0)
    completions, token_ids = [], []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ids) * num_samples * max_new_tokens, unit="tok", disable=not progress, leave=False,
               desc="greedy answers" if greedy else f"sampling {num_samples} answers per prompt")
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        for i in range(0, len(ids), batch_size):
            chunk = ids[i: i + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (b, P)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=num_samples, pad_token_id=pad, eos_token_id=eos,
                                 stopping_criteria=_ticker(bar, len(chunk) * num_samples),
                                 **options)  # (b·n, P + new)
            bar.n = min(i + batch_size, len(ids)) * num_samples * max_new_tokens  # all stopped early: full
            bar.refresh()
            new = out[:, width:].tolist()
            for j in range(len(chunk)):
                texts, toks = [], []
                for row in new[j * num_samples: (j + 1) * num_samples]:
                    end = row.index(eos) if eos in row else len(row)
                    texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
                    toks.append(row[: end + 1])
                completions.append(texts)
                token_ids.append(toks)
    bar.close()
    model.train(was_training)
    return Samples(completions, token_ids)


def task_scores(model, tokenizer, reward, prompts, num_samples: int = 4, temperature: float = 1.0, seed: int = 0,
                max_new_tokens: int = 64, progress: bool = False) -> TaskScores:
    """Mean task reward of sampled answers and of greedy answers on ``prompts``."""
    samples = sample(model, tokenizer, prompts, num_samples, temperature, seed, max_new_tokens, progress=progress)
    greedy = sample(model, tokenizer, prompts, 1, 0.0, seed, max_new_tokens, progress=progress)
    rewards = [[float(reward(p, c)) for c in cs] for p, cs in zip(prompts, samples.completions)]
    greedy_rewards = [float(reward(p, cs[0])) for p, cs in zip(prompts, greedy.completions)]
    n = sum(len(r) for r in rewards)
    return TaskScores(sum(map(sum, rewards)) / max(n, 1), sum(greedy_rewards) / max(len(prompts), 1), samples,
                      rewards)
