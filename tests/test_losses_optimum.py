"""The DPO closed form: minimising the population sigmoid loss over a tabular policy recovers
π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x) (Rafailov et al. 2023, eq. 4)."""

from __future__ import annotations

import itertools

import torch

from dpolab.losses import LOSSES


def test_dpo_population_minimiser_is_the_closed_form():
    """Two prompts, four answers each. Every unordered pair (y, y') is compared with probability 1/6 per
    prompt and labelled y ≻ y' with the Bradley–Terry probability σ(r(y) − r(y')). The expected loss over
    labels is exact (no sampling); the policy's logits are the parameters, optimised with LBFGS."""
    torch.manual_seed(0)
    beta, X, Y = 0.5, 2, 4
    ref_logps = torch.log_softmax(torch.randn(X, Y, dtype=torch.float64), -1)  # (X, Y)
    reward = torch.randn(X, Y, dtype=torch.float64)
    pairs = list(itertools.combinations(range(Y), 2))
    idx_a = torch.tensor([a for a, _ in pairs])
    idx_b = torch.tensor([b for _, b in pairs])
    p_a_wins = torch.sigmoid(reward[:, idx_a] - reward[:, idx_b])  # (X, P)

    theta = torch.zeros(X, Y, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    dpo = LOSSES["sigmoid"]

    def population_loss():
        logps = torch.log_softmax(theta, -1)
        pa, pb, ra, rb = logps[:, idx_a], logps[:, idx_b], ref_logps[:, idx_a], ref_logps[:, idx_b]
        a_chosen = dpo(pa.flatten(), pb.flatten(), ra.flatten(), rb.flatten(), beta=beta)[0].view(X, -1)
        b_chosen = dpo(pb.flatten(), pa.flatten(), rb.flatten(), ra.flatten(), beta=beta)[0].view(X, -1)
        return (p_a_wins * a_chosen + (1 - p_a_wins) * b_chosen).mean()

    def closure():
        opt.zero_grad()
        loss = population_loss()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    learned = torch.softmax(theta.detach(), -1)
    closed_form = torch.softmax(ref_logps + reward / beta, -1)
    torch.testing.assert_close(learned, closed_form, atol=1e-3, rtol=0)
    # and the uniform start (the reference is not uniform) was far from it
    assert (torch.full_like(closed_form, 1 / Y) - closed_form).abs().max() > 0.1
