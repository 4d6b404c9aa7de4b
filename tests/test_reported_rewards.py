"""SPEC §1: the metrics report the reward the loss optimises (SimPO's β·π/n, AlphaPO's shaped reward, ORPO's
log-odds, CPO's β·π), or β·h where the loss defines none; with several losses, the first listed that does."""

import math
from types import SimpleNamespace

import pytest
import torch

from dpolab.config import Config
from dpolab.evaluation import metrics as M
from dpolab.losses import LOSSES
from dpolab.objective import build_objective

DEFAULTS = {k: v for k, v in vars(Config()).items()}


def pair(chosen_logps, rejected_logps, chosen_len, rejected_len, ref=(0.0, 0.0)):
    """One pair as the objective sees it: per-sequence log-probs (S,) and a batch with its lengths."""
    policy = torch.tensor([chosen_logps, rejected_logps], dtype=torch.float64)
    reference = torch.tensor(ref, dtype=torch.float64)
    batch = SimpleNamespace(num_completions=2, lengths=torch.tensor([chosen_len, rejected_len]), margins=None,
                            labels=None)
    return policy, reference, batch


def reported(loss, beta, *args, **settings):
    objective = build_objective(loss.split(","), None, beta, {**DEFAULTS, **settings})
    return M.means(M.example_sums(objective(*pair(*args))))


def test_simpo_reports_its_per_token_reward_and_ranks_a_learnt_pair_right():
    """Per-token log-probs −1 (chosen, 20 tokens) against −1.5 (rejected, 4 tokens): SimPO learns this pair
    (β·(−1 + 1.5) = 1 > γ = 0.5 … its loss is below ln 2), so it must be reported as ranked right. The summed
    log-probs (−20 against −6) would rank it wrong, which is what main reported before."""
    m = reported("simpo", 2.0, -20.0, -6.0, 20, 4, simpo_gamma=0.5)
    assert m["rewards/chosen"] == pytest.approx(2.0 * -1.0)
    assert m["rewards/rejected"] == pytest.approx(2.0 * -1.5)
    assert m["rewards/margins"] == pytest.approx(1.0)
    assert m["rewards/accuracies"] == 1.0
    assert m["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-(1.0 - 0.5)))))


def test_orpo_reports_the_log_odds():
    """log odds(y) = log p̄ − log(1 − p̄), p̄ = exp(π/n): p̄ = e^{−1} gives −1 − log(1 − 0.367879) = −0.541325,
    p̄ = e^{−1.5} gives −1.5 − log(1 − 0.223130) = −1.247518 (worked with a calculator)."""
    m = reported("orpo", 0.1, -20.0, -6.0, 20, 4)
    assert m["rewards/chosen"] == pytest.approx(-0.541325, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(-1.247518, abs=1e-6)
    assert m["rewards/accuracies"] == 1.0


def test_alphapo_reports_its_shaped_reward():
    """r_α = (1 − p̄^{−α})/α with α = 0.25: p̄ = e^{−1} gives (1 − e^{0.25})/0.25 = −1.136102; e^{−1.5} gives
    (1 − e^{0.375})/0.25 = −1.819966; times β = 2."""
    m = reported("alphapo", 2.0, -20.0, -6.0, 20, 4)
    assert m["rewards/chosen"] == pytest.approx(2 * -1.136102, abs=1e-5)
    assert m["rewards/rejected"] == pytest.approx(2 * -1.819966, abs=1e-5)


def test_cpo_reports_beta_times_the_summed_log_prob():
    m = reported("cpo", 0.1, -20.0, -6.0, 20, 4)
    assert (m["rewards/chosen"], m["rewards/rejected"]) == pytest.approx((-2.0, -0.6))
    assert m["rewards/accuracies"] == 0.0  # CPO's own reward ranks by the summed log-prob: this pair is wrong


def test_reference_losses_report_beta_h_and_combinations_take_the_first_own_reward():
    """sigmoid: β·h with h = π − ref; sigmoid + sft (RPO): sft defines no reward, so still β·h; sft + simpo:
    simpo's; simpo + cpo: the first listed (simpo)."""
    args = (-20.0, -6.0, 20, 4, (-21.0, -5.0))
    m = reported("sigmoid", 0.5, *args)
    assert (m["rewards/chosen"], m["rewards/rejected"]) == pytest.approx((0.5, -0.5))
    assert reported("sigmoid,sft", 0.5, *args)["rewards/chosen"] == pytest.approx(0.5)
    assert reported("sft,simpo", 2.0, *args)["rewards/chosen"] == pytest.approx(-2.0)
    assert reported("simpo,cpo", 2.0, *args)["rewards/chosen"] == pytest.approx(-2.0)
    assert reported("cpo,simpo", 2.0, *args)["rewards/chosen"] == pytest.approx(-40.0)


def test_the_losses_that_define_their_own_reward():
    assert sorted(n for n, loss in LOSSES.items() if loss.own_reward) == ["alphapo", "cpo", "orpo", "simpo"]


def test_f_divergence_reports_beta_h_not_beta_f_of_h():
    """Under f-DPO the loss sees f(h); the reported reward stays the implicit reward β·h (SPEC §1)."""
    m = reported("sigmoid", 0.5, -20.0, -6.0, 20, 4, (-21.0, -5.0), f_divergence_type="forward_kl")
    assert (m["rewards/chosen"], m["rewards/rejected"]) == pytest.approx((0.5, -0.5))
