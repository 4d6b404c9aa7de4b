"""The losses against hand-worked numbers, SPEC §2's policy = reference values, and gradient directions.

Unless a test says otherwise the hand-worked point is one pair with β = 1:
π_c = −1, ref_c = −2 (h_c = 1); π_r = −3, ref_r = −2 (h_r = −1); Δ = 2; n_c = 2, n_r = 4 (Δ̄ = 0.75).
Values of the logistic function used below: logσ(x) = −log(1 + e^{−x}).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.losses import LOSSES, get_loss, sigmoid

LN2 = math.log(2)


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


PC, RC, PR, RR, NC, NR = t(-1.0), t(-2.0), t(-3.0), t(-2.0), t(2.0), t(4.0)


def paired(name: str, beta: float = 1.0, pc=PC, pr=PR, rc=RC, rr=RR, nc=NC, nr=NR, **kw) -> torch.Tensor:
    loss = LOSSES[name]
    if loss.needs_lengths:
        kw.update(chosen_lengths=nc, rejected_lengths=nr)
    return loss(pc, pr, rc, rr, beta=beta, **kw)[0]


def close(a, b, tol=1e-6):
    assert abs(float(torch.as_tensor(a).mean()) - b) < tol, (float(torch.as_tensor(a).mean()), b)


# --- hand-worked values ---------------------------------------------------------------------------------------


def test_sigmoid_hand():
    """−logσ(2) = log(1 + e^{−2}) = log(1.135335) = 0.126928.
    cDPO ε = 0.1: 0.9·0.126928 + 0.1·(−logσ(−2) = 2.126928) = 0.114235 + 0.212693 = 0.326928."""
    close(paired("sigmoid"), 0.126928)
    close(paired("sigmoid", label_smoothing=0.1), 0.326928)


def test_robust_hand():
    """ε = 0.1: [0.9·0.126928 − 0.1·2.126928] / 0.8 = (0.114235 − 0.212693)/0.8 = −0.123072 (unbiased, so it
    may be negative)."""
    close(paired("robust", label_smoothing=0.1), -0.123072)
    with pytest.raises(ValueError):
        paired("robust", label_smoothing=0.5)


def test_hinge_hand():
    """β = 0.25: max(0, 1 − 0.25·2) = 0.5; β = 1: max(0, 1 − 2) = 0."""
    close(paired("hinge", beta=0.25), 0.5)
    close(paired("hinge"), 0.0)


def test_ipo_hand():
    """Δ̄ = 1/2 − (−1/4) = 0.75; (0.75 − 1/(2·1))² = 0.25² = 0.0625. Summed (unnormalised) Δ would give
    (2 − 0.5)² = 2.25."""
    close(paired("ipo"), 0.0625)


def test_sigmoid_norm_hand():
    """−logσ(0.75) = log(1 + e^{−0.75}) = log(1.472367) = 0.386871."""
    close(paired("sigmoid_norm"), 0.386871)


def test_exo_pair_hand():
    """ε = 0.1, z = 2: q = σ(2) = 0.880797, 1 − q = 0.119203;
    0.880797·(−0.126928 − log 0.9 = −0.021567) + 0.119203·(−2.126928 − log 0.1 = 0.175657)
    = −0.018996 + 0.020939 = 0.001943."""
    close(paired("exo_pair", exo_epsilon=0.1), 0.001943)


def test_nca_pair_hand():
    """−logσ(1) − ½logσ(−1) − ½logσ(−(−1)) = 0.313262 + ½·1.313262 + ½·0.313262 = 1.126524."""
    close(paired("nca_pair"), 1.126524)


def test_bco_pair_hand():
    """δ = 0: −logσ(1) − logσ(1) = 2·0.313262 = 0.626523.
    δ = 0.5: −logσ(1 − 0.5) − logσ(−(−1 − 0.5)) = 0.474077 + 0.201413 = 0.675490."""
    close(paired("bco_pair"), 0.626523)
    close(paired("bco_pair", delta=0.5), 0.675490)


def test_sppo_hard_hand():
    """(1 − 1/2)² + (−1 + 1/2)² = 0.25 + 0.25 = 0.5."""
    close(paired("sppo_hard"), 0.5)


def test_aot_hand():
    """Two pairs. π_c − π_r = (2, −1), ref_c − ref_r = (0, 1). Sorted: (−1, 2) and (0, 1); d = (−1, 1);
    losses −logσ(−1) = 1.313262, −logσ(1) = 0.313262; mean 0.813262. (Unsorted: d = (2, −2), mean 1.126928.)"""
    pc, pr, rc, rr = t(0.0, 0.0), t(-2.0, 1.0), t(0.0, 0.0), t(0.0, -1.0)
    close(paired("aot", pc=pc, pr=pr, rc=rc, rr=rr), 0.813262)


def test_aot_unpaired_hand():
    """Two pairs with h_c = (1, −2), h_r = (−1, 0.5). Sorted separately: (−2, 1) and (−1, 0.5); d = (−1, 0.5);
    losses 1.313262 and −logσ(0.5) = 0.474077; mean 0.893670."""
    pc, pr, rc, rr = t(1.0, -2.0), t(-1.0, 0.5), t(0.0, 0.0), t(0.0, 0.0)
    close(paired("aot_unpaired", pc=pc, pr=pr, rc=rc, rr=rr), 0.893670)


def test_apo_hand():
    """zero: (1 − σ(1)) + σ(−1) = 0.268941 + 0.268941 = 0.537883.
    down: σ(1) + (1 − σ(2)) = 0.731059 + 0.119203 = 0.850261."""
    close(paired("apo_zero"), 0.537883)
    close(paired("apo_down"), 0.850261)


def test_discopop_hand():
    """β = 0.01: z = 0.02, m = σ(0.02/0.05 = 0.4) = 0.598688; −logσ(0.02) = 0.683197; e^{−0.02} = 0.980199;
    0.401312·0.683197 + 0.598688·0.980199 = 0.274175 + 0.586833 = 0.861008."""
    close(paired("discopop", beta=0.01), 0.861008)


def test_odpo_hand():
    """The margin column is the score gap s_c − s_r. Gap 2, α = 0.5, f = log: offset 0.5·log 2 = log √2 =
    0.346574; −logσ(2 − 0.346574) = log(1 + e^{−2}·√2 = 1 + 0.135335·1.414214 = 1.191393) = 0.175123.
    f = identity, gap 1, α = 0.5: offset 0.5; −logσ(1.5) = log(1 + e^{−1.5} = 1.223130) = 0.201413.
    log of a gap ≤ 0 is undefined (a tie, or a pair whose rejected answer scored higher) and identity of a
    negative gap contradicts the label: both are refused, naming the value."""
    close(paired("odpo", margin=t(2.0), odpo_alpha=0.5), 0.175123)
    close(paired("odpo", margin=t(1.0), odpo_alpha=0.5, odpo_transform="identity"), 0.201413)
    close(paired("odpo", margin=t(0.0), odpo_transform="identity"), 0.126928)  # a zero offset is DPO
    with pytest.raises(ValueError, match=r"odpo_transform='log' needs a score gap .*> 0 in every row, got 0.0"):
        paired("odpo", margin=t(1.0, 0.0))
    with pytest.raises(ValueError, match=r"needs a score gap .*>= 0 in every row, got -0.5"):
        paired("odpo", margin=t(-0.5), odpo_transform="identity")
    with pytest.raises(ValueError, match="odpo_transform must be one of log, identity"):
        paired("odpo", margin=t(1.0), odpo_transform="sqrt")


def test_rdpo_hand():
    """α = 0.1, n_c − n_r = 2 − 4 = −2. Park et al. put +α·(|y_w| − |y_l|) inside the sigmoid, so the shorter
    chosen answer here needs MORE margin: −logσ(2 + 0.1·(−2)) = −logσ(1.8) = log(1 + e^{−1.8} = 1.165299)
    = 0.152978. (The reversed sign gave −logσ(2.2) = 0.105083.) Swapping the lengths (chosen longer,
    n_c − n_r = +2) gives −logσ(2.2) = log(1 + e^{−2.2} = 1.110803) = 0.105083."""
    close(paired("rdpo", rdpo_alpha=0.1), 0.152978)
    close(paired("rdpo", rdpo_alpha=0.1, nc=NR, nr=NC), 0.105083)


def test_rebel_hand():
    """The margin column is the score gap. β = 1, gap 1.5: (1·2 − 1.5)² = 0.25. β = 0.25, gap −1 (the pair
    in the other order): (0.25·2 + 1)² = 1.5² = 2.25. The gradient: ∂L/∂π_c = 2β(βΔ − gap) = 2·0.5 = 1."""
    close(paired("rebel", margin=t(1.5)), 0.25)
    close(paired("rebel", beta=0.25, margin=t(-1.0)), 2.25)
    pc = PC.clone().requires_grad_(True)
    paired("rebel", pc=pc, margin=t(1.5)).sum().backward()
    close(pc.grad, 1.0)


def test_dpop_hand():
    """π_c = −3, ref_c = −2 (h_c = −1), π_r = −5, ref_r = −2 (h_r = −3): Δ = 2; penalty max(0, −2 + 3) = 1;
    λ = 1: −logσ(2 − 1) = 0.313262. With π_c above ref_c the penalty is 0: the main point gives 0.126928."""
    close(paired("dpop", pc=t(-3.0), pr=t(-5.0), dpop_lambda=1.0), 0.313262)
    close(paired("dpop", dpop_lambda=1.0), 0.126928)


def test_cal_dpo_hand():
    """−logσ(1 − (−1)) + (1 − 1/2)² + (−1 + 1/2)² = 0.126928 + 0.25 + 0.25 = 0.626928."""
    close(paired("cal_dpo"), 0.626928)


def test_plackett_luce_hand():
    """K = 3, β = 1, h = (1, 0, −1): k=1: 1 − log(e + 1 + e^{−1} = 4.086161) = −0.407606;
    k=2: 0 − log(1 + e^{−1}) = −0.313262; L = 0.407606 + 0.313262 = 0.720868."""
    close(LOSSES["plackett_luce"](t(1.0, 0.0, -1.0)[None], torch.zeros(1, 3, dtype=torch.float64), beta=1.0)[0],
          0.720868)


def test_simpo_hand():
    """β = 2, γ = 1: π_c/n_c = −2/2 = −1, π_r/n_r = −8/4 = −2; −logσ(2·1 − 1) = −logσ(1) = 0.313262."""
    close(paired("simpo", beta=2.0, pc=t(-2.0), pr=t(-8.0), simpo_gamma=1.0), 0.313262)


def test_cpo_and_sft_hand():
    """Two rows: π_c = (−2, −6), n_c = (2, 4); π_r = (−3, −7). The token-mean NLL is (2 + 6)/(2 + 4) = 4/3 (per
    row −π_c·B/Σn_c = 4/6 and 12/6, mean 4/3; a per-sequence mean would give (1 + 1.5)/2 = 1.25).
    CPO, β = 1, λ = 1: mean(−logσ(1), −logσ(1)) + 4/3 = 0.313262 + 1.333333 = 1.646595."""
    kw = dict(pc=t(-2.0, -6.0), pr=t(-3.0, -7.0), rc=None, rr=None, nc=t(2.0, 4.0), nr=t(3.0, 3.0))
    close(paired("sft", **kw), 4 / 3)
    close(paired("cpo", cpo_alpha=1.0, **kw), 1.646595)
    close(paired("cpo", cpo_alpha=0.0, **kw), 0.313262)


def test_orpo_hand():
    """λ = β = 0.1. π_c = −2, n_c = 2 → p̄ = e^{−1}; π_r = −6, n_r = 3 → p̄ = e^{−2}.
    log odds_c = −1 − log(1 − e^{−1}) = −1 + 0.458675 = −0.541325; log odds_r = −2 + 0.145413 = −1.854587;
    difference 1.313262, logσ(1.313262) = −0.238183; NLL = 2/2 = 1; L = 1 + 0.1·0.238183 = 1.023818."""
    close(paired("orpo", beta=0.1, pc=t(-2.0), pr=t(-6.0), nc=t(2.0), nr=t(3.0)), 1.023818)


def test_alphapo_hand():
    """β = 1, γ = 0, α = 0.5. π/n: −1 and −2. r = (1 − e^{−α·π/n})/α: r_c = (1 − e^{0.5})/0.5 = −1.297443,
    r_r = (1 − e^{1})/0.5 = −3.436564; −logσ(2.139121) = log(1 + e^{−2.139121} = 1.117758) = 0.111325.
    α = 0 is SimPO."""
    kw = dict(pc=t(-2.0), pr=t(-8.0))
    close(paired("alphapo", simpo_gamma=0.0, alphapo_alpha=0.5, **kw), 0.111325)
    close(paired("alphapo", simpo_gamma=0.4, alphapo_alpha=0.0, **kw), float(paired("simpo", simpo_gamma=0.4, **kw)))


def test_kto_hand():
    """β = 1, rows h = (1, −1, 0.5), desirable = (T, F, T); KL pairs π − ref = (0.2, 0.4) → z = 0.3; λ_D = 1,
    λ_U = 2. Row 1: 1 − σ(0.7) = 0.331812; row 2: 2·(1 − σ(0.3 + 1)) = 2·0.214165 = 0.428330;
    row 3: 1 − σ(0.2) = 0.450166. A negative KL estimate (−0.5) clamps z to 0: row 1 becomes 1 − σ(1) = 0.268941."""
    h, labels = t(1.0, -1.0, 0.5), torch.tensor([True, False, True])
    out = LOSSES["kto"](h, torch.zeros(3, dtype=torch.float64), labels, beta=1.0, kl_policy_logps=t(0.2, 0.4),
                        kl_ref_logps=t(0.0, 0.0), desirable_weight=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(out[0], t(0.331812, 0.428330, 0.450166), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], t(1.0, 0.5))
    torch.testing.assert_close(out[2], t(-1.0))
    neg = LOSSES["kto"](h, torch.zeros(3, dtype=torch.float64), labels, beta=1.0, kl_policy_logps=t(-0.5),
                        kl_ref_logps=t(0.0))
    close(neg[0][0], 0.268941)


def test_bco_hand():
    """β = 1, δ = 0.5, h = (1, −1), desirable = (T, F): −logσ(0.5) = 0.474077; −logσ(−(−1 − 0.5)) = 0.201413."""
    out = LOSSES["bco"](t(1.0, -1.0), t(0.0, 0.0), torch.tensor([True, False]), beta=1.0, delta=0.5)
    torch.testing.assert_close(out[0], t(0.474077, 0.201413), atol=1e-6, rtol=0)


# --- policy = reference (SPEC §2), β = 0.1 -------------------------------------------------------------------

AT_REFERENCE = {
    "sigmoid": LN2, "robust": LN2, "sigmoid_norm": LN2, "aot": LN2, "aot_unpaired": LN2, "hinge": 1.0,
    "ipo": 25.0, "nca_pair": 2 * LN2, "bco_pair": 2 * LN2, "sppo_hard": 50.0, "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.8466, "exo_pair": 2.7612, "dpop": LN2,
    "cal_dpo": LN2 + 50.0,  # ln 2 + (0 − 5)² + (0 + 5)²
    # odpo, score gaps (1, e, 1), α = 1, log: offsets (0, 1, 0); −logσ(−1) = log(1 + e) = 1.313262
    "odpo": (LN2, 1.313262, LN2),
    # rdpo, α = 0.01, n_c − n_r = (−3, 3, 0): −logσ(x) = log(1 + e^{−x}) = ln 2 − x/2 + x²/8 − O(x⁴) at
    # x = α(n_c − n_r) = (−0.03, 0.03, 0): ln 2 + 0.015 + 0.0001125, ln 2 − 0.015 + 0.0001125, ln 2
    "rdpo": (0.708260, 0.678260, LN2),
    "rebel": (4.0, 0.25, 0.0),  # (0 − gap)², score gaps (2, −0.5, 0)
}
AT_REFERENCE_COLUMNS = {"odpo": t(1.0, math.e, 1.0), "rebel": t(2.0, -0.5, 0.0)}


@pytest.mark.parametrize("name", sorted(AT_REFERENCE))
def test_value_when_policy_equals_reference(name):
    """h_c = h_r = 0 for three pairs with n_c ≠ n_r in two of them (n_c − n_r = −3, 3, 0): a loss whose
    constant changed with the lengths (rdpo's length term) must say so here, with its hand-derived value."""
    g = torch.Generator().manual_seed(0)
    logps = -5 * torch.rand(3, generator=g, dtype=torch.float64)
    nc, nr = t(3.0, 5.0, 8.0), t(6.0, 2.0, 8.0)
    kw = {"margin": AT_REFERENCE_COLUMNS[name]} if name in AT_REFERENCE_COLUMNS else {}
    losses = paired(name, beta=0.1, pc=logps, pr=logps - 1, rc=logps, rr=logps - 1, nc=nc, nr=nr, **kw)
    tol = 1e-4 if name in ("discopop", "exo_pair") else 1e-6 if name in ("odpo", "rdpo") else 1e-9
    expected = AT_REFERENCE[name]
    expected = t(*expected) if isinstance(expected, tuple) else torch.full_like(losses, expected)
    torch.testing.assert_close(losses, expected, atol=tol, rtol=0)


def test_ranked_and_unpaired_at_reference():
    """Plackett–Luce, K = 3, h = 0: log 3 + log 2 (= ln 6). KTO at h = 0 with z = 0: 1 − σ(0) = ½ per row.
    BCO at h = 0, δ = 0: ln 2 per row."""
    z3 = torch.zeros(2, 3, dtype=torch.float64)
    close(LOSSES["plackett_luce"](z3, z3, beta=0.1)[0], math.log(6), 1e-12)
    z, lab = torch.zeros(4, dtype=torch.float64), torch.tensor([True, False, True, False])
    close(LOSSES["kto"](z, z, lab, beta=0.1, kl_policy_logps=z, kl_ref_logps=z)[0], 0.5, 1e-12)
    close(LOSSES["bco"](z, z, lab, beta=0.1)[0], LN2, 1e-12)


def test_reference_free_at_a_tie():
    """Reference-free losses have no "policy = reference"; at a tie (π_c = π_r, n_c = n_r) SimPO is
    −logσ(−γ) = log(1 + e^{γ}) = 1.313262 at γ = 1, and CPO with λ = 0 is ln 2."""
    kw = dict(pc=t(-4.0), pr=t(-4.0), rc=None, rr=None, nc=t(4.0), nr=t(4.0))
    close(paired("simpo", beta=2.0, simpo_gamma=1.0, **kw), 1.313262)
    close(paired("cpo", beta=0.1, cpo_alpha=0.0, **kw), LN2)


def test_reference_losses_accept_zero_references():
    """Reference-free mode = ref log-probs 0: DPO then reads β(π_c − π_r) = 1·(−1 + 3) = 2 → 0.126928."""
    z = torch.zeros(1, dtype=torch.float64)
    close(paired("sigmoid", rc=z, rr=z, pc=t(-1.0), pr=t(-3.0)), 0.126928)


# --- gradients ------------------------------------------------------------------------------------------------


def test_dpo_gradient_closed_form():
    """∂L/∂π_c = −β·σ(−βΔ), ∂L/∂π_r = +β·σ(−βΔ), per example (SPEC §2)."""
    g = torch.Generator().manual_seed(1)
    pc, pr = (-10 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_(True), \
        (-10 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    rc, rr = -10 * torch.rand(6, generator=g, dtype=torch.float64), -10 * torch.rand(6, generator=g, dtype=torch.float64)
    beta = 0.3
    sigmoid(pc, pr, rc, rr, beta=beta)[0].sum().backward()
    delta = (pc - rc - pr + rr).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * delta))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-beta * delta))


# name → (point, sign of ∂L/∂π_c, sign of ∂L/∂π_r): negative means gradient descent raises that log-prob.
# The default point is policy = reference except where the loss is flat there in one direction.
ZERO = dict(pc=t(-3.0), pr=t(-4.0), rc=t(-3.0), rr=t(-4.0), nc=t(3.0), nr=t(5.0))
GRADIENT_CASES = {
    **{n: (ZERO, -1, +1) for n in ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair",
                                    "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                    "rdpo", "dpop", "cal_dpo", "simpo", "cpo", "orpo", "alphapo")},
    "odpo": (dict(ZERO, margin=t(2.0)), -1, +1),
    "rebel": (dict(ZERO, margin=t(2.0)), -1, +1),  # βΔ = 0 below the gap 2: widen the margin
    # APO-down lowers both: at h_c = 0, h_r = −20 (|h_c| < |Δ|) descent lowers the chosen too.
    "apo_down": (dict(ZERO, pr=t(-24.0)), +1, +1),
    "sft": (ZERO, -1, 0),
    # DiscoPOP is non-convex near 0: at z = 0, dL/dz = −0.75 + (1 − ln 2)/(4τ) = +0.78, so policy = reference
    # pushes the margin DOWN. On a wrongly ordered pair (h_r = 10, z = −1) it corrects the order.
    "discopop": (dict(ZERO, rr=t(-14.0)), -1, +1),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_gradient_direction_paired(name):
    point, sign_c, sign_r = GRADIENT_CASES[name]
    point = dict(point)
    pc, pr = point.pop("pc").clone().requires_grad_(True), point.pop("pr").clone().requires_grad_(True)
    paired(name, beta=0.1, pc=pc, pr=pr, **point).mean().backward()
    for grad, sign in ((pc.grad, sign_c), (pr.grad, sign_r)):
        if sign == 0:
            assert grad is None or torch.all(grad == 0)
        else:
            assert torch.all(torch.sign(grad) == sign), (name, grad)


def test_gradient_direction_ranked_and_unpaired():
    """Plackett–Luce raises the best and lowers the worst; KTO and BCO raise desirable rows, lower the others."""
    p = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    LOSSES["plackett_luce"](p, torch.zeros(1, 3, dtype=torch.float64), beta=0.1)[0].sum().backward()
    assert p.grad[0, 0] < 0 < p.grad[0, 2]
    lab = torch.tensor([True, False, True, False])
    for name, kw in (("kto", dict(kl_policy_logps=t(0.1, 0.2), kl_ref_logps=t(0.0, 0.0))), ("bco", {})):
        x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        LOSSES[name](x, torch.zeros(4, dtype=torch.float64), lab, beta=0.1, **kw)[0].sum().backward()
        assert torch.all(x.grad[lab] < 0) and torch.all(x.grad[~lab] > 0), name


def test_kto_and_bco_treat_reference_point_as_constant():
    """z (KTO) and δ (BCO) are detached: no gradient reaches the mismatched-pair log-probs."""
    kl = t(0.1, 0.2).requires_grad_(True)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    LOSSES["kto"](x, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]), beta=0.1,
                  kl_policy_logps=kl, kl_ref_logps=t(0.0, 0.0))[0].sum().backward()
    assert kl.grad is None


# --- ranked ---------------------------------------------------------------------------------------------------


def test_plackett_luce_with_two_equals_sigmoid():
    g = torch.Generator().manual_seed(2)
    P, R = -5 * torch.rand(7, 2, generator=g, dtype=torch.float64), -5 * torch.rand(7, 2, generator=g, dtype=torch.float64)
    pl = LOSSES["plackett_luce"](P, R, beta=0.2)
    dpo = sigmoid(P[:, 0], P[:, 1], R[:, 0], R[:, 1], beta=0.2)
    for a, b in zip(pl, dpo):
        torch.testing.assert_close(a, b)


def test_plackett_luce_is_stable_for_large_logits():
    P = t(5000.0, 0.0, -5000.0)[None]
    losses = LOSSES["plackett_luce"](P, torch.zeros_like(P), beta=1.0)[0]
    assert torch.isfinite(losses).all() and float(losses) < 1e-9


# --- the registry contract ------------------------------------------------------------------------------------

# SPEC §2's losses, plus rebel (issue 12; not yet in SPEC's table)
SPEC_NAMES = {"sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "odpo", "rdpo", "dpop", "cal_dpo",
              "rebel", "alphapo", "plackett_luce", "simpo", "cpo", "orpo", "kto", "bco", "sft"}


def test_registry_holds_every_spec_loss_with_a_declaration():
    assert set(LOSSES) == SPEC_NAMES
    for name, loss in LOSSES.items():
        assert loss.name == name and get_loss(name) is loss
        assert loss.data in ("paired", "ranked", "unpaired")
        assert loss.paper and loss.pick_when and "``" in loss.doc, name
        assert set(loss.param_defaults) == set(loss.params)
    with pytest.raises(KeyError, match="known losses"):
        get_loss("dpo")


def test_reference_free_losses_are_declared_so():
    assert {n for n, loss in LOSSES.items() if not loss.needs_ref} == {"simpo", "cpo", "orpo", "alphapo", "sft"}


def test_every_declared_input_is_accepted():
    """Each declared param, column, state, length and KL input is a keyword of the function (and no more)."""
    import inspect

    for name, loss in LOSSES.items():
        sig = inspect.signature(loss.fn).parameters
        kw = {p for p, v in sig.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        expected = {"beta", *loss.params, *loss.columns, *loss.state}
        if loss.needs_lengths:
            expected |= {"chosen_lengths", "rejected_lengths"}
        if loss.needs_kl:
            expected |= {"kl_policy_logps", "kl_ref_logps"}
        assert kw == expected, name


def test_params_sharing_a_name_share_a_default():
    """A param is one flat config field, so every loss using it must agree on the default."""
    defaults: dict = {}
    for loss in LOSSES.values():
        for p, d in loss.param_defaults.items():
            assert defaults.setdefault(p, d) == d, p


def test_register_refuses_duplicates_and_undeclared_params():
    from dpolab.losses import register

    with pytest.raises(ValueError):
        register("sigmoid")(lambda *a, **k: None)
    with pytest.raises(TypeError):
        register("tmp_bad", params=("nope",))(lambda a, *, beta: None)
    assert "tmp_bad" not in LOSSES
