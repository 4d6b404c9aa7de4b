"""The pre-flight audit of a dataset's rows (``dpolab inspect``): what needs only the rows and a tokenizer.

Counts, under the names ``dpolab inspect --json`` prints:

- ``rows``, ``formats`` (rows per format: standard, conversational, unpaired, ranked);
- ``duplicates``: rows equal to an earlier row (prompt, answers and label);
- ``contradictions``: answer pairs {A, B} of one prompt that appear both as A ≻ B and as B ≻ A;
- ``identical``: rows whose chosen equals their rejected (no preference signal);
- ``empty_answers``: answers with no visible text;
- ``prompts_too_long`` (longer than ``max_prompt_length``, cut from the left), ``truncated`` (rows whose
  completions are cut from the right to fit ``max_length``), ``eos_lost`` (completions whose last token, the
  EOS of plain text, is cut), ``dropped`` (rows left with an empty completion; training drops them);
- ``chosen_longer_fraction``, ``chosen_shorter_fraction`` (shares of pairs whose chosen answer has more, or
  fewer, tokens than the rejected) and ``mean_token_gap`` (mean n_c − n_r): length bias of the pairs;
- ``unstable_template`` (the chat template does not render the prompt as a prefix of the whole) and
  ``boundary_merges`` (tokenising prompt + completion as one text merges tokens across the boundary, so the
  whole differs from prompt tokens + completion tokens).

``lengths`` holds the chosen and rejected token counts for the histograms.
"""

from __future__ import annotations

import json
from collections import Counter

from dpolab.data.records import Record
from dpolab.data.tokenization import Tokenizer


def row_format(record: Record) -> str:
    if record.kind == "paired":
        return "conversational" if record.conversational else "standard"
    return record.kind


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def label_counts(records: list[Record]) -> dict[str, int]:
    """``duplicates``, ``contradictions``, ``identical``, ``empty_answers``: counts from the rows alone."""
    seen, orders = set(), set()
    duplicates = identical = empty = 0
    for r in records:
        key = _key([r.prompt, r.completions, r.label])
        duplicates += key in seen
        seen.add(key)
        empty += sum(not _visible(c) for c in r.completions)
        if r.kind != "unpaired":
            identical += r.completions[0] == r.completions[-1]
            orders.add((_key(r.prompt), _key(r.completions[0]), _key(r.completions[-1])))
    contradictions = sum(1 for p, a, b in orders if a < b and (p, b, a) in orders)
    return {"duplicates": duplicates, "contradictions": contradictions, "identical": identical, "empty_answers": empty}


def _visible(text) -> bool:
    if isinstance(text, str):
        return bool(text.strip())
    return any(m["content"].strip() for m in text)


def token_counts(records: list[Record], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Truncation, length bias and tokenisation counts, by the tokenisation of SPEC §4."""
    tok = Tokenizer(tokenizer, max_length, max_prompt_length, template_mismatch="warn")  # counted, not refused
    counts = Counter()
    lengths = {"chosen": [], "rejected": []}
    for r in records:
        args = r.template_args
        prompt_ids, completions = tok.split(r.prompt, r.completions, tok.render_prompt(r.prompt, args), r.where, args)
        counts["unstable_template"] += not tok.is_stable(r.prompt, r.completions, args)
        counts["boundary_merges"] += any(_merges(tokenizer, r.prompt, c, prompt_ids, ids, tok, args)
                                         for c, ids in zip(r.completions, completions))
        counts["prompts_too_long"] += len(prompt_ids) > max_prompt_length
        room = max_length - min(len(prompt_ids), max_prompt_length)
        cut = [len(ids) > room for ids in completions]
        counts["truncated"] += any(cut)
        counts["eos_lost"] += sum(cut)
        counts["dropped"] += room <= 0
        lengths["chosen"].append(len(completions[0]))
        if r.kind != "unpaired":
            lengths["rejected"].append(len(completions[-1]))
    pairs = list(zip(lengths["chosen"], lengths["rejected"]))
    return dict(counts) | {
        "chosen_longer_fraction": sum(c > r for c, r in pairs) / len(pairs) if pairs else None,
        "chosen_shorter_fraction": sum(c < r for c, r in pairs) / len(pairs) if pairs else None,
        "mean_token_gap": sum(c - r for c, r in pairs) / len(pairs) if pairs else None,
        "lengths": lengths}


def _merges(tokenizer, prompt, completion, prompt_ids: list[int], completion_ids: list[int], tok: Tokenizer,
            template_args: dict) -> bool:
    """Whether the whole text tokenises otherwise than prompt tokens + completion tokens (a BPE merge across
    the boundary); a plain-text completion is compared without the EOS dpolab adds."""
    ids = completion_ids
    if not isinstance(prompt, list) and completion_ids[-1:] == [tokenizer.eos_token_id]:
        ids = completion_ids[:-1]
    return tok.whole_ids(prompt, completion, template_args) != prompt_ids + ids


def audit(records: list[Record], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Every count of the module docstring for ``records`` (one file's rows, one format)."""
    formats = Counter(row_format(r) for r in records)
    return {"rows": len(records), "formats": dict(formats), **label_counts(records),
            **token_counts(records, tokenizer, max_length, max_prompt_length)}
