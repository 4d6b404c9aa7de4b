"""The benchmark harness: the two datasets, one training run of dpolab or of TRL 1.16's DPOTrainer in a
fresh process, and what each run reports.

A run is described by a plain dict (a *spec*) and executed by :func:`run` in its own subprocess, so that
its peak memory (``ru_maxrss``, the resident-set high-water mark) is its own and nothing is shared or
warm between runs. The same functions run in-process for the test (tests/test_bench.py).

What a run measures (the same for both frameworks):
- ``wall_s``: one epoch start to finish, from before ``import torch`` to the trained model written to disk:
  imports, tokenizer and model loading (TRL: policy and reference), tokenisation, reference precompute when
  used, training, saving the final model (dpolab also writes metrics, summary and plots; TRL nothing else).
- ``pairs_per_s``: steady state: ``batch_size × (steps after the first w)`` / the time from the end of step
  w to the end of the last step, w = max(2, steps // 10). Each interval holds everything the framework does
  between two optimizer steps (data loading and collation, forward, backward, step, its own bookkeeping).
- ``losses``: the training loss of every step (the mean over the batch, before the optimizer step).
- ``peak_rss_mb``: the process's resident-set high-water mark.

Both frameworks see the same examples in the same order: the data file is written in dpolab's epoch order
(:func:`dpolab.training.step.step_examples`) for TRL, which reads it with ``train_sampling_strategy=
"sequential"``; and the same token ids (checked: :func:`check_same_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "dpolab" / "assets" / "default"
RESULTS = ROOT / "bench" / "results"
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
       "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}

# The two datasets of issue 5. Training settings are the same for both frameworks.
DATASETS = {
    # The bundled 0.86M-parameter Llama (character tokenizer, 88 tokens) and its 2,085 addition pairs,
    # with the bundled recipe's β, learning rate and batch size; the first 65 × 32 pairs: one epoch of 65 steps.
    "bundled": dict(pairs=2080, repeats=3, batch_size=32, beta=2.0, learning_rate=2e-4, max_length=32,
                    max_prompt_length=16),
    # A 4.95M-parameter Llama with a 32,000-word vocabulary; prompts of 80–112 tokens (with BOS),
    # completions of 8–24 words + EOS: every prompt at least 3× each of its completions; 10 steps of 8.
    "synthetic": dict(pairs=80, repeats=2, batch_size=8, beta=0.1, learning_rate=1e-4, max_length=256,
                      max_prompt_length=192, vocab=32000, hidden=128, layers=4, prompt=(79, 111), completion=(8, 24)),
}


# ---------------------------------------------------------------- data


def prepare(name: str, root: Path = RESULTS / "data", pairs: int | None = None, batch_size: int | None = None,
            seed: int = 42) -> dict:
    """Write the dataset's model and data files under ``root`` (once; seeded) and return the paths and the
    training settings. ``pairs`` and ``batch_size`` override the dataset's (pairs: a multiple of the batch)."""
    settings = dict(DATASETS[name])
    pairs = pairs or settings.pop("pairs")
    settings.pop("pairs", None)
    settings["batch_size"] = batch_size or settings["batch_size"]
    out = Path(root) / f"{name}-{pairs}-{settings['batch_size']}"
    model = out / "model" if name == "synthetic" else BUNDLED / "model"
    if not (out / "trl.jsonl").exists():
        out.mkdir(parents=True, exist_ok=True)
        if name == "synthetic":
            rows = build_synthetic(out / "model", pairs, settings, seed)
        else:
            rows = [json.loads(line) for line in (BUNDLED / "train.jsonl").read_text().splitlines()][:pairs]
            rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        write_jsonl(out / "data.jsonl", rows)
        write_jsonl(out / "trl.jsonl", [rows[i] for i in epoch_order(len(rows), settings["batch_size"], seed)])
    return dict(name=name, model=str(model), data=str(out / "data.jsonl"), trl_data=str(out / "trl.jsonl"),
                pairs=pairs, seed=seed, **{k: settings[k] for k in ("batch_size", "beta", "learning_rate",
                                                                      "max_length", "max_prompt_length", "repeats")})


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def epoch_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The dataset indices dpolab trains on in its first epoch, in order."""
    from dpolab.training.step import step_examples

    return [i for step in range(n // batch_size) for i in step_examples(n, step, batch_size, seed)]


def build_synthetic(model_dir: Path, pairs: int, s: dict, seed: int) -> list[dict]:
    """A word-level tokenizer of ``s['vocab']`` entries (built locally with ``tokenizers``), a randomly
    initialised Llama on it, and ``pairs`` rows of Zipf-distributed words. Words are whole tokens and
    completions start with a space, so prompt and prompt + completion tokenise with a clean boundary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    letters = "bcdfghjklmnprstvwz"
    vowels = "aeiou"
    words = []
    for i in range(s["vocab"] - len(specials)):  # unique pronounceable words: base-90 syllables of i
        w, j = "", i
        while True:
            w += letters[j % 18] + vowels[(j // 18) % 5]
            j //= 90
            if j == 0:
                break
        words.append(w)
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=3 * s["hidden"],
                         num_hidden_layers=s["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(model_dir, safe_serialization=True)

    rng = random.Random(seed)
    cum, total = [], 0.0
    for r in range(len(words)):  # Zipf(1) word frequencies
        total += 1.0 / (r + 1)
        cum.append(total)
    text = lambda n: " ".join(rng.choices(words, cum_weights=cum, k=n))  # noqa: E731
    rows = []
    for _ in range(pairs):
        prompt = text(rng.randint(*s["prompt"]))
        rows.append({"prompt": prompt, "chosen": " " + text(rng.randint(*s["completion"])),
                     "rejected": " " + text(rng.randint(*s["completion"]))})
    return rows


def token_digest(triples) -> str:
    """Digest of (prompt_ids, chosen_ids, rejected_ids) for every row, in order."""
    h = hashlib.sha256()
    for t in triples:
        h.update(json.dumps([list(map(int, x)) for x in t]).encode())
    return h.hexdigest()[:16]


def dpolab_tokens(ds: dict, path: str) -> str:
    """The digest of dpolab's tokenisation of the rows of ``path``."""
    from dpolab.data.reading import load_records
    from dpolab.data.tokenization import tokenize_records
    from dpolab.models.loading import load_tokenizer

    examples = tokenize_records(load_records(path), load_tokenizer(ds["model"]), ds["max_length"],
                                ds["max_prompt_length"])
    return token_digest((ex.prompt_ids, *ex.completion_ids) for ex in examples)


# ---------------------------------------------------------------- the runs (each in a fresh process)


def run_dpolab(spec: dict) -> dict:
    """One epoch of ``dpolab.train`` with its defaults (layout, logits chunk), plus the spec's settings."""
    t_start = time.perf_counter()
    import torch

    threads(spec)
    import dpolab
    import dpolab.training.loop as T

    ds, marks, losses, work = spec["dataset"], [], [], []
    inner = T.train_step

    def timed_step(policy, reference, objective, micro_batches, *args, **kwargs):
        stats = inner(policy, reference, objective, micro_batches, *args, **kwargs)
        marks.append(time.perf_counter())
        losses.append(stats["loss"])
        work.append([sum(b.num_tokens for b in micro_batches), sum(int(b.score_pos.numel()) for b in micro_batches),
                     sum(b.input_ids.numel() for b in micro_batches)])
        return stats

    T.train_step = timed_step
    try:
        with tempfile.TemporaryDirectory() as out:
            dpolab.train(model=ds["model"], data=ds["data"], output_dir=out, eval_split=0.0, epochs=1,
                         batch_size=ds["batch_size"], beta=ds["beta"], learning_rate=ds["learning_rate"],
                         lr_scheduler="constant", warmup_ratio=0.0, max_length=ds["max_length"],
                         max_prompt_length=ds["max_prompt_length"], seed=ds["seed"], save_every=0, progress=False,
                         **spec.get("options", {}))
            wall = time.perf_counter() - t_start
    finally:
        T.train_step = inner
    return report(spec, wall, marks, losses, ds["batch_size"], work=work, tokens=None, threads=torch.get_num_threads())


def run_trl(spec: dict) -> dict:
    """One epoch of TRL 1.16's ``DPOTrainer`` with its defaults, but fp32 and no gradient checkpointing
    (as dpolab; TRL's defaults turn both on), no evaluation, saving, logging or progress bar, on the CPU,
    with a reference model (TRL's default) or ``precompute_ref_log_probs``; option ``lora_r``: LoRA adapters
    through peft (α = 2r on every linear layer, as dpolab's ``--lora-r r --lora-alpha 2r``)."""
    t_start = time.perf_counter()
    import torch

    threads(spec)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ds, marks, losses = spec["dataset"], [], []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    options = dict(spec.get("options", {}))
    lora_r = options.pop("lora_r", 0)  # LoRA through peft, as TRL takes it: adapters on every linear layer
    peft_config = None
    if lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**(dict(output_dir=out, per_device_train_batch_size=ds["batch_size"], num_train_epochs=1,
                                 learning_rate=ds["learning_rate"], beta=ds["beta"], max_length=ds["max_length"],
                                 lr_scheduler_type="constant", warmup_steps=0, bf16=False,
                                 gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                                 eval_strategy="no", logging_strategy="no", disable_tqdm=True, seed=ds["seed"],
                                 train_sampling_strategy="sequential") | options))
        rows = [json.loads(line) for line in Path(ds["trl_data"]).read_text().splitlines()]
        trainer = DPOTrainer(model=ds["model"], args=args, train_dataset=Dataset.from_list(rows),
                             callbacks=[Marks()], peft_config=peft_config)
        compute_loss = trainer.compute_loss

        def recorded(*a, **k):
            loss = compute_loss(*a, **k)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

        trainer.compute_loss = recorded
        trainer.train()
        trainer.save_model(out)
        wall = time.perf_counter() - t_start
        data = trainer.train_dataset
        tokens = token_digest(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    return report(spec, wall, marks, losses, ds["batch_size"], tokens=tokens, threads=torch.get_num_threads())


def threads(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def peak_cuda_mb() -> float | None:
    """The GPU's high-water mark of allocated memory, when the run used one."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def report(spec: dict, wall: float, marks: list[float], losses: list[float], batch_size: int, **extra) -> dict:
    n = len(marks)
    w = max(2, n // 10) if n >= 3 else 0  # three steps: the third alone
    steady = batch_size * (n - w) / (marks[-1] - marks[w - 1]) if n > w and w > 0 else float("nan")
    return dict(label=spec["label"], framework=spec["framework"], dataset=spec["dataset"]["name"], wall_s=wall,
                steps=n, warmup_steps=w, pairs_per_s=steady, step_s=batch_size / steady, losses=losses,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_cuda_mb=peak_cuda_mb(),
                **extra)


WORKERS = {"dpolab": run_dpolab, "trl": run_trl}


def cpu_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def others_busy(seconds: float = 1.0) -> float:
    """Cores' worth of CPU the other processes use now (sampled while this benchmark is idle)."""
    before = cpu_busy_seconds()
    time.sleep(seconds)
    return (cpu_busy_seconds() - before) / seconds


def run_once(spec: dict, log_dir: Path | None) -> dict:
    env = os.environ | ENV | spec.get("env", {})  # e.g. LD_PRELOAD: another allocator
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    busy, ours = cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker = after.ru_utime + after.ru_stime - ours.ru_utime - ours.ru_stime
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{spec['dataset']['name']}-{spec['label']}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['label']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result | {"others_cores": max(0.0, cpu_busy_seconds() - busy - worker) / elapsed}


def run(spec: dict, log_dir: Path | None = None, max_others: float = 0.25, attempts: int = 3,
        max_wait: float = 180.0) -> dict:
    """``spec`` run in a fresh Python process (stdout/stderr kept under ``log_dir``); its report.

    The machine is shared: before a run, wait (up to ``max_wait`` seconds) until the other processes use
    less than ``max_others`` of a core; a run during which they used more (``others_cores``, measured from
    /proc/stat minus the run's own CPU time) is repeated, up to ``attempts`` runs, and the least disturbed
    one is kept. Its ``others_cores`` is reported with it."""
    runs = []
    for _ in range(attempts):
        deadline = time.monotonic() + max_wait
        while others_busy() > max_others and time.monotonic() < deadline:
            time.sleep(4)
        runs.append(run_once(spec, log_dir))
        if runs[-1]["others_cores"] <= max_others:
            break
    return min(runs, key=lambda r: r["others_cores"]) | {"attempts": len(runs)}


if __name__ == "__main__":
    os.environ.update(ENV)
    spec = json.loads(sys.argv[1])
    sys.stdout.flush()
    result = WORKERS[spec["framework"]](spec)
    print(json.dumps(result))
