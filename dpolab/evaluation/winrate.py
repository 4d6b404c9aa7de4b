"""Win rates from judged pairs: the counts, a 95 % interval, and the length-controlled win rate.

Preferences are the judge's values for the model's answer against the reference's: 1 (win), 0.5 (tie),
0 (loss). The win rate counts a tie as half a win, as AlpacaEval and the DPO paper count them.

The interval is Wilson's score interval for a proportion, taking the tie-counted win rate p̂ as the
proportion of n pairs. A tie has less variance than a coin flip (0 instead of 1/4), so with ties the
interval is slightly conservative; without ties it is exactly Wilson's.

The length-controlled win rate is AlpacaEval-LC's idea in its simplest form: fit the logistic model
P(win | d) = σ(θ₀ + θ₁·d) of the judged preference on the standardised length difference d (model's
answer minus the reference's, in tokens, divided by the difference's standard deviation), by maximum
likelihood with the ties as half-targets, and read it at d = 0: ``lc_win_rate = σ(θ₀)``, the win rate the
judge would give if the two answers were equally long. With no length differences it is the win rate.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` of ``n`` trials.

    >>> [round(v, 4) for v in wilson_interval(0.75, 10)]
    [0.4422, 0.9191]
    """
    if n == 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def length_controlled(preferences: list[float], length_diffs: list[float], steps: int = 50,
                      ridge: float = 1e-6) -> float:
    """σ(θ₀) of the logistic fit of ``preferences`` on the standardised ``length_diffs`` (Newton's method;
    a tiny ridge on θ₁ keeps it finite when the length separates wins from losses)."""
    n = len(preferences)
    if n == 0:
        return float("nan")
    mean_p = sum(preferences) / n
    mean_d = sum(length_diffs) / n
    sd = math.sqrt(sum((d - mean_d) ** 2 for d in length_diffs) / n)
    if sd == 0 or mean_p in (0.0, 1.0):  # no length to control for, or nothing to fit
        return mean_p
    xs = [d / sd for d in length_diffs]
    t0, t1 = math.log(mean_p / (1 - mean_p)), 0.0
    for _ in range(steps):
        g0 = g1 = h00 = h01 = h11 = 0.0
        for x, y in zip(xs, preferences):
            q = sigmoid(t0 + t1 * x)
            w = q * (1 - q)
            g0, g1 = g0 + y - q, g1 + (y - q) * x
            h00, h01, h11 = h00 + w, h01 + w * x, h11 + w * x * x
        g1 -= ridge * t1
        h11 += ridge
        det = h00 * h11 - h01 * h01
        if det <= 0:
            break
        s0, s1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        t0, t1 = t0 + s0, t1 + s1
        if abs(s0) + abs(s1) < 1e-12:
            break
    return sigmoid(t0)


def win_stats(preferences: list[float], length_diffs: list[float]) -> dict:
    """``win_rate``, ``wins``, ``ties``, ``losses`` (fractions), ``win_rate_ci`` and ``lc_win_rate``."""
    n = len(preferences)
    wins = sum(p == 1.0 for p in preferences) / max(n, 1)
    ties = sum(p == 0.5 for p in preferences) / max(n, 1)
    rate = sum(preferences) / max(n, 1)
    return {"num_pairs": n, "win_rate": rate, "wins": wins, "ties": ties, "losses": 1 - wins - ties if n else 0.0,
            "win_rate_ci": list(wilson_interval(rate, n)), "lc_win_rate": length_controlled(preferences, length_diffs)}
