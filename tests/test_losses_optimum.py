"""Population minimisers over a tabular policy (one logit per answer, the expected loss computed exactly over
the labels, no sampling) against the closed forms the papers derive. None of these re-types a loss formula:
the optimiser finds the minimum, the closed form comes from the paper's argument.

DPO: π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x) (Rafailov et al. 2023, eq. 4); Plackett–Luce rankings give
the same optimum (App. A.3); REBEL's regression gives it too (its mirror-descent step); R-DPO shifts r by
−α·n (Park et al. 2024); cDPO stops at βΔ = log((1−ε)/ε).
"""

from __future__ import annotations

import itertools
import math

import torch

from dpolab.losses import LOSSES

F64 = torch.float64


def minimise(population_loss, *params, rounds: int = 3) -> None:
    """LBFGS with a strong-Wolfe line search to numerical convergence (each round restarts its memory)."""
    opt = torch.optim.LBFGS(list(params), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = population_loss()
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)


def tabular_optimum(name: str, ref_logps, chosen, rejected, weights, *, beta: float, **columns) -> torch.Tensor:
    """The policy π = softmax(θ) over the answers of one prompt minimising Σ_k w_k·L(chosen_k ≻ rejected_k),
    for a paired loss; ``columns`` are per-comparison tensors (lengths or margins), like ``chosen``."""
    theta = torch.zeros_like(ref_logps, requires_grad=True)
    loss = LOSSES[name]

    def population_loss():
        logps = torch.log_softmax(theta, -1)
        out = loss(logps[chosen], logps[rejected], ref_logps[chosen], ref_logps[rejected], beta=beta, **columns)
        return (weights * out[0]).sum()

    minimise(population_loss, theta)
    return torch.softmax(theta.detach(), -1)


def test_dpo_population_minimiser_is_the_closed_form():
    """Two prompts, four answers each. Every unordered pair (y, y') is compared with probability 1/6 per
    prompt and labelled y ≻ y' with the Bradley–Terry probability σ(r(y) − r(y')). The expected loss over
    labels is exact (no sampling); the policy's logits are the parameters, optimised with LBFGS."""
    torch.manual_seed(0)
    beta, X, Y = 0.5, 2, 4
    ref_logps = torch.log_softmax(torch.randn(X, Y, dtype=F64), -1)  # (X, Y)
    reward = torch.randn(X, Y, dtype=F64)
    pairs = list(itertools.combinations(range(Y), 2))
    idx_a = torch.tensor([a for a, _ in pairs])
    idx_b = torch.tensor([b for _, b in pairs])
    p_a_wins = torch.sigmoid(reward[:, idx_a] - reward[:, idx_b])  # (X, P)

    theta = torch.zeros(X, Y, dtype=F64, requires_grad=True)
    dpo = LOSSES["sigmoid"]

    def population_loss():
        logps = torch.log_softmax(theta, -1)
        pa, pb, ra, rb = logps[:, idx_a], logps[:, idx_b], ref_logps[:, idx_a], ref_logps[:, idx_b]
        a_chosen = dpo(pa.flatten(), pb.flatten(), ra.flatten(), rb.flatten(), beta=beta)[0].view(X, -1)
        b_chosen = dpo(pb.flatten(), pa.flatten(), rb.flatten(), ra.flatten(), beta=beta)[0].view(X, -1)
        return (p_a_wins * a_chosen + (1 - p_a_wins) * b_chosen).mean()

    minimise(population_loss, theta)
    learned = torch.softmax(theta.detach(), -1)
    closed_form = torch.softmax(ref_logps + reward / beta, -1)
    torch.testing.assert_close(learned, closed_form, atol=1e-3, rtol=0)
    # and the uniform start (the reference is not uniform) was far from it
    assert (torch.full_like(closed_form, 1 / Y) - closed_form).abs().max() > 0.1


ORDERED = list(itertools.permutations(range(3), 2))  # the 6 ordered pairs (chosen, rejected) of 3 answers
CHOSEN, REJECTED = torch.tensor([i for i, _ in ORDERED]), torch.tensor([j for _, j in ORDERED])


def test_rdpo_tabular_optimum_prefers_the_shorter_answer():
    """Three equally good answers of 2, 6 and 12 tokens, uniform reference; Bradley–Terry with equal rewards
    labels each ordered pair (i, j) chosen/rejected with probability ½. R-DPO's implicit reward is β·h + α·n,
    so the minimiser is π ∝ π_ref·exp(−α·n/β): α = 0.01, β = 0.1 gives ∝ (e^{−0.2}, e^{−0.6}, e^{−1.2}) =
    (0.4906, 0.3289, 0.1805), the shorter answer preferred by e^{−0.1·Δn} exactly. The reversed sign
    (−α·(n_c − n_r)) gave (0.192, 0.286, 0.522): the longer answer preferred."""
    n = torch.tensor([2.0, 6.0, 12.0], dtype=F64)
    ref = torch.full((3,), -math.log(3), dtype=F64)
    weights = torch.full((6,), 0.5 / 3, dtype=F64)  # 3 unordered pairs, each order with probability ½
    learned = tabular_optimum("rdpo", ref, CHOSEN, REJECTED, weights, beta=0.1, rdpo_alpha=0.01,
                              chosen_lengths=n[CHOSEN], rejected_lengths=n[REJECTED])
    expected = torch.softmax(ref - 0.01 * n / 0.1, -1)
    torch.testing.assert_close(learned, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(learned[0] / learned[1], torch.tensor(math.exp(-0.1 * (2 - 6)), dtype=F64),
                               atol=1e-3, rtol=0)


def test_rebel_tabular_optimum_regresses_the_margin_onto_the_score_gap():
    """REBEL on gaps r(y) − r(y') observed with zero-mean noise (±0.5, each half the time), both orders of
    every pair: least squares puts βΔ at the mean gap of each pair, so the minimiser is the KL-regularised
    optimum π ∝ π_ref·exp(r/β) (REBEL's mirror-descent step with η = 1/β)."""
    beta = 0.5
    ref = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    r = torch.tensor([0.3, -0.4, 0.8], dtype=F64)
    chosen, rejected = CHOSEN.repeat(2), REJECTED.repeat(2)  # each comparison once with noise +0.5, once −0.5
    noise = torch.tensor([0.5] * 6 + [-0.5] * 6, dtype=F64)
    learned = tabular_optimum("rebel", ref, chosen, rejected, torch.full((12,), 1 / 12, dtype=F64), beta=beta,
                              margin=r[chosen] - r[rejected] + noise)
    torch.testing.assert_close(learned, torch.softmax(ref + r / beta, -1), atol=1e-4, rtol=0)


def test_cdpo_optimum_stops_at_log_odds_of_the_label_noise():
    """cDPO (sigmoid with ε > 0) on a pair always labelled a ≻ b: the minimiser has a finite margin
    βΔ* = log((1−ε)/ε) (plain DPO's would be +∞), i.e. π_a/π_b = (π_ref,a/π_ref,b)·((1−ε)/ε)^{1/β}."""
    beta, eps = 0.5, 0.1
    ref = torch.log(torch.tensor([0.3, 0.7], dtype=F64))
    learned = tabular_optimum("sigmoid", ref, torch.tensor([0]), torch.tensor([1]), torch.ones(1, dtype=F64),
                              beta=beta, label_smoothing=eps)
    margin = beta * ((learned.log() - ref)[0] - (learned.log() - ref)[1])
    assert abs(float(margin) - math.log((1 - eps) / eps)) < 1e-6, float(margin)


def test_plackett_luce_k3_population_minimiser_is_the_closed_form():
    """Rankings of 3 answers drawn from Plackett–Luce with reward r: P(σ) = Π_k e^{r_σk} / Σ_{j≥k} e^{r_σj},
    the expected loss summed exactly over all 6 permutations. The minimiser over a tabular policy is
    π ∝ π_ref·exp(r/β) (the PL likelihood is maximised when β·h = r + const)."""
    beta = 0.5
    ref = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=F64))
    r = torch.tensor([1.0, -0.5, 0.2], dtype=F64)
    perms = torch.tensor(list(itertools.permutations(range(3))))  # (6, 3), best first
    scores = r[perms]
    p_perm = torch.exp(scores - torch.logcumsumexp(scores.flip(-1), -1).flip(-1)).prod(-1)  # (6,)
    assert abs(float(p_perm.sum()) - 1) < 1e-12
    theta = torch.zeros(3, dtype=F64, requires_grad=True)

    def population_loss():
        logps = torch.log_softmax(theta, -1)
        return (p_perm * LOSSES["plackett_luce"](logps[perms], ref[perms], beta=beta)[0]).sum()

    minimise(population_loss, theta)
    torch.testing.assert_close(torch.softmax(theta.detach(), -1), torch.softmax(ref + r / beta, -1), atol=1e-4,
                               rtol=0)
