"""Judges backed by a model: a reward model scoring each answer, a local chat model asked to choose, and an
OpenAI-compatible chat-completions endpoint asked the same question.

A chat judge sees one pair in both orders (:class:`BothOrders`): the answer it prefers in both is the
winner; when the orders disagree the judgment is a tie, so a judge that always picks the first (or the
second) answer, whatever it says, gives ties and never a win (position bias cancels, as in MT-Bench's
"swap" protocol). A failure (a reply that is neither A nor B, an endpoint down after its retries) raises
:class:`JudgeFailure`, which :func:`dpolab.evaluation.judges.judge_pairs` turns into one paragraph.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch

from dpolab.models.loading import load_model, load_tokenizer

QUESTION = ("Which answer to the prompt is better? Reply with the single letter A or B.\n"
            "Prompt: {prompt}\nAnswer A: {first}\nAnswer B: {second}")


class JudgeFailure(Exception):
    """A judge could not give a judgment for one pair; the message says why."""


def chat_messages(prompt, first: str, second: str) -> list[dict]:
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return [{"role": "user", "content": QUESTION.format(prompt=text, first=first, second=second)}]


class BothOrders:
    """A pairwise judge from ``choose(prompt, first, second) -> "A" | "B"``, asked in both orders.

    >>> always_first = BothOrders(lambda p, x, y: "A", "always-first")
    >>> always_first("1+1=", "2", "3")  # position bias alone: the orders disagree
    0.5
    >>> longer = BothOrders(lambda p, x, y: "A" if len(x) > len(y) else "B", "longer")
    >>> longer("q", "long", "s"), longer("q", "s", "long")
    (1.0, 0.0)
    """

    def __init__(self, choose: Callable[[object, str, str], str], identity: str):
        self.choose, self.identity = choose, identity

    def __call__(self, prompt, answer_a: str, answer_b: str) -> float:
        a_first = self.choose(prompt, answer_a, answer_b) == "A"
        a_second = self.choose(prompt, answer_b, answer_a) == "B"
        return 1.0 if a_first and a_second else 0.0 if not (a_first or a_second) else 0.5


def weights_identity(path: str) -> str:
    """A model folder's identity for the cache: its resolved path and its weight files' names and sizes."""
    p = Path(path)
    files = sorted((f.name, f.stat().st_size) for f in p.glob("*.safetensors")) if p.is_dir() else []
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return f"{p.resolve() if p.exists() else path}@{digest}"


class RewardModel:
    """A pointwise scorer: the first logit of a Hugging Face ``AutoModelForSequenceClassification`` on the
    prompt and answer as one chat (the tokenizer's template, user then assistant) or, without a template,
    the prompt followed by the answer."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification  # deferred: transformers is a heavy import

        self.tokenizer = load_tokenizer(path, trust_remote_code)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=trust_remote_code, use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise JudgeFailure(f"cannot load the reward model {path}: {str(e).splitlines()[0]}") from None
        self.identity = f"reward_model:{weights_identity(path)}"

    def text(self, prompt, answer: str) -> str:
        if self.tokenizer.chat_template:
            user = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                                      tokenize=False)
        return prompt + answer

    @torch.no_grad()
    def __call__(self, prompt, answer: str) -> float:
        ids = self.tokenizer(self.text(prompt, answer), return_tensors="pt", add_special_tokens=False)
        return float(self.model(**ids).logits[0, 0])


class LocalChoice:
    """``choose`` of a local chat model: the question rendered by its chat template with the generation
    prompt, and the letter whose token has the larger next-token logit (no sampling, so no bad output)."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        if not self.tokenizer.chat_template:
            raise JudgeFailure(f"{path} has no chat template: an llm judge is a chat model (for a model that "
                               "scores answers, use reward_model:PATH)")
        self.model = load_model(path, trust_remote_code).eval()
        self.letters = [self.tokenizer.encode(c, add_special_tokens=False)[0] for c in "AB"]

    @torch.no_grad()
    def __call__(self, prompt, first: str, second: str) -> str:
        ids = self.tokenizer.apply_chat_template(chat_messages(prompt, first, second), add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        logits = self.model(input_ids=ids["input_ids"]).logits[0, -1]  # (V,)
        return "A" if logits[self.letters[0]] >= logits[self.letters[1]] else "B"


class EndpointChoice:
    """``choose`` of an OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``,
    temperature 0, one token): the reply's first letter, A or B. Each request has ``timeout`` seconds and
    is tried ``retries`` times with doubling pauses before the judge fails."""

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout: float, retries: int = 3,
                 pause: float = 0.2):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key = model, os.environ.get(api_key_env, "")
        self.timeout, self.retries, self.pause = timeout, retries, pause

    def post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        reason = ""
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as e:
                reason = f"HTTP {e.code} {e.reason}"
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying will not help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = str(getattr(e, "reason", e))
            except json.JSONDecodeError:
                raise JudgeFailure(f"{self.url} did not reply with JSON") from None
            time.sleep(self.pause * 2 ** attempt)
        raise JudgeFailure(f"{self.url} is unreachable after {self.retries} tries ({reason}; timeout "
                           f"{self.timeout:g}s each)")

    def __call__(self, prompt, first: str, second: str) -> str:
        body = {"model": self.model, "messages": chat_messages(prompt, first, second), "temperature": 0,
                "max_tokens": 1}
        reply = self.post(body)
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeFailure(f"{self.url} replied without choices[0].message.content: "
                               f"{json.dumps(reply)[:200]}") from None
        letter = text.strip()[:1].upper() if isinstance(text, str) else ""
        if letter not in ("A", "B"):
            raise JudgeFailure(f"{self.url} replied {text!r}, neither A nor B")
        return letter
