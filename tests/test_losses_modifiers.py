"""Modifiers (combine, f-divergences, WPO, LD-DPO, TR-DPO, BCO's running mean, KTO's weight advice) against
hand-worked numbers. TRL parity for f-divergences, WPO, LD-DPO and loss weights is in test_losses_trl.py."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.losses import (
    LOSSES,
    f_divergence_inputs,
    f_divergence_logratios,
    kto_kl_estimate,
    kto_weight_advice,
    tr_dpo_update_,
    update_running_mean,
    wpo_weights,
)
from tests.hand import combine, ld_pair_logps, tr_dpo_update


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_combine_is_weighted_sum_of_means():
    """(1, 3) and (10, 20) with weights (1, 0.5): 1·2 + 0.5·15 = 9.5."""
    assert float(combine([t(1.0, 3.0), t(10.0, 20.0)], [1.0, 0.5])) == 9.5
    with pytest.raises(ValueError):
        combine([t(1.0)], [1.0, 2.0])


def test_f_divergence_values():
    """forward KL at h = ln 2: 1 − e^{−ln 2} = 0.5. JS at h = 0: log 2 + logσ(0) = 0. α = 0.5 at h = ln 4:
    (e^{−0.5·ln 4} − 1)/(−0.5) = (0.5 − 1)/(−0.5) = 1. Reverse KL and α = 1 are the identity."""
    h = t(math.log(2), 0.0, math.log(4))
    assert abs(float(f_divergence_logratios(h, "forward_kl")[0]) - 0.5) < 1e-12
    assert abs(float(f_divergence_logratios(h, "js_divergence")[1])) < 1e-12
    assert abs(float(f_divergence_logratios(h, "alpha_divergence", 0.5)[2]) - 1.0) < 1e-12
    assert torch.equal(f_divergence_logratios(h, "reverse_kl"), h)
    assert torch.equal(f_divergence_logratios(h, "alpha_divergence", 1.0), h)
    # near α = 1 it tends to h (computed in float32 like TRL, so only to ~1e-3 here)
    torch.testing.assert_close(f_divergence_logratios(h, "alpha_divergence", 1.001), h, atol=2e-3, rtol=0)
    with pytest.raises(ValueError):
        f_divergence_logratios(h, "hellinger")


def test_f_divergence_leaves_reference_free_losses_alone():
    """In RPO under f-DPO, ``sft`` must still see the raw policy log-probs."""
    pc, pr, rc, rr = t(-1.0), t(-2.0), t(-3.0), t(-4.0)
    out = f_divergence_inputs(LOSSES["sft"], pc, pr, rc, rr, f_divergence_type="forward_kl")
    assert all(a is b for a, b in zip(out, (pc, pr, rc, rr)))
    fc, fr, zc, zr = f_divergence_inputs(LOSSES["sigmoid"], pc, pr, rc, rr, f_divergence_type="forward_kl")
    torch.testing.assert_close(fc, 1 - torch.exp(-(pc - rc)))
    assert float(zc) == 0.0 and float(zr) == 0.0


def test_wpo_plain_weights_and_detached():
    """Without the alignment term: exp(−2/2)·exp(−3/3) = e^{−2}; with S = (−1, −1.5): exp(−1/2)·exp(−1.5/3)."""
    pc = t(-2.0).requires_grad_(True)
    w = wpo_weights(pc, t(-3.0), t(2.0), t(3.0))
    assert abs(float(w) - math.exp(-2)) < 1e-12 and not w.requires_grad
    w = wpo_weights(pc, t(-3.0), t(2.0), t(3.0), chosen_log_sum_sq_probs=t(-1.0), rejected_log_sum_sq_probs=t(-1.5))
    assert abs(float(w) - math.exp(-0.5 - 0.5)) < 1e-12


def test_ld_pair_logps_hand():
    """Chosen tokens (−1, −2, −3), rejected (−1, −1): public length 2; α = 0.5 gives chosen −1 − 2 + 0.5·(−3)
    = −4.5 and rejected −2. Leading zeros in the masks (prompt, left padding) do not count as positions."""
    c_tok = t(9.0, -1.0, -2.0, -3.0)[None]  # position 0 is a prompt token (mask 0)
    c_mask = torch.tensor([[0, 1, 1, 1]])
    r_tok = t(9.0, 9.0, -1.0, -1.0)[None]
    r_mask = torch.tensor([[0, 0, 1, 1]])
    c, r = ld_pair_logps(c_tok, c_mask, r_tok, r_mask, ld_alpha=0.5)
    assert float(c) == -4.5 and float(r) == -2.0
    c, r = ld_pair_logps(c_tok, c_mask, r_tok, r_mask, ld_alpha=1.0)
    assert float(c) == -6.0 and float(r) == -2.0
    with pytest.raises(ValueError):
        ld_pair_logps(c_tok, c_mask, r_tok, r_mask, ld_alpha=1.5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_trainers_ld_weights_agree_with_ld_pair_logps(alpha):
    """The two LD-DPO implementations: the trainer's token weights (dpolab.logps.ld_weights, over a flat list
    of scored tokens in any interleaving that keeps each sequence's order, as the batch layouts give) and the
    TRL-checked ld_pair_logps (over padded (B, T) tensors) give the same sequence sums."""
    from dpolab.models.logps import ld_weights

    g = torch.Generator().manual_seed(int(10 * alpha))
    B, T = 6, 9
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)  # sequence 2i chosen, 2i + 1 rejected of pair i
    tokens = [-torch.rand(int(n), generator=g, dtype=torch.float64) for n in lengths]
    # flat scored tokens, sequences interleaved at random but each in its own order
    order = torch.cat([torch.full((int(n),), s) for s, n in enumerate(lengths)])
    order = order[torch.randperm(len(order), generator=g)]
    seen = [0] * (2 * B)
    flat, seq = [], []
    for s in order.tolist():
        flat.append(tokens[s][seen[s]])
        seq.append(s)
        seen[s] += 1
    flat, seq = torch.stack(flat), torch.tensor(seq)
    sums = torch.zeros(2 * B, dtype=torch.float64).index_add(0, seq, flat * ld_weights(seq, 2 * B, alpha))
    padded = torch.zeros(2 * B, T, dtype=torch.float64)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for s, x in enumerate(tokens):
        padded[s, : len(x)], mask[s, : len(x)] = x, 1
    c, r = ld_pair_logps(padded[0::2], mask[0::2], padded[1::2], mask[1::2], ld_alpha=alpha)
    torch.testing.assert_close(sums[0::2], c)
    torch.testing.assert_close(sums[1::2], r)


def test_tr_dpo_update():
    """α = 0.6: 0.6·2 + 0.4·1 = 1.6; integer buffers follow the policy; α = 1 copies the policy."""
    ref = {"w": torch.ones(3), "steps": torch.tensor(1)}
    pol = {"w": torch.full((3,), 2.0), "steps": torch.tensor(7)}
    new = tr_dpo_update(ref, pol, ref_model_mixup_alpha=0.6)
    torch.testing.assert_close(new["w"], torch.full((3,), 1.6))
    assert int(new["steps"]) == 7 and float(ref["w"][0]) == 1.0  # the input is untouched
    assert torch.equal(tr_dpo_update(ref, pol, ref_model_mixup_alpha=1.0)["w"], pol["w"])
    params = [torch.ones(2)]
    tr_dpo_update_(params, [torch.full((2,), 2.0)], ref_model_mixup_alpha=0.6)
    torch.testing.assert_close(params[0], torch.full((2,), 1.6))
    with pytest.raises(ValueError):
        tr_dpo_update(ref, {"w": pol["w"]})


def test_running_mean_is_the_mean_of_everything_seen():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(k, generator=g, dtype=torch.float64) for k in (3, 1, 7, 0, 5)]
    mean, count = 0.0, 0
    for c in chunks:
        mean, count = update_running_mean(mean, count, c)
    allv = torch.cat(chunks)
    assert count == allv.numel()
    torch.testing.assert_close(mean, allv.mean())


def test_kto_weight_advice():
    """100 desirable, 300 undesirable, weights 1, 1: ratio 1/3, out of [1, 4/3]; raise λ_D into [3, 4] or lower
    λ_U into [0.25, 1/3]. Balanced data with equal weights is fine; λ_D = 2 on balanced data is not."""
    a = kto_weight_advice(100, 300)
    assert not a.ok and abs(a.ratio - 1 / 3) < 1e-12
    assert a.desirable_weight_range == pytest.approx((3.0, 4.0))
    assert a.undesirable_weight_range == pytest.approx((0.25, 1 / 3))
    assert kto_weight_advice(100, 300, desirable_weight=3.5).ok
    assert kto_weight_advice(50, 50).ok and not kto_weight_advice(50, 50, desirable_weight=2.0).ok


def test_kto_kl_estimate():
    """mean(0.5 − 0.1, −0.2 − 0) = 0.1; a negative mean clamps to 0."""
    assert abs(float(kto_kl_estimate(t(0.5, -0.2), t(0.1, 0.0))) - 0.1) < 1e-12
    assert float(kto_kl_estimate(t(-1.0), t(0.0))) == 0.0
