"""Build the embedded default in dpolab/assets/default/: a tiny base model and on-policy preference pairs.

    .venv/bin/python scripts/build_default.py            # about 2 minutes on 2 CPU cores

1. A character-level fast tokenizer (digits, operators, letters, a few special tokens) with a chat template.
2. A tiny Llama (about 0.8M parameters) trained from scratch by supervised fine-tuning on the ``sft``
   problems of the addition task: ``<s>a+b=`` → ``sum</s>``, loss on the answer tokens only. It stops
   early on purpose: right often, not always, so that preference optimisation has room to help.
3. On-policy pairs, as Tülu 3 built its preference data: sample ``--samples`` answers per prompt from the
   base model at temperature 1, score each with the task's reward, and pair a best answer with a worst one
   where they differ (``dpolab make-pairs`` does the same for a user's model and reward). Training pairs
   come from the task's training prompts, held-out pairs from its held-out prompts.

Seeded and deterministic on one machine (same torch build and thread count). ``recipe.yaml``, the DPO
settings ``dpolab train`` runs with by default, is written by hand and not touched here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpolab.evaluation.generate import sample  # noqa: E402
from dpolab.evaluation.pairs import pair_rows, write_jsonl  # noqa: E402
from dpolab.tasks import addition  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHARS = list("0123456789+-*/=?.,:;!'\"()[] ") + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
    [chr(c) for c in range(ord("A"), ord("Z") + 1)]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    """One token per character; ``<s>`` is prepended to every text tokenised with special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def sft_batch(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) for ``<s>a+b=sum</s>``; labels are -100 except on the answer."""
    rows, labels = [], []
    for p in prompts:
        prompt = tokenizer(p)["input_ids"]
        answer = tokenizer(addition.answer(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (T - len(r)) for r in labels])
    return ids, mask, lab


def sft(model, tokenizer, prompts: list[str], max_steps: int, batch_size: int, lr: float, seed: int,
        check_every: int, good_enough) -> int:
    """AdamW at a constant rate after a linear warm-up, seeded data order; every ``check_every`` steps
    ``good_enough(model)`` decides whether to stop. Returns the steps taken."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    order, pos = torch.randperm(len(prompts), generator=g).tolist(), 0
    for step in range(1, max_steps + 1):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(prompts), generator=g).tolist(), 0
        ids, mask, labels = sft_batch(tokenizer, [prompts[i] for i in order[pos: pos + batch_size]])
        pos += batch_size
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % check_every == 0:
            done = good_enough(model, step, loss.item())
            model.train()
            if done:
                return step
    return max_steps


def greedy_accuracy(model, tokenizer, prompts) -> float:
    answers = sample(model, tokenizer, prompts, num_samples=1, temperature=0.0, max_new_tokens=6).completions
    return sum(addition.reward(p, a[0]) for p, a in zip(prompts, answers)) / len(prompts)


def on_policy_pairs(model, tokenizer, prompts, samples: int, seed: int) -> tuple[list[dict], float]:
    """(pairs, mean reward of the sampled answers)."""
    drawn = sample(model, tokenizer, prompts, num_samples=samples, temperature=1.0, seed=seed, max_new_tokens=6)
    scores = [[addition.reward(p, c) for c in cs] for p, cs in zip(prompts, drawn.completions)]
    mean = sum(map(sum, scores)) / (len(scores) * samples)
    return pair_rows(prompts, drawn.completions, scores, seed=seed), mean


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "dpolab" / "assets" / "default"))
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sft-max-steps", type=int, default=3000)
    ap.add_argument("--sft-batch", type=int, default=128)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--target", type=float, default=0.6,
                    help="stop fine-tuning once greedy accuracy on 500 preference prompts reaches this")
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--samples", type=int, default=4, help="answers sampled per prompt for the pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only this many prompts of each split (tests)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    splits = {k: list(v[: args.limit]) for k, v in addition.splits().items()}

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; sft on {len(splits['sft'])} problems", flush=True)
    probe = splits["train"][:500]

    def good_enough(m, step, loss) -> bool:
        acc = greedy_accuracy(m, tokenizer, probe)
        print(f"sft step {step}: loss {loss:.4f}, greedy accuracy on {len(probe)} preference prompts {acc:.3f}",
              flush=True)
        return acc >= args.target

    steps = sft(model, tokenizer, splits["sft"], args.sft_max_steps, args.sft_batch, args.sft_lr, args.seed,
                args.check_every, good_enough)
    t_sft = time.perf_counter() - t0
    acc = {k: greedy_accuracy(model, tokenizer, splits[k]) for k in ("train", "eval")}
    print(f"sft done in {t_sft:.0f}s; greedy accuracy: preference prompts {acc['train']:.3f}, "
          f"held-out {acc['eval']:.3f}", flush=True)

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    train, sampled_train = on_policy_pairs(model, tokenizer, splits["train"], args.samples, args.seed)
    held, sampled_eval = on_policy_pairs(model, tokenizer, splits["eval"], args.samples, args.seed + 1)
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held)
    info = {"parameters": n_params, "sft_steps": steps, "sft_seconds": round(t_sft, 1), "greedy_accuracy": acc,
            "sampled_accuracy": {"train": sampled_train, "eval": sampled_eval},
            "train_pairs": len(train), "eval_pairs": len(held), "seconds": round(time.perf_counter() - t0, 1),
            "settings": vars(args) | {"out": None}}
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
