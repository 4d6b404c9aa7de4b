"""Model FLOP utilisation: the FLOPs a dpolab training step does per second against the machine's fp32
matmul peak.

What is counted, per optimizer step (from the work a run records: real tokens and scored tokens):
- the decoder's matmul parameters N (every weight of the decoder layers; not the embedding, which is a
  lookup): 6·N FLOPs per real token for the policy's forward and backward, 2·N for the reference's forward
  (a live reference only; a precomputed one costs nothing per step). A real token is a non-padding token;
  a prompt shared by its completions counts once, because dpolab processes it once.
- the LM head (H·V weights) only where it is applied, at the scored positions: 6·H·V per scored token for
  the policy, 2·H·V for a live reference.
- not counted: attention scores (2·T·H per token and layer for a row of T tokens; about 8% of the decoder's
  FLOPs for the synthetic set's rows of ~130 tokens), norms, activations, softmax, the optimizer.
The peak is the best of ten ``torch.matmul`` calls on 2048 × 2048 fp32 matrices, with the same threads.

    python bench/flops.py --threads 2          # the peak, and the MFU of the last bench/vs_trl.py results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 10, device: str = "cpu",
                dtype: str = "float32") -> float:
    """Best matmul rate in FLOP/s (2·n³ per product): fp32 on the CPU; on a GPU, e.g. bf16 at n = 8192."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def model_counts(model_dir: str) -> dict:
    """N (decoder matmul parameters), H·V (the LM head) of a causal LM, from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in model.get_decoder().parameters() if p is not embed and p.dim() >= 2)
    return {"decoder": decoder, "head": head.numel(), "total": sum(p.numel() for p in model.parameters())}


def step_flops(tokens: int, scored: int, counts: dict, live_reference: bool) -> float:
    """FLOPs of one training step as the module docstring counts them."""
    per = 6 + (2 if live_reference else 0)
    return per * (counts["decoder"] * tokens + counts["head"] * scored)


def mfu(result: dict, counts: dict, peak: float) -> dict:
    """Achieved FLOP/s of a dpolab run's steady-state steps and its share of ``peak``."""
    live = not result.get("options", {}).get("precompute_ref", False)
    w = result["warmup_steps"]
    flops = sum(step_flops(t, s, counts, live) for t, s, _ in result["work"][w:])
    seconds = (result["steps"] - w) * result["step_s"]
    return {"flops_per_step": flops / (result["steps"] - w), "achieved": flops / seconds, "mfu": flops / seconds / peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS / "vs_trl.json"))
    args = parser.parse_args()
    peak = matmul_peak(args.threads)
    print(f"fp32 matmul peak, {args.threads} threads: {peak / 1e9:.1f} GFLOP/s")
    path = Path(args.results)
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    achieved: dict[tuple[str, str], list[float]] = {}
    for row in saved["runs"]:
        if row["framework"] == "dpolab":
            counts = model_counts(saved["datasets"][row["dataset"]]["model"])
            achieved.setdefault((row["dataset"], row["label"]), []).append(mfu(row, counts, peak)["achieved"])
    print("dpolab's model FLOPs per second in steady-state training steps (median over the runs):")
    for (dataset, label), values in achieved.items():
        value = statistics.median(values)
        print(f"{dataset:9} {label:40} {value / 1e9:6.1f} GFLOP/s  MFU {value / peak:.1%}")


if __name__ == "__main__":
    main()
