"""Fuzzing the loaders: any bytes, any JSON value, any CSV text gives records or a DataError, never
another exception and never a hang."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpolab.data.reading import load_records
from dpolab.data.records import parse_row
from dpolab.errors import DataError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["prompt", "chosen", "rejected", "completion", "label", "completions", "scores", "margin",
                        "role", "content", "x"])
rows = st.dictionaries(keys, json_values | st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", 3]), "content": st.text(max_size=5) | st.none()}), max_size=2),
    max_size=5)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(rows)
def test_parse_row_accepts_or_explains(row):
    try:
        record = parse_row(row, "fuzz, line 1")
    except DataError as e:
        assert str(e).startswith("fuzz, line 1")
    else:
        assert record.kind in ("paired", "unpaired", "ranked") and record.completions


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_any_bytes_in_any_file_type(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(data)
    try:
        load_records(str(path), skip_invalid=bool(len(data) % 2))
    except DataError as e:
        assert str(path) in str(e)


@FUZZ
@given(st.lists(rows, min_size=1, max_size=5))
def test_jsonl_of_random_rows(tmp_path_factory, batch):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in batch))
    try:
        records = load_records(str(path))
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert len(records) == len(batch)
