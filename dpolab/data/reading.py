"""Reading rows: data files (JSONL, JSON, CSV, Parquet), a dataset saved with ``save_to_disk``, or a hub
dataset (``name`` or ``name:split``). Each row comes with where it was read (file and line, or row index),
so a bad row is reported there. A row the reader cannot parse is yielded as a :class:`DataError`, so that
``--skip-invalid`` can drop it like any other bad row. :func:`load_records` reads and validates every row.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Collection, Iterator

from dpolab.data.records import Record, parse_row
from dpolab.errors import DataError

log = logging.getLogger("dpolab")


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
    import pyarrow.parquet as pq  # deferred: a heavy import, needed for Parquet only

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}, row {i}", row


def _iter_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets  # deferred: a heavy import, needed for dataset folders and the hub only

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
    import datasets  # deferred: a heavy import, needed for dataset folders and the hub only

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise DataError(f"{spec}: not a data file, a dataset folder, or a loadable hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for i, row in enumerate(ds):
        yield f"{spec}, row {i}", row


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
