"""Tokenisation, the same for every loss (SPEC §4).

1. The prompt is rendered alone (chat template with the generation prompt, or plain text) and tokenised
   with the tokenizer's special tokens: exactly the tokens the model sees at inference.
2. A completion is the text that follows the rendered prompt in the rendered prompt + completion; it is
   tokenised on its own with no special tokens. A row's ``tools`` and ``chat_template_kwargs`` (e.g.
   ``enable_thinking``) reach the template in both renderings. A template that does not render the prompt as
   a prefix of the whole is an error naming the row and the first differing token; with
   ``template_mismatch="warn"`` it falls back to the longest common token prefix, with one warning.
   Multi-turn rows: the prompt's messages (earlier user and assistant turns alike) are context, never scored;
   only the completion's messages are, which is the last assistant turn in the usual DPO row.
3. Plain-text completions end with EOS, added once.
4. The prompt is cut from the left to ``max_prompt_length``; completions from the right so that prompt +
   completion ≤ ``max_length``. All completions of a row share the prompt tokens. A row left with an empty
   completion is dropped and counted.
"""

from __future__ import annotations

import logging
import random

from jinja2 import TemplateError

from dpolab.data.records import Example, Record
from dpolab.errors import DataError

log = logging.getLogger("dpolab")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class Tokenizer:
    """Turns :class:`Record` rows into :class:`Example` token ids by the rules above."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, template_mismatch: str = "error"):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.template_mismatch = template_mismatch  # "error" | "warn" (the longest common prefix)
        # Special tokens the tokenizer puts after a text (some add EOS); a prompt must not end with them.
        empty = _ids(tokenizer, "", True)
        self._suffix = [t for t in empty if t == tokenizer.eos_token_id][-1:]
        self._warned_unstable = False
        self.cut = {"prompts": 0, "completions": 0}  # rows truncated, for the warning

    def render_prompt(self, prompt, template_args: dict | None = None) -> list[int]:
        if isinstance(prompt, list):
            return _ids(self.tok, self._chat(prompt, True, template_args or {}), False)
        ids = _ids(self.tok, prompt, True)
        if self._suffix and ids[-1:] == self._suffix:
            ids = ids[:-1]
        return ids

    def _chat(self, messages: list[dict], generation_prompt: bool, template_args: dict) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise DataError("conversational rows need a tokenizer with a chat template, and this one has none; "
                            "give plain-text rows or a model whose tokenizer has a chat_template")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                **template_args)
        except TemplateError as e:  # e.g. a template that insists on alternating user/assistant roles
            raise DataError(f"the chat template cannot render this conversation: {e}") from None

    def split(self, prompt, completions: list, prompt_ids: list[int], where: str, template_args: dict | None = None
              ) -> tuple[list[int], list[list[int]]]:
        """(prompt ids shared by every completion, ids of each completion). The prompt ids change only on the
        ``warn`` fallback for a template that renders the prompt differently inside the conversation, and then
        once for all completions: the longest token prefix common to the rendered prompt and every rendered
        prompt + completion, so no completion keeps a prompt token another one lost."""
        if not isinstance(prompt, list):
            return prompt_ids, [self._plain_completion(c) for c in completions]
        args = template_args or {}
        rendered_prompt = self._chat(prompt, True, args)
        rendered = [self._chat(prompt + c, False, args) for c in completions]
        if all(r.startswith(rendered_prompt) for r in rendered):
            return prompt_ids, [_ids(self.tok, r[len(rendered_prompt):], False) for r in rendered]
        wholes = [_ids(self.tok, r, False) for r in rendered]
        n = common_prefix_length([prompt_ids, *wholes])
        if self.template_mismatch == "error":
            raise DataError(self._mismatch(prompt_ids, next(w for w, r in zip(wholes, rendered)
                                                                   if not r.startswith(rendered_prompt))))
        if not self._warned_unstable:
            log.warning("%s: the chat template renders the prompt differently inside the conversation; "
                        "splitting at the longest common token prefix instead", where)
            self._warned_unstable = True
        return prompt_ids[:n], [whole[n:] for whole in wholes]

    def _mismatch(self, prompt_ids: list[int], whole: list[int]) -> str:
        """The error for a prompt that is not a prefix of the whole (the caller names the row): the first
        token where they differ."""
        i = common_prefix_length([prompt_ids, whole])
        show = lambda ids: repr(self.tok.convert_ids_to_tokens(ids[i])) if i < len(ids) else "the end"  # noqa: E731
        return (f"the chat template does not render the prompt as a prefix of prompt + completion, so "
                f"the completion cannot be told apart; they first differ at token {i}: the prompt has "
                f"{show(prompt_ids)}, prompt + completion has {show(whole)}. Fix the template (the prompt "
                "rendered with add_generation_prompt must start the whole conversation), or pass "
                "--template-mismatch warn to split at their longest common token prefix")

    def is_stable(self, prompt, completions: list, template_args: dict | None = None) -> bool:
        """Whether the prompt rendered alone is a prefix of every rendered prompt + completion (plain text
        always is; an unstable chat template is not, and :meth:`split` then refuses it or falls back)."""
        if not isinstance(prompt, list):
            return True
        rendered_prompt = self._chat(prompt, True, template_args or {})
        return all(self._chat(prompt + c, False, template_args or {}).startswith(rendered_prompt) for c in completions)

    def whole_ids(self, prompt, completion, template_args: dict | None = None) -> list[int]:
        """Prompt + completion rendered and tokenised as one text, as the prompt alone is (the check for BPE
        merges across the boundary); plain text gets no EOS here."""
        if isinstance(prompt, list):
            return _ids(self.tok, self._chat(prompt + completion, False, template_args or {}), False)
        return self.render_prompt(prompt + completion)

    def _plain_completion(self, completion: str) -> list[int]:
        ids = _ids(self.tok, completion, False)
        if not ids or ids[-1] != self.tok.eos_token_id:
            ids.append(self.tok.eos_token_id)
        return ids

    def __call__(self, record: Record, index: int) -> Example | None:
        """The tokenised example, or None when truncation leaves a completion empty."""
        args = record.template_args
        prompt_ids, completions = self.split(record.prompt, record.completions,
                                             self.render_prompt(record.prompt, args), record.where, args)
        self.cut["prompts"] += len(prompt_ids) > self.max_prompt_length
        prompt_ids = prompt_ids[-self.max_prompt_length:]  # (left truncation)
        room = self.max_length - len(prompt_ids)
        self.cut["completions"] += any(len(ids) > room for ids in completions)
        completions = [ids[:room] for ids in completions]
        if room <= 0 or any(not ids for ids in completions):
            return None
        return Example(index, prompt_ids, completions, record.label, record.margin)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest prefix all ``sequences`` share.

    >>> common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]])
    2
    """
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


def tokenize_records(records: list[Record], tokenizer, max_length: int, max_prompt_length: int,
                     template_mismatch: str = "error") -> list[Example]:
    """Tokenise every record; drop (and count in a warning) rows left with an empty completion."""
    tok = Tokenizer(tokenizer, max_length, max_prompt_length, template_mismatch)
    examples, dropped = [], 0
    for record in records:
        try:
            ex = tok(record, len(examples))
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if dropped:
        log.warning("dropped %d row(s) whose completion was empty after truncation to max_length=%d, "
                    "max_prompt_length=%d", dropped, max_length, max_prompt_length)
    if tok.cut["prompts"] or tok.cut["completions"]:
        log.warning("truncated %d prompt(s) longer than max_prompt_length=%d (from the left) and %d row(s) whose "
                    "completions did not fit max_length=%d (from the right)", tok.cut["prompts"], max_prompt_length,
                    tok.cut["completions"], max_length)
    if not examples:
        raise DataError(f"no usable rows remain after truncation to max_length={max_length}")
    ks = {len(e.completion_ids) for e in examples}
    if len(ks) > 1:
        raise DataError(f"ranked rows must all have the same number of completions; found {sorted(ks)}")
    return examples


def add_mismatched_completions(examples: list[Example], seed: int, max_length: int) -> list[Example]:
    """KTO's KL pairs: give every unpaired example a second completion taken from another example, by a
    seeded cyclic shift over a random order (so no example gets its own). Fixed per dataset, so the
    reference log-probs of these pairs can be precomputed like any other."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    out = []
    for i, ex in enumerate(examples):
        other = examples[partner[i]].completion_ids[0][: max(1, max_length - len(ex.prompt_ids))]
        out.append(Example(ex.index, ex.prompt_ids, [ex.completion_ids[0], other], ex.label, ex.margin))
    return out
