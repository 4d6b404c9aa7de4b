"""Preference data: read files or datasets, validate every row, and normalise it to a :class:`Record`.

Accepted rows (SPEC §4): standard (``prompt``, ``chosen``, ``rejected`` strings), conversational (the same
keys holding lists of ``{role, content}`` messages), implicit prompt (``chosen`` and ``rejected`` only),
unpaired (``prompt``, ``completion``, ``label``) and ranked (``prompt``, ``completions`` best first, or
``completions`` with ``scores``). Optional columns: ``margin``, ``score_chosen``, ``score_rejected``; any other column is an error unless the
caller names it in ``ignore_columns`` (``--ignore-columns id,source``). A bad row raises :class:`DataError` naming the file, the line and the field, or is counted and dropped
when ``skip_invalid`` is set.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator

from dpolab.errors import DataError

log = logging.getLogger("dpolab")

Text = str | list[dict]  # plain text, or a list of {role, content} messages
FORMAT_KEYS = {"paired": {"chosen", "rejected"}, "unpaired": {"completion", "label"},
               "ranked": {"completions", "scores"}}
KNOWN_COLUMNS = {"prompt", "chosen", "rejected", "completion", "label", "completions", "scores", "margin",
                 "score_chosen", "score_rejected"}


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


# ---------------------------------------------------------------- reading


def iter_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from a file, a saved dataset folder or a hub dataset (``name`` or ``name:split``)."""
    path = Path(spec)
    if path.is_dir():
        yield from _iter_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if path.exists() or suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if not path.is_file():
            raise DataError(f"{spec}: no such file")
        readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}
        if suffix not in readers:
            raise DataError(f"{spec}: unknown data format {suffix!r}; use .jsonl, .json, .csv or .parquet")
        yield from readers[suffix](path)
        return
    yield from _iter_hub_dataset(spec)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: this is a binary file, not {path.suffix[1:].upper()} text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: invalid UTF-8 (byte {data[e.start]:#04x}); "
                        "save the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = DataError(f"{where}: broken JSON ({e.msg} at column {e.colno})")  # skippable, like any bad row
        yield where, row


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: broken JSON ({e.msg} at column {e.colno})") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows (or {{\"data\": [...]}})")
    lines = _item_lines(text, under_data=not text.lstrip().startswith("["))
    for i, row in enumerate(rows):
        yield (f"{path}, line {lines[i]} (item {i})" if lines and len(lines) == len(rows) else f"{path}, item {i}"), row


def _item_lines(text: str, under_data: bool) -> list[int] | None:
    """Line numbers of the rows of a .json file that ``json.loads`` accepted: the items of the top-level list,
    or of the list under the top-level ``"data"`` key (the last one, as ``json.loads`` keeps). The file is
    walked value by value with the JSON decoder, so brackets inside strings never mislead it."""
    decoder, n = json.JSONDecoder(), len(text)

    def skip(pos: int, sep: str = "") -> int:  # past whitespace, then one optional separator and whitespace
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if sep and pos < n and text[pos] == sep:
            pos = skip(pos + 1)
        return pos

    def members(pos: int, close: str):  # positions of the values of the container opening at ``pos``
        pos = skip(pos + 1)
        while text[pos] != close:
            key = None
            if close == "}":
                key, pos = decoder.raw_decode(text, pos)
                pos = skip(pos, ":")
            yield key, pos
            _, pos = decoder.raw_decode(text, pos)
            pos = skip(pos, ",")

    try:
        start = skip(0)
        if under_data:
            start = [pos for key, pos in members(start, "}") if key == "data"][-1]
        lines, line, last = [], 1, 0
        for _, pos in members(start, "]"):
            line, last = line + text.count("\n", last, pos), pos
            lines.append(line)
        return lines
    except (ValueError, IndexError):  # cannot happen for text json.loads accepted; then name items only
        return None


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    for row in reader:
        if None in row:
            raise DataError(f"{path}, line {reader.line_num}: more values than the header has columns")
        yield f"{path}, line {reader.line_num}", dict(row)


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}, row {i}", row


def _iter_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a dataset with splits {list(ds)} and no 'train' split")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path}, row {i}", row


def _iter_hub_dataset(spec: str) -> Iterator[tuple[str, Any]]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise DataError(f"{spec}: not a data file, a dataset folder, or a loadable hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for i, row in enumerate(ds):
        yield f"{spec}, row {i}", row


# ---------------------------------------------------------------- validation


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
    return record


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


def load_records(spec: str, skip_invalid: bool = False, ignore_columns: Collection[str] = ()) -> list[Record]:
    """Read and validate every row of ``spec``; stop at the first bad row unless ``skip_invalid``.
    ``ignore_columns``: extra columns to drop from every row (any other unknown column is an error)."""
    records: list[Record] = []
    skipped = 0
    for where, row in iter_rows(spec):
        try:
            record = parse_row(row, where, ignore_columns)
            if records and record.kind != records[0].kind:
                raise DataError(f"{where}: a {record.kind} row in a file of {records[0].kind} rows "
                                f"(the first at {records[0].where}); use one format per file")
            if records and record.conversational != records[0].conversational:
                raise DataError(f"{where}: mixes conversational and plain-text rows in one file")
            k = len(records[0].completions) if records else len(record.completions)
            if record.kind == "ranked" and len(record.completions) != k:
                raise DataError(f"{where}, field 'completions': {len(record.completions)} answers, but the first "
                                f"ranked row ({records[0].where}) has {k}; every ranked row needs the same number")
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} (pass --skip-invalid to drop and count bad rows)") from None
            skipped += 1
            if skipped <= 3:
                log.warning("skipping invalid row: %s", e)
            continue
        records.append(record)
    if skipped:
        log.warning("%s: skipped %d invalid row(s), kept %d", spec, skipped, len(records))
    if not records:
        raise DataError(f"{spec}: no usable rows" + (f" ({skipped} invalid)" if skipped else ""))
    same = sum(1 for r in records if r.kind == "paired" and r.completions[0] == r.completions[1])
    if same:
        log.warning("%s: %d row(s) have chosen equal to rejected; they carry no preference signal", spec, same)
    return records


def unpair_records(records: list[Record]) -> list[Record]:
    """Each pair becomes two unpaired rows: (prompt, chosen, desirable) and (prompt, rejected, undesirable)."""
    out = []
    for r in records:
        for completion, label in zip(r.completions[:2], (True, False)):
            out.append(Record(r.where, "unpaired", r.prompt, [completion], r.conversational, label=label))
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
