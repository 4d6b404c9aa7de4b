"""Progress where a real model makes people wait: sampling, the sampled KL and held-out evaluation show a
bar with a rate, and showing it changes no number (the same answers, the same metrics)."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpolab.evaluation.generate import sample
from dpolab.evaluation.task_eval import task_report
from dpolab.tasks import Task

PROMPTS = ["what is the cat?", "what is red?", "say yes"]


@pytest.fixture(scope="module")
def models(tiny_model, other_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    return tok, load(tiny_model), load(other_model)


def test_the_sampling_bar_counts_every_token_slot_and_its_rate(models, capsys):
    tok, model, _ = models
    quiet = sample(model, tok, PROMPTS, num_samples=2, max_new_tokens=5, seed=3, batch_size=2)
    capsys.readouterr()
    shown = sample(model, tok, PROMPTS, num_samples=2, max_new_tokens=5, seed=3, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert shown == quiet
    assert "sampling 2 answers per prompt" in err and "tok/s" in err
    counts = [int(n) for n, total in re.findall(r"(\d+)/(\d+) \[", err) if total == str(3 * 2 * 5)]
    assert counts and max(counts) == 3 * 2 * 5 and counts == sorted(counts)


def test_the_task_report_shows_sampling_greedy_and_kl_bars_and_the_same_numbers(models, capsys):
    tok, model, other = models
    task = Task("t", PROMPTS, PROMPTS, lambda p, a: float(len(a) < 12))
    args = dict(num_prompts=3, num_samples=2, seed=0, max_new_tokens=4)
    quiet = task_report(model, other, tok, task, **args)
    capsys.readouterr()
    shown = task_report(model, other, tok, task, **args, progress=True)
    err = capsys.readouterr().err
    assert shown == quiet
    for desc in ("sampling 2 answers per prompt", "greedy answers", "KL of the sampled answers"):
        assert desc in err
