"""Every batch layout computes the same thing as the padded one, and as each sequence run alone.

The independent reference is the plainest computation there is: each (prompt, completion) through the
model by itself, no padding, no mask, the whole log_softmax, the completion tokens' log-probs summed.
Every layout must give those per-sequence sums to 1e-5 in fp32, the same loss, and the same gradients,
for standard, conversational, ranked (K = 3) and unpaired + KL data, and with truncation.
"""

import doctest
import math
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpolab
from dpolab.config import Config
from dpolab.data import batch as batch_module
from dpolab.data.batch import LAYOUTS, collate, collate_packed, collate_prefix, dense_visible, fill_rows, make_batch
from dpolab.data.records import Example, Record
from dpolab.data.tokenization import add_mismatched_completions, tokenize_records
from dpolab.errors import ConfigError
from dpolab.evaluation.metrics import read_metrics
from dpolab.models.logps import SequenceLogps, additive_mask, flex_block_mask, sdpa_mask
from dpolab.objective import build_objective

from .conftest import WORDS

LAYOUT_SETTINGS = [("padded", 0), ("prefix", 0), ("packed", 0), ("packed", 40), ("packed", 10_000)]
# Where the models run and which attention kernels take the masks: the CPU, SDPA and eager, here and in CI.
# bench/gpu_check.sh runs this file with DPOLAB_TEST_DEVICE=cuda, which adds FlexAttention and its BlockMask.
DEVICE = torch.device(os.environ.get("DPOLAB_TEST_DEVICE", "cpu"))
ATTENTIONS = ["sdpa", "eager"] + (["flex_attention"] if DEVICE.type == "cuda" else [])


def inputs(batch) -> dict:
    return batch.to(DEVICE).model_inputs()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def records(kind: str, n: int = 6, seed: int = 0) -> list[Record]:
    """Rows of uneven lengths, so every layout has padding or packing to get right."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = words(rng, rng.randint(1, 9))
        answers = [" " + words(rng, rng.randint(1, 6)) for _ in range(3 if kind == "ranked" else 2)]
        if kind == "conversational":
            out.append(Record(f"row {i}", "paired", [{"role": "user", "content": prompt}],
                              [[{"role": "assistant", "content": a}] for a in answers], True))
        elif kind == "unpaired":
            out.append(Record(f"row {i}", "unpaired", prompt, answers[:1], False, label=bool(i % 2)))
        else:
            out.append(Record(f"row {i}", "ranked" if kind == "ranked" else "paired", prompt, answers, False))
    return out


# kind → (loss, max_length, max_prompt_length); "truncated" cuts prompts from the left and answers from the right
KINDS = {"standard": ("sigmoid", 64, 32), "conversational": ("sigmoid", 64, 32), "ranked": ("plackett_luce", 64, 32),
         "unpaired": ("kto", 64, 32), "truncated": ("sigmoid", 9, 5)}


def examples_of(kind: str, tokenizer, n: int = 6) -> list[Example]:
    loss, max_length, max_prompt_length = KINDS[kind]
    exs = tokenize_records(records("standard" if kind == "truncated" else kind, n), tokenizer, max_length,
                           max_prompt_length)
    return add_mismatched_completions(exs, seed=0, max_length=max_length) if kind == "unpaired" else exs


def alone(model, examples: list[Example]) -> torch.Tensor:
    """Independent: each sequence through the model by itself; (S,) summed completion log-probs."""
    out = []
    for ex in examples:
        for c in ex.completion_ids:
            ids = torch.tensor([ex.prompt_ids + c], device=model.device)
            logps = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # (T, V)
            P = len(ex.prompt_ids)
            out.append(logps[P - 1: P - 1 + len(c)].gather(-1, torch.tensor(c, device=model.device)[:, None]).sum())
    return torch.stack(out)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from dpolab.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model))


def load(path, attn: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).to(DEVICE).eval()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("attn", ATTENTIONS)
def test_every_layout_gives_each_sequence_its_log_prob_alone(kind, attn, tiny_model, tokenizer):
    """Eager adds the mask to the scores and SDPA reads it as bool: both forms are checked."""
    model = load(tiny_model, attn)
    exs = examples_of(kind, tokenizer)
    if kind == "truncated":  # prompts cut from the left, completions from the right
        whole = examples_of("standard", tokenizer)
        assert all(ex.prompt_ids == w.prompt_ids[-5:] for ex, w in zip(exs, whole, strict=True))
        assert any(len(w.prompt_ids) > 5 for w in whole)
        cut = [(c, wc) for ex, w in zip(exs, whole) for c, wc in zip(ex.completion_ids, w.completion_ids)]
        assert all(c == wc[:len(c)] for c, wc in cut) and any(len(c) < len(wc) for c, wc in cut)
    with torch.no_grad():
        expected = alone(model, exs)
        for layout, row_tokens in LAYOUT_SETTINGS:
            b = make_batch(exs, tokenizer.pad_token_id, layout, row_tokens)
            got = SequenceLogps(model, chunk=7)(**inputs(b))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{layout} row_tokens={row_tokens}")


def objective_for(kind: str):
    loss = KINDS[kind][0]
    return build_objective([loss], None, 0.1, vars(Config(loss=loss).validate()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_layout_gives_the_same_loss_and_gradients(kind, tiny_model, other_model, tokenizer):
    """Against a different reference model, so the loss is not the trivial ln 2; the gradients of every
    policy parameter must agree too (backward runs through the mask and the shared prompt)."""
    exs = examples_of(kind, tokenizer)
    reference = SequenceLogps(load(other_model))
    objective = objective_for(kind)
    results = {}
    for layout, row_tokens in LAYOUT_SETTINGS:
        policy = load(tiny_model)
        b = make_batch(exs, tokenizer.pad_token_id, layout, row_tokens).to(DEVICE)
        with torch.no_grad():
            ref = reference(**inputs(b))
        loss = objective(SequenceLogps(policy, chunk=5)(**inputs(b)), ref, b).losses.mean()
        loss.backward()
        results[layout, row_tokens] = loss.detach(), [p.grad.clone() for p in policy.parameters()]
    base_loss, base_grads = results["padded", 0]
    assert abs(base_loss.item() - math.log(2)) > 1e-3 or kind == "unpaired"
    for key, (loss, grads) in results.items():
        torch.testing.assert_close(loss, base_loss, atol=1e-5, rtol=0, msg=str(key))
        for g, e in zip(grads, base_grads):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=str(key))


def test_the_lm_head_runs_only_on_scored_positions_in_chunks(tiny_model, tokenizer):
    """Logits exist only for the positions that predict a completion token, at most ``chunk`` rows at a
    time: never the [N, T, V] tensor, whatever the layout."""
    model = load(tiny_model)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    exs = examples_of("ranked", tokenizer)
    for layout, row_tokens in LAYOUT_SETTINGS:
        rows.clear()
        b = make_batch(exs, tokenizer.pad_token_id, layout, row_tokens)
        SequenceLogps(model, chunk=8)(**inputs(b)).sum().backward()  # backward recomputes each chunk
        scored = sum(len(c) for ex in exs for c in ex.completion_ids)
        assert max(rows) <= 8 and sum(rows) == 2 * scored, layout


def test_ld_dpo_weights_follow_each_sequence_in_every_layout(tiny_model, tokenizer):
    """LD-DPO weighs a sequence's tokens by their rank within it; packing must keep that order."""
    model = load(tiny_model)
    exs = examples_of("standard", tokenizer)
    with torch.no_grad():
        got = {s: SequenceLogps(model, chunk=3, ld_alpha=0.5)(**inputs(make_batch(exs, 0, *s)))
               for s in LAYOUT_SETTINGS}
    for s, v in got.items():
        torch.testing.assert_close(v, got["padded", 0], atol=1e-5, rtol=0, msg=str(s))
    assert not torch.allclose(got["padded", 0], alone(model, exs), atol=1e-3)  # the weights did something


def test_gradient_checkpointing_with_a_packed_batch(tiny_model, tokenizer):
    exs = examples_of("standard", tokenizer)
    grads = []
    for layout, gc in (("padded", False), ("packed", True)):
        model = load(tiny_model)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # the tiny model has no dropout; train mode is what turns checkpointing on
        weights = torch.linspace(-1, 1, 2 * len(exs), device=DEVICE)
        b = make_batch(exs, tokenizer.pad_token_id, layout)
        (SequenceLogps(model)(**inputs(b)) * weights).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_bf16_autocast_takes_the_masks_too(attn, tiny_model, tokenizer):
    """Under bf16 autocast the scores are bf16 and the masks must still apply (SDPA: bool, any dtype;
    eager: an fp32 additive mask, which promotes the scores): every layout stays within bf16 rounding of the
    fp32 values (~0.003 here), where letting the sequences of a row see each other is off by ~0.6."""
    model = load(tiny_model, attn)
    exs = examples_of("standard", tokenizer)
    with torch.no_grad():
        expected = alone(model, exs)
        for layout, row_tokens in LAYOUT_SETTINGS:
            b = make_batch(exs, tokenizer.pad_token_id, layout, row_tokens)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                got = SequenceLogps(model)(**inputs(b))
            torch.testing.assert_close(got, expected, atol=0.05, rtol=0, msg=layout)


def test_rows_hold_no_padding_but_their_tails(tokenizer):
    """What each layout computes: padded pays K prompts and pads to the longest sequence; prefix one
    prompt per example; packed rows no longer than the longest example, padding only after the segments.
    No layout feeds a completion's last token (it is only a target)."""
    exs = examples_of("ranked", tokenizer, n=16)
    K = 3
    inputs = [sum(len(c) - 1 for c in ex.completion_ids) for ex in exs]  # completion tokens that are inputs
    real = sum(len(ex.prompt_ids) + n for ex, n in zip(exs, inputs))
    padded, prefix = collate(exs, 0), collate_prefix(exs, 0)
    packed, one_row = collate_packed(exs, 0, row_tokens=0), collate_packed(exs, 0, row_tokens=10_000)
    assert padded.num_tokens == sum(K * len(ex.prompt_ids) + n for ex, n in zip(exs, inputs))
    assert prefix.num_tokens == packed.num_tokens == one_row.num_tokens == real
    longest = max(len(ex.prompt_ids) + n for ex, n in zip(exs, inputs))
    assert packed.input_ids.shape[1] == longest and packed.input_ids.shape[0] < len(exs)
    assert one_row.input_ids.shape == (1, real)  # the whole batch in one row: no padding at all
    for b in (prefix, packed, one_row):
        m = b.attention_mask
        assert torch.equal(m, (torch.arange(m.shape[1]) < m.sum(1, keepdim=True)).long())  # ones, then zeros
        assert torch.equal(b.segment_ids >= 0, m.bool())
    assert packed.score_seq.unique().tolist() == list(range(K * len(exs)))


def test_a_segment_sees_only_its_prompt_and_its_own_branch():
    """Two examples packed in one row, by hand: tokens 0-3 are example a (prompt 5, chosen 7 2, rejected 8),
    tokens 4-6 example b (prompt 9, chosen 3, rejected 4); each completion's last token (1, EOS) is scored
    but not fed."""
    a, b = Example(0, [5], [[7, 2, 1], [8, 1]]), Example(1, [9], [[3, 1], [4, 1]])
    batch = collate_packed([a, b], pad_id=0, row_tokens=16)
    assert batch.input_ids.tolist() == [[5, 7, 2, 8, 9, 3, 4]]
    assert batch.score_pos.tolist() == [0, 1, 2, 0, 3, 4, 5, 4, 6]  # who predicts 7 2 1 | 8 1 | 3 1 | 4 1
    assert batch.score_tok.tolist() == [7, 2, 1, 8, 1, 3, 1, 4, 1]
    seen = dense_visible(batch.segment_ids, batch.branch_ids)[0, 0].int().tolist()
    assert seen == [[1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0, 0],
                    [1, 0, 0, 1, 0, 0, 0],  # a's rejected: a's prompt and itself
                    [0, 0, 0, 0, 1, 0, 0],  # b's prompt: nothing of a
                    [0, 0, 0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 1, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 1, 0, 1, 1]]


def test_the_mask_forms_say_the_same_thing(tokenizer):
    """SDPA's −inf-additive, eager's finite additive and FlexAttention's mask_mod are one rule; padding sees
    itself, so no query row is fully masked. SDPA's mask is in the dtype attention computes in."""
    b = collate_packed(examples_of("ranked", tokenizer), 0, row_tokens=30)
    sdpa = sdpa_mask(b.segment_ids, b.branch_ids, torch.float32)
    seen = sdpa == 0  # (N, 1, T, T)
    assert sdpa.dtype == torch.float32 and (sdpa[~seen] == float("-inf")).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sdpa_mask(b.segment_ids, b.branch_ids, torch.float32).dtype == torch.bfloat16
    assert seen.shape == (b.input_ids.shape[0], 1, b.input_ids.shape[1], b.input_ids.shape[1])
    assert seen.any(-1).all()
    add = additive_mask(b.segment_ids, b.branch_ids, torch.bfloat16)
    assert add.dtype == torch.bfloat16 and torch.equal(add == 0, seen)
    assert (add[~seen] == torch.finfo(torch.bfloat16).min).all()
    block = flex_block_mask(b.segment_ids, b.branch_ids, torch.float32)
    N, T = b.segment_ids.shape
    q, kv = torch.arange(T)[None, None, :, None], torch.arange(T)[None, None, None, :]
    assert torch.equal(block.mask_mod(torch.arange(N)[:, None, None, None], torch.zeros(1), q, kv), seen)


def test_rows_padded_to_the_flex_bucket_keep_every_log_prob(tiny_model, tokenizer):
    """Under FlexAttention the decoder gets rows padded to a multiple of 128 columns, so the kernel that
    transformers compiles sees a few row lengths, not a new one every batch. The added columns are padding:
    every layout keeps each sequence's log-prob alone. Checked here under SDPA with the bucket set; on CUDA
    the test above runs FlexAttention itself (bench/gpu_check.sh)."""
    assert SequenceLogps(load(tiny_model, "flex_attention")).bucket == 128
    assert SequenceLogps(load(tiny_model)).bucket == 1
    model = load(tiny_model)
    widths = []
    model.get_decoder().register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape[1]),
                                                  with_kwargs=True)
    logps = SequenceLogps(model, chunk=7)
    logps.bucket = 128
    exs = examples_of("conversational", tokenizer)
    with torch.no_grad():
        expected = alone(model, exs)
        for layout, row_tokens in LAYOUT_SETTINGS:
            widths.clear()
            b = make_batch(exs, tokenizer.pad_token_id, layout, row_tokens)
            got = logps(**inputs(b))
            assert widths == [128] and b.input_ids.shape[1] < 128, (layout, widths)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"{layout} row_tokens={row_tokens}")


def test_fill_rows_keeps_every_item_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 50) for _ in range(rng.randint(1, 20))]
        budget = rng.randint(1, 120)
        rows = fill_rows(sizes, budget)
        assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
        assert all(sum(sizes[i] for i in row) <= budget or len(row) == 1 for row in rows)


def test_the_layout_functions_carry_worked_examples():
    """STYLE: the collator's docstring example is its test."""
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for fn in (collate, collate_prefix, collate_packed, fill_rows):
        (test,) = finder.find(fn, globs=vars(batch_module))
        assert test.examples, fn.__name__
        result = runner.run(test)
        assert result.failed == 0, fn.__name__


def test_refusals(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match="row_tokens"):
        Config(layout="prefix", row_tokens=64).validate()
    with pytest.raises(ConfigError, match="layout must be one of"):
        Config(layout="ragged").validate()
    with pytest.raises(ConfigError, match="layout must be one of"):
        make_batch(examples_of("standard", tokenizer), 0, "ragged")
    b = make_batch(examples_of("standard", tokenizer), 0, "packed")
    model = load(tiny_model)
    model.config._attn_implementation = "flash_attention_2"  # a kernel that takes no custom mask
    with pytest.raises(ConfigError, match="--layout padded"):
        SequenceLogps(model)(**inputs(b))
    model = load(tiny_model)
    model.config.sliding_window = 4  # a custom mask would silently drop the window
    with pytest.raises(ConfigError, match="sliding window"):
        SequenceLogps(model)(**inputs(b))
    with torch.no_grad():  # the padded layout leaves both to transformers
        SequenceLogps(model)(**inputs(make_batch(examples_of("standard", tokenizer), 0, "padded")))


def first_step(out) -> dict:
    return next(r for r in read_metrics(out / "metrics.jsonl") if "loss" in r)


def test_training_eval_and_precompute_agree_across_layouts(run_config, tmp_path, other_model):
    """Each entry point honours --layout (num_tokens shows which rows ran) and gets the same numbers. The
    precomputed reference cache is keyed by weights and data, not layout: one table serves every layout."""
    runs = {}
    for layout in LAYOUTS:
        out = tmp_path / layout
        summary = dpolab.train(**run_config(output_dir=str(out), layout=layout, ref_model=str(other_model),
                                            max_steps=1))
        runs[layout] = first_step(out), summary["eval_before"]
    (padded, padded_eval), (packed, packed_eval) = runs["padded"], runs["packed"]
    assert packed["num_tokens"] == runs["prefix"][0]["num_tokens"] < padded["num_tokens"]
    for step, ev in runs.values():
        for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert step[k] == pytest.approx(padded[k], abs=1e-5), k
        assert ev["eval/loss"] == pytest.approx(padded_eval["eval/loss"], abs=1e-5)
    cache, tables = tmp_path / "cache", []
    for layout in ("padded", "packed"):
        s = dpolab.train(**run_config(output_dir=str(tmp_path / f"pre-{layout}"), layout=layout, max_steps=1,
                                      ref_model=str(other_model), precompute_ref=True, ref_cache_dir=str(cache)))
        assert s["train"]["loss"] == pytest.approx(packed["loss"], abs=1e-5)
        tables.append({p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")})
    assert len(tables[0]) == 2 and tables[1] == tables[0]  # train and held-out tables, written once


def test_eval_and_score_agree_across_layouts(tiny_model, other_model, prefs):
    metrics = [dpolab.evaluate(str(tiny_model), str(prefs), ref_model=str(other_model), layout=layout)
               for layout in LAYOUTS]
    for m in metrics[1:]:
        for k, v in metrics[0].items():
            assert m[k] == pytest.approx(v, abs=1e-5), k
    scores = [dpolab.score(str(tiny_model), "what is the cat?", " the cat is good", ref_model=str(other_model),
                           layout=layout) for layout in LAYOUTS]
    for s in scores[1:]:
        assert s["logp"] == pytest.approx(scores[0]["logp"], abs=1e-5)
        assert s["reward"] == pytest.approx(scores[0]["reward"], abs=1e-6)


def test_the_attention_kernel_is_a_setting_and_the_kernels_train_alike(run_config, tmp_path, tiny_model, other_model,
                                                                        monkeypatch):
    """--attn-implementation reaches every model a run loads (policy, --ref-model): SDPA (bool mask) and
    eager (additive mask) train the packed layout to the same losses, step by step, against a different
    reference (so the losses are not ln 2); an unknown kernel is refused in one line."""
    from transformers import PreTrainedModel

    from dpolab.errors import DpolabError
    from dpolab.models.loading import load_model

    assert load_model(str(tiny_model), attn_implementation="eager").config._attn_implementation == "eager"
    applied, original = [], PreTrainedModel.set_attn_implementation

    def spy(self, impl, *args, **kwargs):
        original(self, impl, *args, **kwargs)
        applied.append((Path(self.config._name_or_path).name, self.config._attn_implementation))

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", spy)
    losses = {}
    for attn in ("sdpa", "eager"):
        out = tmp_path / attn
        applied.clear()
        dpolab.train(**run_config(output_dir=str(out), max_steps=3, eval_split=0, ref_model=str(other_model),
                                  attn_implementation=attn))
        assert sorted(applied) == sorted([(tiny_model.name, attn), (other_model.name, attn)])
        losses[attn] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses["sdpa"]) == 3 and abs(losses["sdpa"][0] - math.log(2)) > 1e-3
    assert losses["eager"] == pytest.approx(losses["sdpa"], abs=1e-5)
    with pytest.raises(DpolabError, match="attn_implementation=no-such-kernel"):
        dpolab.train(**run_config(output_dir=str(tmp_path / "bad"), max_steps=1, attn_implementation="no-such-kernel"))
