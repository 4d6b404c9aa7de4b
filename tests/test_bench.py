"""The benchmark harness (bench/harness.py) cannot rot: at a tiny size, dpolab and TRL 1.16's DPOTrainer,
run by the harness on the same examples in the same order, agree on the tokens and on the losses."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import harness  # noqa: E402

pytestmark = pytest.mark.slow  # make test-fast skips it; make test runs it


def test_harness_dpolab_and_trl_agree(tmp_path):
    ds = harness.prepare("bundled", tmp_path, pairs=16, batch_size=8)
    trl = harness.run_trl(dict(label="trl", framework="trl", dataset=ds))
    ours = harness.run_dpolab(dict(label="dpolab", framework="dpolab", dataset=ds))
    assert trl["tokens"] == harness.dpolab_tokens(ds, ds["trl_data"])  # identical token ids
    assert ours["steps"] == trl["steps"] == 2
    # step 1: policy = reference, so the DPO loss is ln 2 for both; step 2 follows one identical update
    assert abs(ours["losses"][0] - math.log(2)) < 1e-6 and abs(trl["losses"][0] - math.log(2)) < 1e-6
    assert abs(ours["losses"][1] - trl["losses"][1]) < 1e-5
    assert abs(ours["losses"][1] - math.log(2)) > 1e-3  # the second step is not trivially ln 2 again
    assert ours["wall_s"] > 0 and ours["peak_rss_mb"] > 0
