"""Preference rows validated into :class:`Record` (SPEC §4), and the tokenised :class:`Example`.

Accepted rows: standard (``prompt``, ``chosen``, ``rejected`` strings), conversational (the same keys holding
lists of ``{role, content}`` messages), implicit prompt (``chosen`` and ``rejected`` only), unpaired
(``prompt``, ``completion``, ``label``) and ranked (``prompt``, ``completions`` best first, or ``completions``
with ``scores``). Optional columns: ``margin``, ``score_chosen``, ``score_rejected``, and for conversational
rows ``tools`` (a list of tool definitions) and ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``),
both handed to the chat template for the prompt and for prompt + completion alike; any other column is an
error unless the caller names it in ``ignore_columns`` (``--ignore-columns id,source``). A bad row raises
:class:`DataError` naming the file, the line and the field, or is counted and dropped when ``skip_invalid``
is set.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Collection

from dpolab.errors import DataError

log = logging.getLogger("dpolab")

Text = str | list[dict]  # plain text, or a list of {role, content} messages
FORMAT_KEYS = {"paired": {"chosen", "rejected"}, "unpaired": {"completion", "label"},
               "ranked": {"completions", "scores"}}
KNOWN_COLUMNS = {"prompt", "chosen", "rejected", "completion", "label", "completions", "scores", "margin",
                 "score_chosen", "score_rejected", "tools", "chat_template_kwargs"}
# Arguments of apply_chat_template that dpolab sets itself; a row's chat_template_kwargs may not.
RESERVED_KWARGS = {"conversation", "messages", "tools", "add_generation_prompt", "tokenize", "continue_final_message",
                   "return_dict", "chat_template"}


@dataclass
class Record:
    """One validated row. ``completions`` is [chosen, rejected] for paired data, K answers best first for
    ranked data, and [completion] for unpaired data (with ``label``)."""

    where: str
    kind: str  # "paired" | "ranked" | "unpaired"
    prompt: Text
    completions: list[Text]
    conversational: bool
    label: bool | None = None
    margin: float | None = None
    tools: list[dict] | None = None  # tool definitions the chat template renders
    chat_template_kwargs: dict | None = None  # extra template variables, e.g. enable_thinking

    @property
    def template_args(self) -> dict[str, Any]:
        """What this row adds to every apply_chat_template call."""
        return {**({"tools": self.tools} if self.tools is not None else {}), **(self.chat_template_kwargs or {})}


@dataclass
class Example:
    """A tokenised row: shared prompt tokens and K completions (chosen first); what every batch layout,
    reference strategy and log-prob pass consumes."""

    index: int  # position in its dataset; keys the precomputed reference log-probs
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    label: bool | None = None
    margin: float | None = None


def _text(row: dict, key: str, where: str) -> Text:
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}, field {key!r}: empty text")
        return value
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}, field {key!r}: an empty list of messages")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}, field {key!r}, message {i}: expected {{\"role\": str, \"content\": str}}, "
                                f"got {json.dumps(m)[:80]}")
        return value
    raise DataError(f"{where}, field {key!r}: expected a string or a list of messages, got "
                    f"{type(value).__name__}")


def _number(row: dict, key: str, where: str) -> float:
    value = row[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}, field {key!r}: expected a number, got {value!r}") from None


def _bool(row: dict, key: str, where: str) -> bool:
    value = row[key]
    if isinstance(value, bool):
        return value
    if value in (0, 1) or (isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1")):
        return str(value).strip().lower() in ("true", "1")
    raise DataError(f"{where}, field {key!r}: expected true or false, got {value!r}")


def _require(row: dict, keys: tuple[str, ...], where: str, kind: str) -> None:
    for k in keys:
        if k not in row or row[k] is None:
            raise DataError(f"{where}, field {k!r}: missing (a {kind} row has {', '.join(keys)})")


def parse_row(row: Any, where: str, ignore_columns: Collection[str] = ()) -> Record:
    """Validate one row and normalise it; raise :class:`DataError` naming ``where`` and the field.
    A column that SPEC §4 does not name is an error (a misspelt ``margin`` would otherwise be silently
    unused) unless it is in ``ignore_columns``, which are dropped."""
    if isinstance(row, DataError):  # the reader could not parse it
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if k not in ignore_columns}
    unknown = sorted(str(k) for k in set(row) - KNOWN_COLUMNS)
    if unknown:
        raise DataError(f"{where}, field {unknown[0]!r}: not a column dpolab reads (it reads "
                        f"{', '.join(sorted(KNOWN_COLUMNS))}); remove it, or pass --ignore-columns "
                        f"{','.join(unknown)} to drop it from every row")
    margin = _number(row, "margin", where) if row.get("margin") not in (None, "") else None
    if margin is None and row.get("score_chosen") not in (None, "") and row.get("score_rejected") not in (None, ""):
        margin = _number(row, "score_chosen", where) - _number(row, "score_rejected", where)
    formats = [name for name, keys in FORMAT_KEYS.items() if keys & set(row)]
    if len(formats) > 1:
        raise DataError(f"{where}: the row mixes keys of the {' and '.join(formats)} formats "
                        f"({', '.join(sorted(set(row) & set().union(*FORMAT_KEYS.values())))}); use one format")
    if "completions" in row:
        _require(row, ("prompt", "completions"), where, "ranked")
        answers = row["completions"]
        if not isinstance(answers, list) or len(answers) < 2:
            raise DataError(f"{where}, field 'completions': expected a list of at least 2 answers")
        tmp = {f"completions[{i}]": a for i, a in enumerate(answers)}
        completions = [_text(tmp, k, where) for k in tmp]
        if row.get("scores") is not None:
            scores = row["scores"]
            if not isinstance(scores, list) or len(scores) != len(answers):
                raise DataError(f"{where}, field 'scores': expected {len(answers)} numbers, one per completion")
            tmp = {f"scores[{i}]": s for i, s in enumerate(scores)}
            values = [_number(tmp, k, where) for k in tmp]
            order = sorted(range(len(values)), key=lambda i: -values[i])  # best first; stable for ties
            completions = [completions[i] for i in order]
        record = Record(where, "ranked", _text(row, "prompt", where), completions, False, margin=margin)
    elif "completion" in row or "label" in row:
        _require(row, ("prompt", "completion", "label"), where, "unpaired")
        record = Record(where, "unpaired", _text(row, "prompt", where), [_text(row, "completion", where)],
                        False, label=_bool(row, "label", where), margin=margin)
    else:
        _require(row, ("chosen", "rejected"), where, "preference")
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        if row.get("prompt") is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
        else:
            prompt = _text(row, "prompt", where)
        record = Record(where, "paired", prompt, [chosen, rejected], False, margin=margin)
    styles = {isinstance(t, list) for t in [record.prompt, *record.completions]}
    if len(styles) > 1:
        raise DataError(f"{where}: mixes plain text and message lists; use one or the other for every field")
    record.conversational = styles == {True}
    record.tools, record.chat_template_kwargs = _template_columns(row, where, record.conversational)
    return record


def _template_columns(row: dict, where: str, conversational: bool) -> tuple[list | None, dict | None]:
    """The ``tools`` and ``chat_template_kwargs`` columns (JSON text is accepted, as Parquet and CSV hold it)."""
    values = []
    for key, kind in (("tools", list), ("chat_template_kwargs", dict)):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            try:
                value = json.loads(value)
            except ValueError:
                raise DataError(f"{where}, field {key!r}: not valid JSON") from None
        if value in (None, ""):
            values.append(None)
            continue
        if not isinstance(value, kind) or (kind is list and not all(isinstance(t, dict) for t in value)):
            expected = "a list of tool definitions (objects)" if kind is list else "an object of template variables"
            raise DataError(f"{where}, field {key!r}: expected {expected}, got {json.dumps(value)[:80]}")
        if not conversational:
            raise DataError(f"{where}, field {key!r}: only conversational rows (lists of messages) go through "
                            "the chat template; plain-text rows cannot use it")
        values.append(value)
    reserved = sorted(set(values[1] or {}) & RESERVED_KWARGS)
    if reserved:
        raise DataError(f"{where}, field 'chat_template_kwargs': {reserved[0]!r} is set by dpolab itself "
                        "(tools go in their own column); remove it")
    return values[0], values[1]


def split_implicit_prompt(chosen: Text, rejected: Text, where: str) -> tuple[Text, Text, Text]:
    """Implicit prompt: the longest common prefix of chosen and rejected (characters, or whole messages)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, list) and n == 0:
        raise DataError(f"{where}: chosen and rejected share no leading messages, so no prompt can be inferred")
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}, field 'chosen': with no 'prompt', one of chosen/rejected must not be a prefix "
                        "of the other (the completion would be empty)")
    return chosen[:n], chosen[n:], rejected[n:]


def unpair_records(records: list[Record]) -> list[Record]:
    """Each pair becomes two unpaired rows: (prompt, chosen, desirable) and (prompt, rejected, undesirable)."""
    out = []
    for r in records:
        for completion, label in zip(r.completions[:2], (True, False)):
            out.append(Record(r.where, "unpaired", r.prompt, [completion], r.conversational, label=label,
                              tools=r.tools, chat_template_kwargs=r.chat_template_kwargs))
    return out


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the records (at least one), chosen by a seeded shuffle."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(records)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
