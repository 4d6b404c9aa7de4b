"""Judges (dpolab.evaluation.judges): each kind on tiny local models against a plain forward pass or a
hand-worked preference, the both-orders tie rule, the content-hash cache, and one-paragraph failures."""

from __future__ import annotations

import functools
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import dpolab
from dpolab import cli
from dpolab.errors import JudgeError
from dpolab.evaluation.judges import JudgmentCache, Pointwise, Settings, judge_pairs, load_judge
from dpolab.evaluation.model_judges import QUESTION, BothOrders, LocalChoice, chat_messages


def test_task_judge_prefers_the_exact_sum_and_ties_equal_scores():
    judge = load_judge("addition")
    assert judge.identity == "task:addition" == load_judge("task:addition").identity
    assert [judge("12+34=", "46", "45"), judge("12+34=", "45", "46"), judge("12+34=", "44", "45"),
            judge("12+34=", "46", "46")] == [1.0, 0.0, 0.5, 0.5]


def test_function_judges_pointwise_and_pairwise(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def longer(prompt, completion):\n    return len(completion)\n\n"
        "def first_letter(prompt, a, b):\n    return 1.0 if a < b else 0.0 if a > b else 0.5\n")
    monkeypatch.chdir(tmp_path)
    point, pair = load_judge("my_judges:longer"), load_judge("function:my_judges:first_letter")
    assert isinstance(point, Pointwise) and point.identity == "function:my_judges:longer"
    assert [point("q", "abc", "ab"), point("q", "a", "b"), point("q", "a", "bb")] == [1.0, 0.5, 0.0]
    assert [pair("q", "apple", "berry"), pair("q", "berry", "apple"), pair("q", "x", "x")] == [1.0, 0.0, 0.5]


def test_both_orders_cancel_position_bias():
    """A judge that always picks the first (or the second) slot gives only ties; one that follows the
    content wins and loses by it; one that flips with the order is a tie too."""
    pairs = [("q", "long answer", "s"), ("q", "s", "long answer")]
    for slot in "AB":
        assert [BothOrders(lambda p, x, y, s=slot: s, "slot")(*t) for t in pairs] == [0.5, 0.5]
    longer = BothOrders(lambda p, x, y: "A" if len(x) > len(y) else "B", "longer")
    assert [longer(*t) for t in pairs] == [1.0, 0.0]


def test_reward_model_judge_scores_with_the_first_logit(tiny_model, tmp_path):
    """A sequence-classification folder: the preference follows the first logit of a plain forward pass
    over the rendered chat (user prompt, assistant answer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    path = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()

    def plain(prompt, answer):  # independent: render and run by hand
        text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()

    judge = load_judge(f"reward_model:{path}")
    assert judge.identity.startswith("reward_model:")
    answers = ["the cat is good", "the dog is bad", "red blue green"]
    for a in answers:
        for b in answers:
            expected = 1.0 if plain("what is it?", a) > plain("what is it?", b) else 0.5 if a == b else 0.0
            assert judge("what is it?", a, b) == expected


@functools.lru_cache(maxsize=2)
def causal_lm(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path), AutoModelForCausalLM.from_pretrained(model_path).eval()


def choice_by_hand(model_path, prompt, first, second) -> str:
    """The letter a chat model picks, computed independently: the chat template rendered by hand, one
    forward pass, the larger of the logits of the tokens 'A' and 'B'."""
    tok, model = causal_lm(model_path)
    text = (f"{tok.bos_token}<|user|>{QUESTION.format(prompt=prompt, first=first, second=second)}<|end|>"
            "<|assistant|>")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    return "A" if logits[a] >= logits[b] else "B"


PAIRS = [("what is red?", "red is good", "red is bad"), ("pick one", "the cat", "the dog"),
         ("say yes", "yes", "no"), ("what is the sun?", "the sun is great", "awful")]


@pytest.fixture(scope="module")
def chat_judge_model(tiny_model, tmp_path_factory):
    """The tiny chat model made into a judge without position bias on PAIRS: the output row of the letter B
    is A's plus a random direction e orthogonal to the midpoint of each pair's two final hidden states, so
    e·h(first order) = −e·h(second order) and the choice flips with the order, following the content. (A
    random tiny model answers B to everything, which both orders turn into ties.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    mids = []
    with torch.no_grad():
        for prompt, x, y in PAIRS:
            h = [model(input_ids=tok.apply_chat_template(chat_messages(prompt, f, s), add_generation_prompt=True,
                                                         return_tensors="pt", return_dict=True)["input_ids"],
                       output_hidden_states=True).hidden_states[-1][0, -1] for f, s in ((x, y), (y, x))]
            mids.append((h[0] + h[1]) / 2)
        q, _ = torch.linalg.qr(torch.stack(mids, 1))  # (H, len(PAIRS)): an orthonormal basis of the midpoints
        e = torch.randn(q.shape[0], generator=torch.Generator().manual_seed(2))
        e = e - q @ (q.T @ e)
        model.lm_head.weight[b] = model.lm_head.weight[a] + e
    path = tmp_path_factory.mktemp("chat-judge")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_llm_judge_asks_a_local_chat_model_in_both_orders(chat_judge_model):
    judge = load_judge(f"llm:{chat_judge_model}")
    seen = set()
    for prompt, a, b in PAIRS:
        first = choice_by_hand(chat_judge_model, prompt, a, b) == "A"
        second = choice_by_hand(chat_judge_model, prompt, b, a) == "B"
        expected = 1.0 if first and second else 0.0 if not (first or second) else 0.5
        assert judge(prompt, a, b) == expected
        seen.add(expected)
    assert len(seen) > 1  # the pairs are not all ties: the test discriminates


class ChatServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1, answering with a tiny local chat model
    (its choice between A and B), or with a scripted reply."""

    def __init__(self, model_path=None, reply=None):
        choose = LocalChoice(str(model_path)) if model_path else None
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                self.requests += 1
                body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                if reply is not None:
                    content = reply
                else:  # read the two answers back out of the question and let the local model choose
                    text = body["messages"][0]["content"]
                    prompt = text.split("Prompt: ", 1)[1].split("\nAnswer A: ")[0]
                    first = text.split("\nAnswer A: ", 1)[1].split("\nAnswer B: ")[0]
                    second = text.split("\nAnswer B: ", 1)[1]
                    content = choose(prompt, first, second)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

            def log_message(handler, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_endpoint_judge_agrees_with_the_local_model_it_serves(chat_judge_model):
    """The same tiny chat model behind a real HTTP server: the endpoint judge gives the llm judge's
    preferences, two requests (both orders) per pair."""
    local = load_judge(f"llm:{chat_judge_model}")
    with ChatServer(chat_judge_model) as server:
        remote = load_judge(f"endpoint:{server.url}", Settings(model="tiny", timeout=5.0))
        assert [remote(*p) for p in PAIRS] == [local(*p) for p in PAIRS]
        assert server.requests == 2 * len(PAIRS)
    assert remote.identity == f"endpoint:{server.url}#tiny"


def test_the_cache_judges_nothing_twice(tmp_path):
    calls = []

    def score(prompt, answer):
        calls.append(answer)
        return len(answer)

    judge = Pointwise(score, "length")
    pairs = [("q", "aa", "b"), ("q", "b", "aa"), ("r", "x", "yy")]
    first = judge_pairs(judge, pairs, JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert first == [1.0, 0.0, 0.0] and len(calls) == 6
    again = judge_pairs(judge, pairs + [("q", "ccc", "b")], JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert again == first + [1.0] and len(calls) == 8  # only the new pair was judged
    other = Pointwise(score, "length, another identity")  # a different judge is never answered from the cache
    judge_pairs(other, pairs[:1], JudgmentCache(tmp_path / "j.jsonl"), progress=False)
    assert len(calls) == 10


def test_a_bad_judge_name_is_one_paragraph(tiny_model, capsys):
    with pytest.raises(JudgeError, match=r"unknown judge 'no-such-judge'\. A judge is KIND:ARGUMENT with KIND one "
                                         r"of task, function, reward_model, llm, endpoint"):
        load_judge("no-such-judge")
    code = cli.main(["compare", "--model", str(tiny_model), "--ref-model", str(tiny_model), "--task", "addition",
                     "--judge", "no-such-judge"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dpolab: error: judge: unknown judge") and "Traceback" not in err
    with pytest.raises(JudgeError, match="cannot import 'nowhere_module'"):
        load_judge("nowhere_module:fn")


def test_a_judge_that_returns_garbage_stops_with_the_count(tmp_path, monkeypatch):
    (tmp_path / "garbage.py").write_text("def score(prompt, completion):\n"
                                         "    return 1.0 if completion != 'bad' else 'not a number'\n")
    monkeypatch.chdir(tmp_path)
    judge = load_judge("garbage:score")
    cache = JudgmentCache(tmp_path / "j.jsonl")
    pairs = [("q", "a", "bb"), ("q", "c", "d"), ("q", "bad", "e"), ("q", "f", "g")]
    with pytest.raises(JudgeError) as e:
        judge_pairs(judge, pairs, cache, progress=False)
    text = str(e.value)
    assert "failed on pair 3 of 4" in text and "'not a number', not a finite number" in text
    assert "2 of 4 pairs were judged (2 just now, kept in" in text and "\n" not in text
    assert len(JudgmentCache(tmp_path / "j.jsonl").values) == 2  # what was judged is kept for the rerun
    with ChatServer(reply="Neither, both are lovely") as server:
        chat = load_judge(f"endpoint:{server.url}", Settings(timeout=5.0))
        with pytest.raises(JudgeError, match=r"replied 'Neither, both are lovely', neither A nor B\. 0 of 1 pairs"):
            judge_pairs(chat, pairs[:1], JudgmentCache(None), progress=False)


def test_an_unreachable_endpoint_is_one_paragraph_after_bounded_retries():
    with socket.socket() as s:  # a port nobody listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = load_judge(f"endpoint:http://127.0.0.1:{port}/v1", Settings(timeout=1.0))
    with pytest.raises(JudgeError) as e:
        judge_pairs(judge, PAIRS, JudgmentCache(None), progress=False)
    text = str(e.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions is unreachable after 3 tries" in text
    assert "failed on pair 1 of 4" in text and "0 of 4 pairs were judged" in text and "\n" not in text


def test_an_llm_judge_needs_a_chat_model(tiny_model, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(JudgeError, match=f"judge llm:{plain}: {plain} has no chat template"):
        load_judge(f"llm:{plain}")


def test_a_users_task_named_module_function_judges_by_its_reward(tiny_model, prefs, tmp_path, monkeypatch):
    """--task module:function (a function returning a Task) with no --judge: the judge is that task's reward,
    in train --task as in compare (it was taken for a pointwise judge function and refused)."""
    name = "judge_test_user_task"  # a module name no other test imports (imports are cached per process)
    monkeypatch.delitem(sys.modules, name, raising=False)
    (tmp_path / f"{name}.py").write_text(
        "from dpolab.tasks import Task\n\n\ndef reward(prompt, completion):\n    return float('good' in completion)\n\n\n"
        "def task():\n    return Task('mine', ['what is red?'], ['what is red?', 'what is blue?'], reward)\n")
    monkeypatch.chdir(tmp_path)  # load_object looks in the current directory first
    summary = dpolab.train(model=str(tiny_model), data=str(prefs), output_dir=str(tmp_path / "run"), max_steps=1,
                           batch_size=8, eval_split=0.0, save_every=0, progress=False, task=f"{name}:task",
                           task_prompts=2, task_samples=1, task_max_new_tokens=3)
    assert summary["judge"] == f"task:{name}:task"
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert 0.0 <= summary["win_rate"] <= 1.0
