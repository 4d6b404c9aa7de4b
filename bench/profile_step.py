"""Where a training step's time goes, dpolab's and TRL's, part by part (milliseconds per step, median over
the steps after the first five), on a benchmark dataset.

    python bench/profile_step.py --dataset bundled --threads 2

dpolab: the parts of :func:`dpolab.training.step.train_step` run one by one on the same batches (collate in the
layout, policy forward, reference forward, loss, backward, clipping, AdamW). TRL 1.16: its ``DPOTrainer`` as
bench/harness.py runs it, timed by wrapping the reference model's ``forward``, ``compute_loss`` (policy and
reference forward, loss) and ``training_step`` (the rest of it is the backward), with the optimizer step
from the ``on_pre_optimizer_step`` / ``on_optimizer_step`` callbacks and the data loading as what remains
between two steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402


def dpolab_parts(ds: dict, layout: str, precompute: bool, steps: int) -> dict[str, list[float]]:
    import torch

    from dpolab.config import Config
    from dpolab.data.batch import make_batch
    from dpolab.data.reading import load_records
    from dpolab.data.tokenization import tokenize_records
    from dpolab.models.loading import load_model, load_tokenizer
    from dpolab.models.logps import SequenceLogps
    from dpolab.models.reference import ModelReference
    from dpolab.objective import build_objective

    tok, model = load_tokenizer(ds["model"]), load_model(ds["model"])
    examples = tokenize_records(load_records(ds["trl_data"]), tok, ds["max_length"], ds["max_prompt_length"])
    policy, reference = SequenceLogps(model), ModelReference(copy.deepcopy(model))
    objective = build_objective(["sigmoid"], None, ds["beta"], vars(Config()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=ds["learning_rate"], fused=True)  # as dpolab.training.loop
    B, parts = ds["batch_size"], defaultdict(list)
    for step in range(min(steps, len(examples) // B)):
        t = t0 = time.perf_counter()

        def mark(name):
            nonlocal t
            now = time.perf_counter()
            parts[name].append(now - t)
            t = now

        batch = make_batch(examples[step * B: (step + 1) * B], tok.pad_token_id, layout)
        mark("collate")
        policy_logps = policy(**batch.model_inputs())
        mark("policy forward")
        ref_logps = torch.zeros_like(policy_logps) if precompute else reference(batch)
        mark("reference forward")
        loss = objective(policy_logps, ref_logps, batch).losses.sum() / B
        mark("loss")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mark("clip")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        parts["step"].append(time.perf_counter() - t0)
    return parts


def trl_parts(ds: dict, precompute: bool) -> dict[str, list[float]]:
    import json
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ev: dict[str, list[float]] = defaultdict(list)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            ev["begin"].append(time.perf_counter())

        def on_pre_optimizer_step(self, *a, **k):
            ev["pre_opt"].append(time.perf_counter())

        def on_optimizer_step(self, *a, **k):
            ev["opt"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ev["end"].append(time.perf_counter())

    def timed(name, f):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            ev[name].append(time.perf_counter() - t)
            return out
        return wrapper

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=ds["batch_size"], num_train_epochs=1,
                         learning_rate=ds["learning_rate"], beta=ds["beta"], max_length=ds["max_length"],
                         lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False, use_cpu=True,
                         report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                         train_sampling_strategy="sequential", precompute_ref_log_probs=precompute)
        rows = [json.loads(line) for line in Path(ds["trl_data"]).read_text().splitlines()]
        trainer = DPOTrainer(model=ds["model"], args=args, train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
        if trainer.ref_model is not None:  # called inline by compute_loss
            trainer.ref_model.forward = timed("ref", trainer.ref_model.forward)
        trainer.compute_loss = timed("loss", trainer.compute_loss)
        trainer.training_step = timed("training_step", trainer.training_step)
        trainer.train()
    n = len(ev["end"])
    ref = ev["ref"][-n:] if not precompute else [0.0] * n
    parts = {"data loading, collate": [b - e for b, e in zip(ev["begin"][1:], ev["end"])],
             "policy forward, loss": [lo - r for lo, r in zip(ev["loss"], ref)],
             "reference forward": ref,
             "backward": [s - lo for s, lo in zip(ev["training_step"], ev["loss"])],
             "clip": [p - b - s for p, b, s in zip(ev["pre_opt"], ev["begin"], ev["training_step"])],
             "optimizer, rest": [e - p for e, p in zip(ev["end"], ev["pre_opt"])],
             "step": [e2 - e1 for e1, e2 in zip(ev["end"], ev["end"][1:])]}
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(H.DATASETS), default="bundled")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    ds = H.prepare(args.dataset)
    steps = ds["pairs"] // ds["batch_size"]
    rows = {"dpolab packed": dpolab_parts(ds, "packed", False, steps),
            "dpolab packed, precomputed ref": dpolab_parts(ds, "packed", True, steps),
            "dpolab padded": dpolab_parts(ds, "padded", False, steps),
            "TRL": trl_parts(ds, False), "TRL precompute": trl_parts(ds, True)}
    skip = min(5, steps // 3)
    print(f"{args.dataset}, batch {ds['batch_size']}, {args.threads} threads: ms per step (median of steps "
          f"{skip + 1}–{steps})")
    for name, parts in rows.items():
        print(f"{name:32} " + "  ".join(f"{k} {statistics.median(v[skip:]) * 1000:.1f}" for k, v in parts.items()
                                         if v[skip:]))


if __name__ == "__main__":
    main()
