"""The GPU half of bench/gpu_check.sh: dpolab against TRL 1.16 in bf16 on one CUDA GPU, and FlexAttention's
compiles.

    python bench/gpu_bench.py --tokenizer .gpu/smollm2 --out bench/results     # run by bench/gpu_check.sh

Two models, both with SmolLM2's tokenizer (its files are small enough to travel to the GPU machine; the
weights, 538 MB, are not, and a step's speed does not depend on their values):
- ``smollm2``: SmolLM2-135M-Instruct's own config (Llama, 30 layers, hidden 576, vocabulary 49,152),
  randomly initialised;
- ``llama-0.5b``: a Llama of 0.48B parameters (24 layers, hidden 1280, GQA 20/4 heads), randomly initialised.
Data: pairs of ~1k tokens (prompts ~510, answers ~255, chat rows as bench/real_model.py builds them), 64
pairs, batch 8. Configurations: dpolab bf16 with SDPA (its default layout, packed), with FlexAttention
(its BlockMask), with flash_attention_2 and ``--layout padded`` where the package is installed; TRL bf16 with
its defaults and with ``precompute_ref_log_probs``. Each run is a fresh process (bench/harness.py); the table
gives pairs/s, tokens/s, peak GPU memory and MFU against the bf16 matmul peak measured in the same run.

Then FlexAttention's compiles: one forward and backward at each of several row lengths, timed, with the
number of times dynamo compiled; with dpolab's bucketing (rows padded to a multiple of 128) lengths inside
one bucket cost no new compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
import harness as H  # noqa: E402
import real_model as R  # noqa: E402

LLAMA_05B = dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=20,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(name: str, tokenizer_dir: Path, root: Path) -> Path:
    """A randomly initialised model folder with the carried tokenizer (seeded)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = root / name
    if (out / "model.safetensors").is_file():
        return out
    config = LlamaConfig.from_pretrained(tokenizer_dir)
    if name == "llama-0.5b":
        config = LlamaConfig(**(config.to_dict() | LLAMA_05B))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def configs() -> list[tuple[str, str, dict]]:
    out = [("dpolab bf16 (sdpa, packed)", "dpolab", {"bf16": True}),
           ("dpolab bf16 flex_attention", "dpolab", {"bf16": True, "attn_implementation": "flex_attention"}),
           ("TRL bf16 (defaults)", "trl", {"bf16": True, "use_cpu": False}),
           ("TRL bf16 precompute_ref_log_probs", "trl", {"bf16": True, "use_cpu": False,
                                                         "precompute_ref_log_probs": True})]
    if importlib.util.find_spec("flash_attn"):
        out.insert(2, ("dpolab bf16 flash_attention_2 --layout padded", "dpolab",
                       {"bf16": True, "attn_implementation": "flash_attention_2", "layout": "padded"}))
    return out


def flex_compiles(model_dir: Path, lengths: list[int]) -> list[dict]:
    """One forward + backward of dpolab's log-probs under FlexAttention at each row length: seconds, and
    dynamo's compile count after it."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from dpolab.data.batch import make_batch
    from dpolab.data.records import Example
    from dpolab.models.logps import SequenceLogps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="flex_attention").cuda()
    logps, rows = SequenceLogps(model), []
    for T in lengths:
        p = T // 2
        ex = Example(0, list(range(10, 10 + p)), [list(range(20, 20 + (T - p) // 2))] * 2)
        batch = make_batch([ex] * 4, 0, "packed").to("cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logps(**batch.model_inputs()).sum().backward()
        torch.cuda.synchronize()
        rows.append({"row_tokens": int(batch.input_ids.shape[1]), "seconds": time.perf_counter() - t0,
                     "compiles": int(counters["stats"]["unique_graphs"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2's config and tokenizer files")
    parser.add_argument("--out", type=Path, default=H.RESULTS)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--models", default="smollm2,llama-0.5b")
    args = parser.parse_args()
    import torch

    peak = flops.matmul_peak(n=8192, device="cuda", dtype="bfloat16")
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; torch {torch.__version__}",
          flush=True)
    saved = {"device": torch.cuda.get_device_name(), "peak_flops": peak, "models": {}}
    work = Path("/tmp/dpolab-gpu")
    for name in args.models.split(","):
        model = build_model(name, args.tokenizer, work)
        ds = R.prepare("gpu-1k", args.pairs, model=model, tag=name)
        ds["tokens"] = R.token_counts(ds)
        counts = flops.model_counts(str(model))
        per_pair = ds["tokens"]["prompt"] + 2 * ds["tokens"]["answer"]
        print(f"\n## {name}: {counts['total'] / 1e6:.0f}M parameters, {args.pairs} pairs of {per_pair:.0f} tokens, "
              f"batch {ds['batch_size']}, bf16")
        runs = []
        for label, framework, options in configs():
            spec = dict(label=label, framework=framework, options=options, dataset=ds)
            try:
                r = H.run_once(spec, args.out / "logs") | {"options": options}
            except RuntimeError as e:
                print(f"{label:44} failed: {str(e).splitlines()[-1]}", flush=True)
                continue
            m = flops.mfu(r, counts, peak)["mfu"] if framework == "dpolab" else float("nan")
            runs.append(r | {"mfu": m})
            print(f"{label:44} {r['pairs_per_s']:7.2f} pairs/s {r['pairs_per_s'] * per_pair:8.0f} tokens/s "
                  f"{r['peak_cuda_mb'] or 0:8.0f} MB GPU  MFU {m:.1%}  first loss {r['losses'][0]:.5f}", flush=True)
        saved["models"][name] = {"dataset": ds, "runs": runs}
    model = build_model("smollm2", args.tokenizer, work)
    saved["flex"] = flex_compiles(model, [200, 230, 250, 300, 380, 500])
    print("\nFlexAttention, one forward + backward per row length (bucketed to multiples of 128):")
    for row in saved["flex"]:
        print(f"  row of {row['row_tokens']:4} tokens: {row['seconds']:6.2f} s, graphs compiled so far {row['compiles']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(saved, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
