"""Properties the papers state, checked by optimisation or calculus rather than by re-typing the loss: for
the losses no other implementation pins (odpo, dpop, cal_dpo, bco; rdpo, rebel, plackett_luce K > 2 and
cDPO are in tests/test_losses_optimum.py), and DPO's β limits.

Where a pair's log-probs are free parameters (``free_pair``) the answers are a small part of a large space,
so π_c and π_r move independently; a tabular or log-linear policy is used where the normalisation matters.
"""

from __future__ import annotations

import math

import torch

from dpolab.losses import LOSSES
from tests.test_losses_optimum import minimise

F64 = torch.float64


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def fixed_point(f, lo: float, hi: float) -> float:
    """x = f(x) by bisection on x − f(x), increasing on [lo, hi] (an independent scalar solve)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_odpo_optimum_margin_exceeds_the_offset_and_dpos():
    """Two answers; annotators prefer a with probability p = 0.9, and each label comes with the same score
    gap g, so the offset is m = α·log g whichever answer is chosen. With z = βΔ (a over b), the population
    loss −p·logσ(z − m) − (1−p)·logσ(−z − m) is stationary where p·σ(m − z) = (1−p)·σ(m + z); with u = e^z,
    A = e^m: (1−p)·u² + A·(1−2p)·u − p = 0, so u* = [A(2p−1) + √(A²(2p−1)² + 4p(1−p))] / (2(1−p)).
    m = 1 (g = e, α = 1): z* = 3.0980 > m and > DPO's optimum logit(0.9) = 2.1972 (m = 0 gives exactly that).
    The paper's point: the learnt margin exceeds the offset, and grows with it."""
    beta, p = 0.5, 0.9
    ref = torch.log(torch.tensor([0.4, 0.6], dtype=F64))
    margins = {}
    for m in (0.0, 1.0, 2.0):
        theta = torch.zeros(2, dtype=F64, requires_grad=True)
        gap = torch.full((1,), math.exp(m), dtype=F64)

        def population_loss():
            lp = torch.log_softmax(theta, -1)
            a_wins = LOSSES["odpo"](lp[:1], lp[1:], ref[:1], ref[1:], beta=beta, margin=gap)[0]
            b_wins = LOSSES["odpo"](lp[1:], lp[:1], ref[1:], ref[:1], beta=beta, margin=gap)[0]
            return (p * a_wins + (1 - p) * b_wins).sum()

        minimise(population_loss, theta)
        h = torch.log_softmax(theta.detach(), -1) - ref
        margins[m] = float(beta * (h[0] - h[1]))
        A = math.exp(m)
        u = (A * (2 * p - 1) + math.sqrt(A * A * (2 * p - 1) ** 2 + 4 * p * (1 - p))) / (2 * (1 - p))
        assert abs(margins[m] - math.log(u)) < 1e-6, (m, margins[m], math.log(u))
    assert abs(margins[0.0] - logit(p)) < 1e-6  # no offset: DPO
    assert margins[1.0] > 1.0 and margins[2.0] > 2.0 and margins[2.0] > margins[1.0] > logit(p)


def test_cal_dpo_optimum_by_calculus():
    """One pair, π_c and π_r free. ∂L/∂h_c = −σ(−Δ) + 2(h_c − 1/(2β)) = 0 and ∂L/∂h_r = σ(−Δ) + 2(h_r + 1/(2β))
    = 0 give h_c = −h_r = 1/(2β) + σ(−Δ)/2, with Δ = 2h_c the root of Δ = 1/β + σ(−Δ). So the optimum is
    near the targets ±1/(2β) but above them: β = 1: Δ* = 1.2268, h_c = 0.6134 (target 0.5); β = 0.1:
    h_c = 5 + 2.3e-5. LBFGS from policy = reference finds that point."""
    for beta in (1.0, 0.1):
        ref_c, ref_r = torch.tensor([-4.0], dtype=F64), torch.tensor([-6.0], dtype=F64)
        pc, pr = ref_c.clone().requires_grad_(True), ref_r.clone().requires_grad_(True)
        minimise(lambda: LOSSES["cal_dpo"](pc, pr, ref_c, ref_r, beta=beta)[0].sum(), pc, pr)
        delta = fixed_point(lambda d: 1 / beta + 1 / (1 + math.exp(d)), 0.0, 2 / beta + 1)
        h_c, h_r = float(pc.detach() - ref_c), float(pr.detach() - ref_r)
        assert abs(h_c - delta / 2) < 1e-6 and abs(h_r + delta / 2) < 1e-6, (beta, h_c, h_r, delta)
        assert h_c > 1 / (2 * beta) and h_r < -1 / (2 * beta)
    assert abs(delta / 2 - 5) < 3e-5  # β = 0.1: the targets ±1/(2β) to 2.3e-5


def test_dpop_keeps_the_chosen_log_prob_above_the_reference_where_dpo_lets_it_fall():
    """Likelihood displacement (Pal et al. 2024): a log-linear policy π ∝ exp(θ·φ) over three answers whose
    chosen (φ = (1, 0.1)) and rejected (φ = (1, 0)) differ only slightly. DPO's gradient moves θ along
    φ_c − φ_r = (0, 0.1), which also raises the third answer (φ = (0, 1)), so along training the chosen
    log-prob falls far below the reference's. DPOP (λ = 50) keeps π_c ≥ ref_c (up to one step's overshoot)
    and still widens the margin. 1000 steps of gradient descent, lr 1, β = 0.1, from θ = 0 (= reference)."""
    phi = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]], dtype=F64)  # chosen, rejected, other
    ref = torch.log_softmax(torch.zeros(3, dtype=F64), -1)

    def train(name):
        theta = torch.zeros(2, dtype=F64, requires_grad=True)
        opt = torch.optim.SGD([theta], lr=1.0)
        lowest = 0.0
        for _ in range(1000):
            lp = torch.log_softmax(phi @ theta, -1)
            loss = LOSSES[name](lp[:1], lp[1:2], ref[:1], ref[1:2], beta=0.1)[0].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            lowest = min(lowest, float(lp[0].detach() - ref[0]))
        h = torch.log_softmax(phi @ theta.detach(), -1) - ref
        return lowest, float(h[0]), float(h[0] - h[1])

    dpo_lowest, _, dpo_margin = train("sigmoid")
    dpop_lowest, dpop_final, dpop_margin = train("dpop")
    assert dpo_lowest < -3 and dpo_margin > 0.4  # DPO orders the pair by pushing the chosen down
    assert dpop_lowest > -0.01 and dpop_final > 0 and dpop_margin > 0.2, (dpop_lowest, dpop_final, dpop_margin)


def test_bco_is_a_calibrated_classifier_with_its_boundary_at_delta():
    """BCO is logistic regression of the label on the logit βh − δ. An answer labelled desirable with
    probability p: −p·logσ(βh − δ) − (1−p)·logσ(−(βh − δ)) is minimised at βh* = δ + logit(p); so an answer
    as often good as bad sits exactly on the decision boundary βh = δ, and the gradient pushes a desirable
    row up and an undesirable one down on both sides of it (autograd)."""
    beta, delta = 0.1, 0.3
    labels = torch.tensor([True, False])  # the same answer twice: labelled desirable, and undesirable
    for p in (0.5, 0.8, 0.1):
        h = torch.zeros(1, dtype=F64, requires_grad=True)  # its log-ratio (reference log-prob 0)
        w = torch.tensor([p, 1 - p], dtype=F64)
        minimise(lambda: (w * LOSSES["bco"](h.expand(2), torch.zeros(2, dtype=F64), labels, beta=beta,
                                            delta=delta)[0]).sum(), h)
        assert abs(beta * float(h.detach()) - (delta + logit(p))) < 1e-6, (p, beta * float(h.detach()))
    for h in (-5.0, 3.0, 10.0):  # βh below, at and above δ
        x = torch.full((2,), h, dtype=F64, requires_grad=True)
        LOSSES["bco"](x, torch.zeros(2, dtype=F64), labels, beta=beta, delta=delta)[0].sum().backward()
        assert x.grad[0] < 0 < x.grad[1], (h, x.grad)


def test_dpo_beta_limits():
    """The DPO gradient at π = π_ref is ∂L/∂π_c = −β·σ(0) = −β/2: it grows with β, it does not vanish
    (autograd, β from 0.01 to 100), while the optimum π* ∝ π_ref·exp(r/β) tends to π_ref as β → ∞ (its
    distance to π_ref falls towards 0) and to the best answer as β → 0."""
    for beta in (0.01, 0.1, 1.0, 10.0, 100.0):
        pc = torch.tensor([-3.0], dtype=F64, requires_grad=True)
        LOSSES["sigmoid"](pc, torch.tensor([-5.0], dtype=F64), pc.detach(), torch.tensor([-5.0], dtype=F64),
                          beta=beta)[0].sum().backward()
        assert abs(float(pc.grad) + beta / 2) < 1e-12, (beta, float(pc.grad))
    ref = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    r = torch.tensor([0.0, 1.0, -1.0], dtype=F64)
    distances = [float((torch.softmax(ref + r / b, -1) - ref.exp()).abs().sum()) for b in (0.01, 1.0, 10.0, 100.0)]
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.01
    assert float(torch.softmax(ref + r / 0.01, -1)[1]) > 1 - 1e-6
