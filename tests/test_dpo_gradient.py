"""The DPO gradient with respect to the log-probs, by autograd, against the closed form (SPEC §2)."""

import torch

from dpolab.losses import LOSSES


def test_sigmoid_gradient_is_beta_sigma_minus_beta_delta():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.3
    losses, _, _ = LOSSES["sigmoid"](pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    delta = (pc - rc) - (pr - rr)
    expected = beta * torch.sigmoid(-beta * delta.detach())
    torch.testing.assert_close(pc.grad, -expected)
    torch.testing.assert_close(pr.grad, expected)
