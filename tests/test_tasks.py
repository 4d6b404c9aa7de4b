"""Tasks, sampling, on-policy pairs and the sampled KL, each against an independent computation."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpolab.errors import ConfigError
from dpolab.evaluation.generate import sample, task_scores
from dpolab.evaluation.pairs import make_pairs, pair_rows, read_prompts
from dpolab.evaluation.task_eval import sampled_kl
from dpolab.tasks import Task, addition, load_reward, load_task

PROMPTS = ["what is the cat?", "what is red?", "say yes", "pick one two three"]


@pytest.fixture(scope="module")
def models(tiny_model, other_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    return tok, load(tiny_model), load(other_model)


def test_addition_splits_are_disjoint_and_cover_every_problem():
    s = addition.splits()
    sets = {k: set(v) for k, v in s.items()}
    assert [len(s[k]) for k in ("eval", "train", "sft")] == [500, 3600, 4000]
    assert not (sets["eval"] & sets["train"]) and not (sets["eval"] & sets["sft"]) and not (sets["train"] & sets["sft"])
    assert len(sets["eval"] | sets["train"] | sets["sft"]) == 90 * 90
    assert addition.reward("99+99=", "198") == 1.0 and addition.reward("99+99=", "198 ") == 0.0
    with pytest.raises(ValueError):
        addition.reward("what?", "1")


def test_tasks_and_rewards_load_by_name_and_by_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        "from dpolab.tasks import Task\n"
        "def length(prompt, completion):\n    return float(len(completion))\n"
        "def make():\n    return Task('mine', ['a'], ['b'], length)\n"
        "NOT_A_TASK = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_task("addition").name == "addition"
    assert load_task("my_task:make").eval_prompts == ["b"]
    assert load_reward("my_task:length")("p", "abc") == 3.0
    assert load_reward("addition")("10+20=", "30") == 1.0
    for bad, msg in [("nope", "unknown task"), ("my_task:missing", "no attribute"), ("no_such_mod:f", "cannot import"),
                     ("my_task:NOT_A_TASK", "not a dpolab.tasks.Task")]:
        with pytest.raises(ValueError, match=msg):
            load_task(bad)


def test_greedy_answers_do_not_depend_on_batching_or_left_padding(models):
    tok, model, _ = models
    batched = sample(model, tok, PROMPTS, num_samples=1, temperature=0.0, max_new_tokens=5).completions
    alone = [sample(model, tok, [p], num_samples=1, temperature=0.0, max_new_tokens=5).completions[0] for p in PROMPTS]
    assert batched == alone
    # and they are the argmax continuation computed by hand, token by token, without a KV cache
    for p, (answer,) in zip(PROMPTS, batched):
        ids = tok(p)["input_ids"]
        out = []
        for _ in range(5):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
        assert answer == tok.decode(out, skip_special_tokens=True)


def test_sampling_is_pure_temperature_sampling_seeded_and_leaves_the_rng_alone(models):
    """A random tiny model spreads its first-token probability over ~400 tokens: top-k 50 (the library
    default) would leave no mass outside the 50 likeliest. The sampled frequencies must match softmax."""
    tok, model, _ = models
    prompt = "what is the cat?"
    with torch.no_grad():
        probs = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].softmax(-1)
    outside = probs.sort(descending=True).values[50:].sum().item()
    assert outside > 0.3
    state = torch.get_rng_state()
    n = 2000
    s = sample(model, tok, [prompt], num_samples=n, temperature=1.0, seed=7, max_new_tokens=1)
    assert torch.equal(state, torch.get_rng_state())
    top50 = set(probs.sort(descending=True).indices[:50].tolist())
    firsts = [tok(c, add_special_tokens=False)["input_ids"][:1] or [tok.eos_token_id] for c in s.completions[0]]
    frac_outside = sum(f[0] not in top50 for f in firsts) / n
    assert frac_outside == pytest.approx(outside, abs=4 * math.sqrt(outside * (1 - outside) / n) + 0.02)
    again = sample(model, tok, [prompt], num_samples=n, temperature=1.0, seed=7, max_new_tokens=1)
    assert again.completions == s.completions


def test_sampled_kl_matches_the_exact_kl_of_one_token_answers(models):
    """With one-token answers, E_{y~π}[log π(y) − log π_ref(y)] is the KL of the first-token distributions,
    which we can sum exactly over the vocabulary. Special tokens are sampled too (a random model), so the
    estimate must use the sampled ids, not a re-tokenisation of their decoded text."""
    tok, policy, ref = models
    prompt = "what is red?"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        lp, lq = policy(ids).logits[0, -1].log_softmax(-1), ref(ids).logits[0, -1].log_softmax(-1)
    p = lp.exp()
    exact = (p * (lp - lq)).sum().item()
    n = 3000
    s = sample(policy, tok, [prompt], num_samples=n, temperature=1.0, seed=1, max_new_tokens=1)
    estimate = sampled_kl(policy, ref, tok, [prompt], s)
    spread = ((lp - lq) ** 2 * p).sum().item()
    assert estimate == pytest.approx(exact, abs=4 * math.sqrt(spread / n))
    assert sampled_kl(policy, policy, tok, [prompt], s) == pytest.approx(0.0, abs=1e-6)


def test_task_scores_are_the_mean_rewards(models):
    tok, model, _ = models
    reward = lambda p, c: float(len(c) % 2)
    scores = task_scores(model, tok, reward, PROMPTS, num_samples=3, seed=0, max_new_tokens=4)
    flat = [reward(p, c) for p, cs in zip(PROMPTS, scores.samples.completions) for c in cs]
    assert scores.sampled_reward == pytest.approx(sum(flat) / len(flat))
    greedy = sample(model, tok, PROMPTS, 1, 0.0, 0, 4).completions
    assert scores.greedy_reward == pytest.approx(sum(reward(p, c[0]) for p, c in zip(PROMPTS, greedy)) / 4)


def test_pair_rows_take_a_best_and_a_worst_answer_and_skip_ties():
    rows = pair_rows(["a", "b", "c"], [["x", "y", "z"], ["u", "v"], ["p", "q"]],
                     [[0.5, 1.0, 0.0], [1.0, 1.0], [0.2, 0.9]], seed=3)
    assert rows == [{"prompt": "a", "chosen": "y", "rejected": "z", "score_chosen": 1.0, "score_rejected": 0.0},
                    {"prompt": "c", "chosen": "q", "rejected": "p", "score_chosen": 0.9, "score_rejected": 0.2}]


def test_make_pairs_command_with_a_user_reward(tiny_model, tmp_path):
    (tmp_path / "rewards.py").write_text("def longer(prompt, completion):\n    return float(len(completion))\n")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "pairs.jsonl"
    r = subprocess.run([sys.executable, "-m", "dpolab.cli", "make-pairs", "--model", str(tiny_model), "--prompts",
                        "prompts.txt", "--reward", "rewards:longer", "--output", str(out), "--num-samples", "4",
                        "--max-new-tokens", "6"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and f"wrote {len(rows)} pairs" in r.stdout
    for row in rows:
        assert row["prompt"] in PROMPTS
        assert len(row["chosen"]) == row["score_chosen"] > row["score_rejected"] == len(row["rejected"])
    # the written file trains as it is
    from dpolab.data.reading import load_records

    assert len(load_records(str(out), False)) == len(rows)


def test_make_pairs_refuses_bad_input_in_one_paragraph(tiny_model, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "say yes"}\n{"text": "no prompt"}\n')
    (tmp_path / "ok.txt").write_text("say yes\n")
    (tmp_path / "bad_reward.py").write_text("def boom(prompt, completion):\n    raise KeyError('x')\n")
    cases = [(["--prompts", "prompts.jsonl", "--reward", "addition"], "line 2: field 'prompt'"),
             (["--prompts", "ok.txt", "--reward", "nowhere:fn"], "cannot import 'nowhere'"),
             (["--prompts", "ok.txt", "--reward", "bad_reward:boom"], "failed on prompt 'say yes'"),
             (["--prompts", "ok.txt", "--reward", "addition", "--num-samples", "1"], "num-samples ≥ 2")]
    for args, msg in cases:
        r = subprocess.run([sys.executable, "-m", "dpolab.cli", "make-pairs", "--model", str(tiny_model), "--output",
                            "o.jsonl", "--max-new-tokens", "3", *args], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "o.jsonl").exists()


def test_read_prompts_accepts_chat_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    assert read_prompts(str(path)) == [[{"role": "user", "content": "hi"}]]


def test_a_task_object_is_accepted_directly():
    t = Task("t", ["a"], ["b"], lambda p, c: 1.0)
    assert t.reward("x", "y") == 1.0
