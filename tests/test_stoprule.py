import numpy as np
import pytest

from obliviate.stoprule import StopRule, fit_power_law


def power_law(n, a=1.0, h=1.2, b=0.2, noise=0.0, seed=0):
    x = np.arange(1, n + 1, dtype=float)
    rng = np.random.default_rng(seed)
    return a * x**-h + b + noise * rng.standard_normal(n)


def test_fit_slope_shrinks_as_the_curve_flattens():
    slopes = [abs(fit_power_law(power_law(n)).slope) for n in (5, 10, 20, 40)]
    assert slopes == sorted(slopes, reverse=True)
    assert slopes[-1] < 0.01


def test_fit_method_recovers_a_clean_power_law():
    fit = fit_power_law(power_law(30, a=2.0, h=1.5, b=0.5), method="fit")
    assert fit.h == pytest.approx(1.5, rel=0.05)
    y0 = 2.0 + 0.5  # the series is normalised by its first value
    assert fit.b == pytest.approx(0.5 / y0, rel=0.05)


def test_stop_rule_respects_min_and_max():
    rule = StopRule(epsilon=10.0, min_blocks=6, max_blocks=9)
    series = list(power_law(12))
    assert not rule.decide(series[:5])[0]  # below min_blocks, even with a huge epsilon
    assert rule.decide(series[:6])[:2] == (True, "slope_below_epsilon")
    tight = StopRule(epsilon=1e-12, min_blocks=2, max_blocks=9)
    assert not tight.decide(series[:8])[0]
    assert tight.decide(series[:9])[:2] == (True, "max_blocks")


def test_noisy_decay_eventually_stops():
    rule = StopRule(epsilon=0.05, min_blocks=4, max_blocks=200)
    series = list(np.abs(power_law(200, noise=0.01)))
    stops = [n for n in range(1, 201) if rule.decide(series[:n])[0]]
    assert stops and stops[0] < 50
