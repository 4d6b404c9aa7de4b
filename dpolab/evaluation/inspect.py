"""``dpolab inspect``: a pre-flight audit of a dataset, with advice, before any training.

The counts that need only the rows and a tokenizer are :mod:`dpolab.data.audit`'s; with a model this adds
the reference's log-probs per token of the chosen and rejected answers (how off-policy the data is) and the
rows whose chosen answer it finds very unlikely (reference collapse, below ``alarm_ref_token_logp`` nats a
token); then :func:`dpolab.evaluation.advice.advise`. The result is a terminal report (or one JSON object),
``OUTPUT/inspect.json`` and ``OUTPUT/lengths.png`` (token-length histograms of chosen and rejected answers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpolab import embedded
from dpolab.data.audit import audit
from dpolab.data.batch import DEFAULT_LAYOUT, DEFAULT_ROW_TOKENS, Collate
from dpolab.data.reading import load_records
from dpolab.data.tokenization import Tokenizer
from dpolab.errors import writing
from dpolab.evaluation.advice import advise, memory_needed
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.models.logps import SequenceLogps

PROBLEMS = ("duplicates", "contradictions", "identical", "empty_answers")


def inspect_data(data: str, model: str | None = None, max_length: int = 512, max_prompt_length: int = 256,
                 skip_invalid: bool = False, ignore_columns: str | None = None, batch_size: int = 8,
                 output: str | None = None, alarm_ref_token_logp: float = -5.0, layout: str = DEFAULT_LAYOUT,
                 trust_remote_code: bool = False, allow_pickle_weights: bool = False, progress: bool = True) -> dict:
    """The audit of ``data`` (and, with ``model``, its reference log-probs) with the advice; written to
    ``output`` (default ``runs/inspect``) as ``inspect.json`` and ``lengths.png``."""
    columns = [c.strip() for c in (ignore_columns or "").split(",") if c.strip()]
    records = load_records(data, skip_invalid, columns)
    tokenizer = load_tokenizer(model or str(embedded.MODEL), trust_remote_code)
    report = {"data": data, "tokenizer": model or "the bundled default's (character-level; give --model for yours)"}
    report |= audit(records, tokenizer, max_length, max_prompt_length)
    reference = None
    if model is not None:
        lm = load_model(model, trust_remote_code, allow_pickle_weights)
        reference = reference_report(lm, tokenizer, records, max_length, max_prompt_length, batch_size, layout,
                                     alarm_ref_token_logp, progress)
        report["reference"] = reference
    kinds, ref = set(report["formats"]), reference or {}
    report["advice"] = advise(
        "unpaired" if "unpaired" in kinds else "ranked" if "ranked" in kinds else "paired", report["rows"],
        report["chosen_longer_fraction"], report["chosen_shorter_fraction"], ref.get("chosen_token_logp"),
        ref.get("num_parameters"), ref.get("memory_available"), sum(report[k] for k in PROBLEMS))
    write(report, Path(output or "runs/inspect"))
    return report


@torch.no_grad()
def reference_report(model, tokenizer, records, max_length: int, max_prompt_length: int, batch_size: int,
                     layout: str, low_token_logp: float, progress: bool) -> dict:
    """Mean reference log-prob per token of the chosen (first) and rejected (last) answers, and the rows
    whose chosen answer gets less than ``low_token_logp`` nats a token."""
    tok = Tokenizer(tokenizer, max_length, max_prompt_length, template_mismatch="warn")  # the audit counts those
    kept = [(r, ex) for i, r in enumerate(records) if (ex := tok(r, i)) is not None]
    logps = SequenceLogps(model.eval())
    collate = Collate(tokenizer.pad_token_id, layout, DEFAULT_ROW_TOKENS if layout == "packed" else 0)
    per_token = []  # (chosen, rejected) nats per token, per row
    for i in tqdm(range(0, len(kept), batch_size), desc="inspect", disable=not progress):
        chunk = kept[i: i + batch_size]
        batch = collate([ex for _, ex in chunk])
        K = batch.num_completions
        sums, lengths = logps(**batch.model_inputs()).view(-1, K), batch.lengths.view(-1, K)  # (B, K)
        rates = (sums / lengths).tolist()
        per_token += [(row[0], row[-1]) for row in rates]
    low = [r.where for (r, _), (c, _) in zip(kept, per_token) if c < low_token_logp]
    paired = records[0].kind != "unpaired"
    n_params = sum(p.numel() for p in model.parameters())
    return {"chosen_token_logp": sum(c for c, _ in per_token) / len(per_token),
            "rejected_token_logp": sum(r for _, r in per_token) / len(per_token) if paired else None,
            "low_probability_chosen": len(low), "low_probability_rows": low[:10], "num_parameters": n_params,
            "memory_needed": memory_needed(n_params), "memory_available": memory_available()}


def memory_available() -> int:
    """Bytes of the accelerator's memory, else of the machine's."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write(report: dict, out: Path) -> None:
    """``inspect.json`` and ``lengths.png``, each written beside and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "inspect.json", None):
        tmp = out / ".inspect.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out / "inspect.json")
    with writing(out / "lengths.png", None):
        plot_lengths(report["lengths"], out / "lengths.png")


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> None:
    from matplotlib.figure import Figure  # deferred: matplotlib is a heavy import

    fig = Figure(figsize=(6, 3.6), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.91, bottom=0.14)
    ax = fig.add_subplot()
    top = max([1, *lengths["chosen"], *lengths["rejected"]])
    bins = range(0, top + 2, max(1, (top + 1) // 40))
    for side, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.5, label=f"{side} ({len(values)})")
    ax.set_title("Completion lengths (tokens, EOS included)")
    ax.set_xlabel("tokens")
    ax.legend(fontsize=8)
    tmp = path.with_name(".lengths.tmp.png")
    fig.savefig(tmp, pil_kwargs={"compress_level": 1})
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    """The terminal report: counts, then the reference, then the advice and its reasons."""
    lines = [f"{report['data']}: {report['rows']} rows ({', '.join(f'{n} {k}' for k, n in report['formats'].items())})"]
    names = (*PROBLEMS, "prompts_too_long", "truncated", "eos_lost", "dropped", "unstable_template", "boundary_merges")
    lines += [f"  {k:28s} {report.get(k, 0)}" for k in names]
    if report["chosen_longer_fraction"] is not None:
        lines.append(f"  {'chosen_longer_fraction':28s} {report['chosen_longer_fraction']:.3f}")
        lines.append(f"  {'chosen_shorter_fraction':28s} {report['chosen_shorter_fraction']:.3f}")
        lines.append(f"  {'mean_token_gap':28s} {report['mean_token_gap']:+.2f}")
    if ref := report.get("reference"):
        rejected = ref["rejected_token_logp"]
        lines.append(f"reference log-prob per token: chosen {ref['chosen_token_logp']:.3f}"
                     + (f", rejected {rejected:.3f}" if rejected is not None else "")
                     + f"; {ref['low_probability_chosen']} rows with a very unlikely chosen answer")
    a = report["advice"]
    lines.append(f"advice: --loss {a['loss']} --beta {a['beta']:g}, learning rate {a['learning_rate'][0]:g} to "
                 f"{a['learning_rate'][1]:g}")
    lines += [f"  because {r}" for r in a["reasons"]] + [f"  also: {x}" for x in a["also"]]
    return "\n".join(lines)
