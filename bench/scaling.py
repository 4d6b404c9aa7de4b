"""How a dpolab training step's time and peak memory grow with sequence length and with vocabulary size.

    python bench/scaling.py                 # table + bench/results/scaling.png (~4 minutes)

Each point is one process: a randomly initialised Llama (hidden 128, 4 layers, tied embeddings, fp32) with
vocabulary V, a batch of 4 pairs whose prompts are 3/4 of the sequence length L and whose chosen and
rejected completions are L/4 each, a live reference, DPO, AdamW. Three ways to compute the same step:

- ``packed``: dpolab's default (prefix sharing, packing, LM head only at scored positions, chunked);
- ``padded``: dpolab's padded layout (prompt processed twice; LM head still only at scored positions);
- ``full logits``: the plain way, the reference line: padded rows, ``model(...).logits`` over every
  position, ``log_softmax``, gather; the [2B, L, V] fp32 logits exist at once (and their gradient).

Time: the mean of steps 2 and 3 (the first allocates the optimizer state). Memory: the resident-set
high-water mark during the steps, above the resident set just before them (the peak is reset with
/proc/self/clear_refs); weights, gradients, optimizer state and activations count too. ``logits MB`` is
the largest fp32 logits tensor a step builds: chunk × V for dpolab (chunk = min(scored tokens, 1024)),
2B × L × V for the full logits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = [128, 256, 512, 1024]
VOCABS = [8000, 32000, 64000, 128000]
METHODS = ["packed", "padded", "full logits"]
PAIRS = 4


def rss_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def measure(method: str, length: int, vocab: int, steps: int = 3, seed: int = 0) -> dict:
    """One point, in this process."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpolab.config import Config
    from dpolab.data.batch import make_batch
    from dpolab.data.records import Example
    from dpolab.models.logps import SequenceLogps
    from dpolab.models.reference import ModelReference
    from dpolab.objective import build_objective

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * length,
                         tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config)
    prompt, completion = 3 * length // 4, length // 4
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    examples = [Example(i, ids(prompt), [ids(completion), ids(completion)]) for i in range(PAIRS)]
    objective = build_objective(["sigmoid"], None, 0.1, vars(Config()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as dpolab.training.loop
    reference_model = copy.deepcopy(model).eval().requires_grad_(False)

    if method == "full logits":
        rows = make_batch(examples, 0, "padded")  # (2B, L − 1) right-padded; the same scored tokens as dpolab's
        inputs = dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask)

        def logps(m):
            logits = m(**inputs).logits.float()  # (2B, L, V): every position
            token = logits.log_softmax(-1).reshape(-1, vocab)[rows.score_pos, rows.score_tok]  # (M,)
            return torch.zeros(rows.num_sequences).index_add(0, rows.score_seq, token)  # (S,)

        policy, reference, batch = (lambda b: logps(model)), (lambda b: logps(reference_model).detach()), rows
        largest = rows.input_ids.numel() * vocab
    else:
        batch = make_batch(examples, 0, method)
        policy, reference = SequenceLogps(model), ModelReference(reference_model)
        largest = min(batch.score_pos.numel(), policy.chunk) * vocab
        policy = (lambda m: lambda b: m(**b.model_inputs()))(policy)

    times = []
    before = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = reference(batch)
        out = objective(policy(batch), ref, batch)
        out.losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return dict(method=method, length=length, vocab=vocab, step_s=statistics.median(times[1:]),
                peak_mb=(rss_kb("VmHWM") - before) / 1024, logits_mb=largest * 4 / 2 ** 20,
                tokens=int(batch.attention_mask.sum()), computed=batch.input_ids.numel())


def run(method: str, length: int, vocab: int, threads: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import others_busy

    deadline = time.monotonic() + 120
    while others_busy() > 0.25 and time.monotonic() < deadline:  # a shared machine: wait for quiet
        time.sleep(4)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--point", json.dumps([method, length, vocab])],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for col, (x, fixed, label) in enumerate((("length", ("vocab", 32000), "sequence length L (V = 32,000)"),
                                             ("vocab", ("length", 256), "vocabulary V (L = 256)"))):
        for method, colour in zip(METHODS, ("C0", "C1", "C3")):
            sel = sorted((p for p in points if p["method"] == method and p[fixed[0]] == fixed[1]),
                         key=lambda p: p[x])
            xs = [p[x] for p in sel]
            axes[0, col].plot(xs, [p["step_s"] for p in sel], "o-", color=colour, label=method)
            axes[1, col].plot(xs, [p["peak_mb"] for p in sel], "o-", color=colour,
                              label=f"{method}: peak above baseline")
            if method != "padded":  # dpolab's layouts share the chunked LM head: the same largest logits
                axes[1, col].plot(xs, [p["logits_mb"] for p in sel], "x:", color=colour,
                                  label=f"{'dpolab' if method == 'packed' else method}: largest logits tensor")
        for row, name in enumerate(("step time (s)", "memory (MB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"dpolab training step, {PAIRS} pairs, prompt = 3/4 of L, fp32, live reference")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--vocabs", type=int, nargs="+", default=VOCABS)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(*json.loads(args.point))))
        return
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.threads} threads")
    grid = [(L, 32000) for L in args.lengths] + [(256, V) for V in args.vocabs if V != 32000 or 256 not in args.lengths]
    points = []
    print(f"{'method':12} {'L':>5} {'V':>7} {'step s':>7} {'peak MB':>8} {'logits MB':>9} {'tokens':>7} "
          f"{'computed':>8}")
    for L, V in grid:
        for method in METHODS:
            p = run(method, L, V, args.threads)
            points.append(p)
            print(f"{method:12} {L:5} {V:7} {p['step_s']:7.3f} {p['peak_mb']:8.0f} {p['logits_mb']:9.1f} "
                  f"{p['tokens']:7} {p['computed']:8}", flush=True)
    for fixed, x, value in (("vocab", "length", 32000), ("length", "vocab", 256)):
        ends = {}
        for method in ("packed", "full logits"):
            sel = sorted((p for p in points if p["method"] == method and p[fixed] == value), key=lambda p: p[x])
            ends[method] = (sel[0], sel[-1]) if len(sel) > 1 else None
        if ends["packed"] and ends["full logits"]:
            (a, b), (c, d) = ends["packed"], ends["full logits"]
            mb = lambda k, p, q: f"{p[k]:.0f} → {q[k]:.0f} MB"  # noqa: E731
            print(f"{x} {a[x]} → {b[x]}: largest logits tensor dpolab {mb('logits_mb', a, b)}, full logits "
                  f"{mb('logits_mb', c, d)}; peak above baseline dpolab {mb('peak_mb', a, b)}, full logits "
                  f"{mb('peak_mb', c, d)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(points, indent=1))
    plot(points, RESULTS / "scaling.png")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; wrote "
          f"{RESULTS / 'scaling.png'}")


if __name__ == "__main__":
    main()
