"""The residual-memory stop rule (paper Section IV-C, Algorithm 1 lines 10-15).

After each retrained block the series Delta_1..Delta_n (x = 1..n blocks since the deletion, or
since the last affected block for a multi-block request) is normalised by Delta_1 and fitted with
a power law Y(x) = a * x^-h + b:

- ``dfa`` (the paper): h by detrended fluctuation analysis (nolds), then a and b by least squares
  (scipy) with h fixed;
- ``fit``: a, h and b together by non-linear least squares, starting from the DFA value of h.

Retraining stops at the current point n once |Y'(n)| = |a * (-h) * n^(-h-1)| < epsilon, but never
before n = ``min_blocks`` (DFA needs a few points) and always at n = ``max_blocks``, where n
counts blocks from the last affected block on.

With ``dfa`` the fitted slope is flat from the first points on for any smooth series, a rising
one included: DFA's h measures how the series fluctuates, not how it decays, and comes out
large. On Fashion-MNIST the residual of a single-sample deletion rises for a hundred blocks
(the trajectories diverge), and the rule stops at its first points all the same; the accuracy
guard, and consolidation (``obliviate.consolidation``), are what bound the result.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

MIN_DFA_POINTS = 5  # DFA needs windows of 3 and 4 points


@dataclass(frozen=True)
class Fit:
    h: float
    a: float
    b: float
    slope: float  # Y'(n) at the current point n


def dfa_exponent(series: np.ndarray) -> float:
    """DFA exponent (nolds, linear detrending) of a short series.

    Windows run from 3 points (2 are always fitted exactly by a line) to half the series.
    """
    with warnings.catch_warnings():  # nolds 0.6.2 imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import nolds

        n = len(series)
        nvals = sorted({int(v) for v in np.linspace(3, max(4, n // 2), num=6)})
        h = float(nolds.dfa(np.asarray(series, dtype=float), nvals=nvals, overlap=True, order=1))
    return float(np.clip(h, 0.05, 10.0)) if math.isfinite(h) else 1.0


def fit_power_law(deltas: np.ndarray, method: str = "dfa") -> Fit:
    """Fit a * x^-h + b to the normalised series and return the slope at its last point."""
    from scipy.optimize import curve_fit

    y = np.asarray(deltas, dtype=float)
    y = y / y[0] if y[0] > 0 else y
    x = np.arange(1, len(y) + 1, dtype=float)
    h = dfa_exponent(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "fit":
            try:
                (a, h, b), _ = curve_fit(
                    lambda x, a, h, b: a * x**-h + b,
                    x,
                    y,
                    p0=(1.0, max(h, 0.1), 0.0),
                    bounds=([-np.inf, 0.0, -np.inf], [np.inf, 10.0, np.inf]),
                    maxfev=2000,
                )
            except RuntimeError:  # no convergence: fall back to the DFA exponent
                method = "dfa"
        if method == "dfa":
            (a, b), _ = curve_fit(lambda x, a, b: a * x**-h + b, x, y, p0=(1.0, 0.0))
    n = x[-1]
    return Fit(h=float(h), a=float(a), b=float(b), slope=float(a * -h * n ** (-h - 1)))


@dataclass(frozen=True)
class StopRule:
    epsilon: float
    min_blocks: int
    max_blocks: int
    method: str = "dfa"

    def decide(self, deltas: list[float]) -> tuple[bool, str, Fit | None]:
        """(stop?, reason, fit) after len(deltas) retrained blocks since the deletion."""
        n = len(deltas)
        if n >= self.max_blocks:
            return True, "max_blocks", None
        if n < max(self.min_blocks, MIN_DFA_POINTS):
            return False, "", None
        if deltas[0] == 0:  # the removed samples changed nothing at all
            return True, "no_residual", None
        fit = fit_power_law(np.asarray(deltas), self.method)
        if abs(fit.slope) < self.epsilon:
            return True, "slope_below_epsilon", fit
        return False, "", fit
