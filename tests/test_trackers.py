"""--report-to through Accelerate's tracking API: wandb (offline) and MLflow (a local file store) receive the
metrics of metrics.jsonl under the same names, read back from what each wrote; no network."""

import glob
import json
import struct

import pytest

import dpolab
from dpolab.evaluation.metrics import read_metrics
from tests.conftest import preference_rows, write_jsonl

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_history(path: str) -> dict[int, dict]:
    """{step: values} from an offline run's .wandb file, read without wandb's own code: a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type:
    1 full, 2 first, 3 middle, 4 last), joined into protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, rows = 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and pending:
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                rows[row["_step"]] = row
    return rows


@pytest.mark.slow
def test_wandb_offline_and_mlflow_local_store_receive_the_metrics_of_metrics_jsonl(tiny_model, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for opt-in use
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(40))
    out = tmp_path / "run"
    dpolab.train(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=8, max_steps=3,
                 learning_rate=1e-3, eval_split=0.2, eval_every=2, save_every=0, progress=False,
                 report_to="tensorboard,wandb,mlflow")
    logged = read_metrics(out / "metrics.jsonl")
    expected = {(row["step"], k): v for row in logged for k, v in row.items() if k != "step"}
    assert {"eval/rewards/accuracies", "loss"} <= {k for _, k in expected}

    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)  # wandb merges the values of one step into one row
    assert {(s, k): history[s][k] for s, k in expected} == pytest.approx(expected, rel=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dpolab").experiment_id])
    assert run.data.params["beta"] == "0.1" and run.info.run_name == "run"
    got = {(m.step, k): m.value for k in {k for _, k in expected} for m in client.get_metric_history(run.info.run_id, k)}
    assert got == pytest.approx(expected, rel=1e-6)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_refused_in_one_paragraph(tiny_model, tmp_path, monkeypatch):
    from dpolab import builder

    real = builder.importlib.util.find_spec
    monkeypatch.setattr(builder.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(16))
    with pytest.raises(dpolab.ConfigError, match=r"report_to: wandb is not installed.*pip install wandb"):
        dpolab.train(model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                     report_to="wandb")
    assert not (tmp_path / "run").exists()
    with pytest.raises(dpolab.ConfigError, match="report_to: unknown tracker neptune"):
        dpolab.load_config(overrides={"report_to": "tensorboard,neptune"})
