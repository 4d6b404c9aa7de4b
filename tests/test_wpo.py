"""WPO in training is TRL 1.16's ``use_weighting``: the pair weights come from the aligned log-probs
π − S, S = Σ_t log Σ_v p_t(v)², which the log-prob function accumulates inside its chunked LM-head pass."""

import types

import pytest
import torch

from dpolab.models.logps import SequenceLogps
from dpolab.objective import build_objective
from tests.hand import aligned_logps

trl = pytest.importorskip("tests.test_losses_trl")


def test_trainer_objective_with_use_weighting_equals_trls():
    """The objective fed (logps, aligned sums) as SequenceLogps(aligned=True) returns them gives TRL's loss."""
    B, batch = trl.B, trl._dpo_batch(seed=7)
    tok, mask, S, n = batch["token_logps"], batch["shift_mask"], batch["log_sum_sq"], batch["lengths"]
    objective = build_objective(["sigmoid"], None, 0.1, {"label_smoothing": 0.0, "use_weighting": True})
    interleave = lambda t: torch.stack([t[:B], t[B:]], 1).reshape(-1)  # noqa: E731  (2B,) c, r of each example
    batch_like = types.SimpleNamespace(num_completions=2, lengths=interleave(n), margins=None)
    aligned = ((tok - S) * mask).sum(-1)
    ref = torch.stack([batch["ref_chosen"], batch["ref_rejected"]], 1).reshape(-1)
    ours = objective((interleave(tok.sum(-1)), interleave(aligned)), ref, batch_like).losses.mean()
    theirs = trl.trl_dpo_loss(batch, tok, loss_type="sigmoid", use_weighting=True)
    torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="aligned log-probs"):  # the plain log-probs alone are refused
        objective(interleave(tok.sum(-1)), ref, batch_like)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_aligned_sums_of_the_chunked_pass_equal_the_full_distribution(tiny_model, chunk):
    """SequenceLogps(aligned=True) against Σ_t (log p_t − log Σ_v p_t²) from a full log_softmax, any chunk size;
    the log-probs it returns beside them are unchanged and keep their gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.data.batch import make_batch
    from dpolab.data.records import Record
    from dpolab.data.tokenization import Tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [("what is red?", " red is good", " red is bad and the"), ("what is the sun?", " the sun", " no")]
    examples = [Tokenizer(tok, 64, 32)(Record(f"r{i}", "paired", p, [c, r], False), i)
                for i, (p, c, r) in enumerate(rows)]
    batch = make_batch(examples, tok.pad_token_id, "packed")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    logps, aligned = SequenceLogps(model, chunk=chunk, aligned=True)(**batch.model_inputs())
    plain = SequenceLogps(model, chunk=chunk)(**batch.model_inputs())
    torch.testing.assert_close(logps, plain)
    assert logps.requires_grad and not aligned.requires_grad
    expected = torch.stack([aligned_logps(tiny_model, p, a) for p, c, r in rows for a in (c, r)]).float()
    torch.testing.assert_close(aligned, expected, atol=1e-5, rtol=1e-5)
    assert (aligned - logps).abs().min() > 1e-3  # S ≠ 0: the alignment really changes the weights
